"""Finding and opening the run a ``lightning-repsim`` RUN argument names (see :mod:`lightning_repsim.cli`).

Light on imports: the store is imported inside the functions, so that ``--help`` answers at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_repsim.errors import RepSimIntegrityError, RepSimWarning, one_line

if TYPE_CHECKING:
    from lightning_repsim.store import SnapshotStore

__all__ = ["CliError", "Run", "open_run"]

_SHOWN_CANDIDATES = 5
DAMAGED_HINT = "pass --allow-damaged to use the intact snapshots; 'lightning-repsim verify RUN' lists the damaged files"


class CliError(Exception):
    """A user error: printed as one line ``lightning-repsim: error: ...``, exit status 2."""


# --------------------------------------------------------------------------- runs and stores


@dataclass
class Run:
    """One run's store, opened read-only, with the names the CLI shows for it."""

    name: str  # short label: "version_3" -> "run/version_3"; its repsim-1 store -> "run/version_3/repsim-1"
    run_dir: Path  # where the TensorBoard event files are (the store's parent)
    store: SnapshotStore
    notes: list[str] = field(default_factory=list)


def find_store_dir(path: Path) -> Path:
    """The store directory a RUN argument points to (see the module docstring)."""
    from lightning_repsim.store import MANIFEST_NAME, run_store_dirs

    if not path.exists():
        raise CliError(f"{path}: no such directory")
    if not path.is_dir():
        raise CliError(f"{path}: not a directory (pass a run directory or its repsim/ store)")
    if (path / MANIFEST_NAME).exists():
        return path
    found = run_store_dirs(path)
    if len(found) > 1:
        raise CliError(
            f"{path}: holds {len(found)} snapshot stores, one per fit into this run directory "
            f"({_shown(found)}); pass one of them"
        )
    for pattern in ("*", "*/*"):
        if found:
            break
        found = [store for run in sorted(path.glob(pattern)) for store in run_store_dirs(run)]
        if len(found) > 1:
            raise CliError(f"{path}: holds {len(found)} runs with a snapshot store ({_shown(found)}); pass one of them")
    if found:
        return found[0]
    raise CliError(
        f"{path}: no snapshot store here (looked for {MANIFEST_NAME} in it, in repsim/ or repsim-N/ and in "
        "*/repsim*/); is this a run directory written with RepresentationSimilarity(store=True)?"
    )


def _shown(stores: Sequence[Path]) -> str:
    """Store directories as a short list: the run directory for a run's first store, else the store itself."""
    names = [str(p.parent) if p.name == "repsim" else str(p) for p in stores]
    return ", ".join(names[:_SHOWN_CANDIDATES]) + (", ..." if len(names) > _SHOWN_CANDIDATES else "")


def _run_name(run_dir: Path) -> str:
    run_dir = run_dir.resolve()
    if run_dir.name.startswith("version_") and run_dir.parent.name:
        return f"{run_dir.parent.name}/{run_dir.name}"
    return run_dir.name or str(run_dir)


def open_run(path: str, *, allow_damaged: bool = False) -> Run:
    """Resolve and open a RUN argument read-only.

    With ``allow_damaged`` every step file is read whole and checked; a missing, truncated, damaged
    or foreign one is left out, with one note each.

    Raises:
        CliError: nothing usable at ``path``, an empty store, or (without ``allow_damaged``) a
            store whose step files are partly missing, truncated, another run's or damaged.
        RepSimError: the store itself is invalid (bad manifest).
    """
    from lightning_repsim.store import open_store, run_store_dirs

    store_dir = find_store_dir(Path(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RepSimWarning)
        try:
            store = open_store(store_dir, skip_damaged=allow_damaged)
        except RepSimIntegrityError as err:
            raise CliError(f"damaged snapshot store: {one_line(err)} ({DAMAGED_HINT})") from None
    damage = [one_line(w.message) for w in caught if issubclass(w.category, RepSimWarning)]
    if damage and not allow_damaged:
        raise CliError(f"damaged snapshot store: {damage[0]} ({DAMAGED_HINT})")
    if not store.steps:
        raise CliError(f"{store_dir}: the store holds no snapshots yet")
    if store_dir in run_store_dirs(store_dir.parent):  # repsim/, or repsim-N/ of a later fit into the same run
        run_dir = store_dir.parent
        name = _run_name(run_dir) + ("" if store_dir.name == "repsim" else f"/{store_dir.name}")
    else:
        run_dir, name = store_dir, _run_name(store_dir)
    return Run(name, run_dir, store, notes=damage)
