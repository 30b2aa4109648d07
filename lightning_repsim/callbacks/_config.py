"""The configuration errors of the callbacks: their arguments, checked at construction and in ``setup``.

These are the only errors that stop a fit (a :class:`~lightning_repsim.errors.RepSimValueError` naming the
argument and the fix); everything that fails later is one warning (:mod:`._guard`). The probe's own
arguments are checked beside the probe (:func:`._probing.check_probe_arguments`), the strategy's in
:mod:`._strategy`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_repsim.callbacks._freezing import bounded
from lightning_repsim.callbacks._probing import KEYWORDS, Reference
from lightning_repsim.callbacks._strategy import refuse_sharded
from lightning_repsim.errors import RepSimValueError


def check_monitor_arguments(
    references: Sequence[Reference],
    store: bool,
    every_n_epochs: int | None,
    every_n_train_steps: int | None,
    name: str | None,
    threshold: float,
) -> None:
    """RepresentationSimilarity's own arguments (the probe's are checked in :mod:`._probing`)."""
    if any(r.kind == "final" for r in references) and not store:
        raise RepSimValueError("reference='final' is computed from the snapshot store; keep store=True.")
    for option, value in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RepSimValueError(f"{option} must be a positive int or None; got {value!r}.")
    if every_n_epochs is None and every_n_train_steps is None:
        raise RepSimValueError("set every_n_epochs or every_n_train_steps (both are None, so nothing would be logged).")
    if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", name)):
        raise RepSimValueError(
            f"name must be a short identifier (letters, digits, '_' or '.', not starting with a digit), "
            f"e.g. name='val'; got {name!r}."
        )
    if not 0.0 < threshold <= 1.0:
        raise RepSimValueError(f"threshold is a fraction of the final similarity in (0, 1]; got {threshold}.")


def check_monitor_setup(
    references: Sequence[Reference], name: str | None, names: Sequence[str | None], strategy: Any
) -> None:
    """RepresentationSimilarity in ``setup``: its checkpoint references exist, the strategy does not shard the
    parameters, and ``name`` tells it apart from the Trainer's other monitors (``names``: every monitor's,
    this one's included)."""
    for ref in references:
        if ref.kind == "module" and isinstance(ref.source, Path) and not ref.source.is_file():
            raise RepSimValueError(
                f"reference checkpoint {str(ref.source)!r} does not exist. A reference is one "
                f"of {', '.join(map(repr, KEYWORDS))} (lower case), an nn.Module or the path "
                "of a Lightning checkpoint."
            )
    refuse_sharded(strategy, "RepresentationSimilarity captures whole-layer outputs")
    alike = [other for other in names if other == name]
    if len(alike) > 1:
        raise RepSimValueError(
            f"the Trainer has {len(alike)} RepresentationSimilarity callbacks named {name!r}: their tags and "
            "snapshot stores would mix. Give each a distinct name, e.g. RepresentationSimilarity(..., name='val') "
            "and RepresentationSimilarity(..., name='train'); tags then start with repsim-val/, repsim-train/."
        )


def check_units_argument(units: Sequence[str] | None) -> list[str] | None:
    """FreezeTraining's ``units``: ``None`` (discover the blocks) or distinct module paths, as a new list."""
    if units is None:
        return None
    if isinstance(units, str) or not all(isinstance(u, str) for u in units):
        raise RepSimValueError(f"units must be a list of module paths; got {units!r}.")
    if len(set(units)) != len(units):
        raise RepSimValueError(f"units contains duplicates: {units!r}.")
    if not units:
        raise RepSimValueError("units is empty; pass None to discover the top-level blocks.")
    return list(units)


def check_bounded_training(trainer: Any, schedule: Any) -> None:
    """A schedule placing freezes at fractions of training needs a bounded training length."""
    total = trainer.estimated_stepping_batches
    if not bounded(total):
        raise RepSimValueError(
            f"FreezeTraining(schedule={schedule!r}) places freezes at fractions of training, but the "
            f"training length is unbounded (trainer.estimated_stepping_batches = {total}, max_epochs="
            f"{trainer.max_epochs}, max_steps={trainer.max_steps}). Set max_steps (or max_epochs with a "
            "sized dataloader), or give the schedule in steps: a dict {unit: step} or {unit: 'epoch:N'}."
        )
