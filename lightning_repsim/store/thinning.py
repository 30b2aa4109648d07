"""Which snapshots a store keeps under its disk budget: the thinning rule.

The store keeps the first snapshot, the newest, and every ``stride``-th snapshot in logging order,
doubling ``stride`` (1, 2, 4, ...) until the kept ones fit the budget. Kept snapshots therefore stay
evenly spaced over the whole run, and between doublings the store holds half to all of what fits.
The stride never decreases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_repsim.errors import RepSimValueError

__all__ = ["THINNING_RULE", "plan_for_new", "plan_thinning"]

THINNING_RULE = (
    "keep the first snapshot, the newest, and every stride-th snapshot in logging order; "
    "the stride doubles each time the budget is exceeded"
)


def plan_thinning(indices: Sequence[int], sizes: Sequence[int], stride: int, max_bytes: int) -> tuple[list[bool], int]:
    """Which snapshots to keep once a new one (the last entry) is added; pure, for testing.

    ``indices`` are the snapshots' positions in logging order (0 for the first ever added),
    ascending; ``sizes`` their file sizes. Keeps the first, the last and every ``stride``-th
    snapshot; while the kept ones exceed ``max_bytes`` the stride doubles.

    Returns:
        ``(keep_mask, stride)``.

    Raises:
        RepSimValueError: even the first and the last snapshot alone exceed ``max_bytes``.
    """
    last = len(indices) - 1

    def mask_for(s: int) -> list[bool]:
        return [j == 0 or j == last or indices[j] % s == 0 for j in range(len(indices))]

    mask = mask_for(stride)
    while sum(size for size, keep in zip(sizes, mask) if keep) > max_bytes:
        if sum(mask) <= 2:
            kept = sum(size for size, keep in zip(sizes, mask) if keep)
            raise RepSimValueError(
                f"a snapshot of {sizes[-1]} bytes cannot be stored: the first and the newest "
                f"snapshot together need {kept} bytes > max_bytes={max_bytes}; raise max_bytes "
                "(SnapshotStore.create/open(..., max_bytes=...)) or store fewer columns per layer"
            )
        stride *= 2
        mask = mask_for(stride)
    return mask, stride


def plan_for_new(
    kept: Sequence[Mapping[str, Any]], removed: Sequence[int], step: int, nbytes: int, stride: int, max_bytes: int
) -> tuple[list[bool], int]:
    """:func:`plan_thinning` for a new snapshot of ``nbytes`` at ``step``: ``kept`` are the stored
    entries before it (``{"step", "nbytes"}``), ``removed`` the steps thinned or lost before, which
    still count for positions in logging order. Returns the keep mask over ``kept`` and the new one,
    and the stride."""
    history = sorted([e["step"] for e in kept] + [s for s in removed if s < step])
    position = {s: i for i, s in enumerate(history)}
    indices = [position[e["step"]] for e in kept] + [len(history)]
    sizes = [e["nbytes"] for e in kept] + [nbytes]
    return plan_thinning(indices, sizes, stride, max_bytes)
