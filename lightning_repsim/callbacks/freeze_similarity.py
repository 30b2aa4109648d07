r"""The similarity schedule of :class:`~lightning_repsim.callbacks.FreezeTraining`: a unit freezes once its
representation has stopped changing (Raghu et al. 2017, Thompson et al. 2019).

The fixed-time schedules (linear, cubic, per-unit times) and the :class:`FreezeSchedule` protocol are in
:mod:`lightning_repsim.callbacks.freeze_schedules`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from lightning_repsim.callbacks._freezing import isolated_rng
from lightning_repsim.callbacks.freeze_schedules import FreezeSchedule
from lightning_repsim.capture import Block, capture_blocks
from lightning_repsim.errors import RepSimValueError, RepSimWarning
from lightning_repsim.functional import cka, gram_linear
from lightning_repsim.functional._validation import MIN_MEANINGFUL_EXAMPLES

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from lightning_repsim.callbacks.freeze import FreezeTraining

__all__ = ["SimilaritySchedule"]

_PROBE_CHUNK = 256  # examples per probe forward; fixed so that results do not depend on the batch size


class SimilaritySchedule(FreezeSchedule):
    """Freeze the lowest still-trainable unit once its representation has stopped changing.

    The linear CKA of its output on a fixed probe set between consecutive checks stays
    ``>= threshold`` for ``patience`` consecutive checks. At most one unit freezes per check; the
    frozen set is always a contiguous prefix. The probe is ``probe`` or the inputs of the first
    ``probe_size`` training examples (collected from the first training batches, no extra data
    loading). Every ``check_every_n_steps`` optimizer steps (every epoch when ``None``) the probe
    runs through the model in eval mode without gradients; each unit's output becomes ``(n, p)``
    features (:func:`lightning_repsim.capture.reduce_output`: conv maps average-pooled to at most
    ``max_features`` columns, then flattened), and its Gram matrix is compared with the one of the
    previous check by linear CKA in float64 (:func:`lightning_repsim.functional.cka`). With
    ``source="external"`` no probe runs; another callback feeds the values through
    :meth:`FreezeTraining.update_similarity`. Decisions are taken on global rank 0 and broadcast,
    so every rank freezes the same units at the same step.

    Args:
        threshold: CKA at or above which a unit counts as unchanged.
        patience: consecutive checks above ``threshold`` before freezing.
        check_every_n_steps: optimizer steps between checks; ``None`` checks at the end of every
            training epoch.
        probe: a fixed tensor of model inputs (rows are examples).
        probe_size: examples collected from the first training batches when ``probe`` is ``None`` (at least 4).
        source: ``"probe"`` (the internal probe pass) or ``"external"`` (fed values only).
        max_features: cap on the columns of a conv unit's features (the callbacks, which measure
            during training, default to 256; offline analyses to 4096).

    Example:
        >>> SimilaritySchedule(threshold=0.995, patience=2).patience
        2
    """

    label = "similarity schedule"

    def __init__(
        self,
        threshold: float = 0.99,
        patience: int = 3,
        check_every_n_steps: int | None = 50,
        probe: torch.Tensor | None = None,
        probe_size: int = 256,
        source: str = "probe",
        max_features: int = 256,
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise RepSimValueError(f"threshold must lie in (0, 1] (a CKA value); got {threshold}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise RepSimValueError(f"patience must be a positive int; got {patience!r}.")
        if check_every_n_steps is not None and (
            isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int) or check_every_n_steps < 1
        ):
            raise RepSimValueError(f"check_every_n_steps must be a positive int or None; got {check_every_n_steps!r}.")
        if isinstance(probe_size, bool) or not isinstance(probe_size, int) or probe_size < MIN_MEANINGFUL_EXAMPLES:
            raise RepSimValueError(
                f"probe_size must be an int >= {MIN_MEANINGFUL_EXAMPLES} (below that every CKA is close to 1 "
                f"whatever the layer does); got {probe_size!r}."
            )
        if probe is not None and (
            not isinstance(probe, torch.Tensor) or probe.ndim == 0 or probe.shape[0] < MIN_MEANINGFUL_EXAMPLES
        ):
            raise RepSimValueError(
                f"probe must be a tensor of model inputs with at least {MIN_MEANINGFUL_EXAMPLES} rows (examples)."
            )
        if source not in ("probe", "external"):
            raise RepSimValueError(f"source must be one of ['probe', 'external']; got {source!r}.")
        if isinstance(max_features, bool) or not isinstance(max_features, int) or max_features < 1:
            raise RepSimValueError(f"max_features must be a positive int; got {max_features!r}.")
        self.threshold = float(threshold)
        self.patience = patience
        self.check_every_n_steps = check_every_n_steps
        self.probe_size = probe_size
        self.source = source
        self.max_features = max_features
        # state that travels in checkpoints
        self._streaks: dict[str, int] = {}
        self._history: list[dict[str, Any]] = []
        self._last_check: int | None = None  # step (or epoch) of the last check
        self._probe: torch.Tensor | None = None if probe is None else probe.detach().cpu().clone()
        self._probe_given = probe is not None
        self._reference: dict[str, torch.Tensor] = {}
        # per-fit runtime
        self._probe_chunks: list[torch.Tensor] = []
        self._batches_seen = 0
        self._feeds: list[tuple[int, dict[str, float]]] = []

    def __repr__(self) -> str:
        return (
            f"SimilaritySchedule(threshold={self.threshold}, patience={self.patience}, check_every_n_steps="
            f"{self.check_every_n_steps}, probe_size={self.probe_size}, source={self.source!r})"
        )

    @property
    def history(self) -> list[dict[str, Any]]:
        """One ``{"step": int, "values": {unit: cka}}`` per check."""
        return [{"step": h["step"], "values": dict(h["values"])} for h in self._history]

    def feed(self, step: int, values: Mapping[str, float]) -> None:
        """Queue one externally computed check (see :meth:`FreezeTraining.update_similarity`)."""
        self._feeds.append((int(step), {str(k): float(v) for k, v in values.items()}))

    def start(self, trainer: pl.Trainer, units: list[str], freeze_last: bool) -> None:
        self._probe_chunks = []
        self._batches_seen = 0

    def collect(self, callback: FreezeTraining, trainer: pl.Trainer, batch: Any) -> None:
        if self.source != "probe" or self._probe is not None:
            return
        # every rank collects (so all agree when the probe is complete); only rank 0 measures
        inputs = callback.batch_inputs(batch).detach()
        have = sum(c.shape[0] for c in self._probe_chunks)
        self._probe_chunks.append(inputs[: self.probe_size - have].cpu().clone())
        self._batches_seen += 1
        if have + self._probe_chunks[-1].shape[0] >= self.probe_size:
            self._probe = torch.cat(self._probe_chunks)
            self._probe_chunks = []
        elif self._batches_seen == 1:
            self._warn_if_probe_cannot_fill(trainer, rows=inputs.shape[0])

    def _warn_if_probe_cannot_fill(self, trainer: pl.Trainer, rows: int) -> None:
        """Say once, at the first batch, when this fit ends before ``probe_size`` examples are seen."""
        try:
            steps = float(trainer.estimated_stepping_batches)
        except Exception:  # an unsized loader: the length of training is unknown
            return
        batches = steps * max(1, int(getattr(trainer, "accumulate_grad_batches", 1)))
        if math.isfinite(batches) and rows * batches < self.probe_size:
            from pytorch_lightning.utilities.rank_zero import rank_zero_warn

            rank_zero_warn(
                f"FreezeTraining: the similarity schedule collects its probe from the first {self.probe_size} "
                f"training examples, but this fit sees only about {int(rows * batches)} ({int(batches)} batches of "
                f"{rows}): no check will run and nothing will freeze. Pass SimilaritySchedule(probe_size=...) "
                "no larger than that, or probe=<a tensor of inputs>.",
                category=RepSimWarning,
            )

    def due(
        self,
        point: str,
        callback: FreezeTraining,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        frozen: list[str],
        eligible: list[str],
    ) -> dict[str, str]:
        new: dict[str, str] = {}
        frozen = list(frozen)
        if self.source == "probe" and self._check_due(trainer, at_epoch_end=point == "epoch_end"):
            candidates = [u for u in eligible if u not in frozen]
            values = self._measure(callback, pl_module, candidates) if trainer.is_global_zero else {}
            if trainer.world_size > 1:
                values = trainer.strategy.broadcast(values, src=0)
            if self.check_every_n_steps is None:
                epoch_end = point == "epoch_end"
                self._last_check = trainer.current_epoch if epoch_end else trainer.current_epoch - 1
            else:
                self._last_check = trainer.global_step
            if values:  # the first check only sets the reference
                new.update(self._record(trainer.global_step, values, frozen + list(new), eligible))
        if self._feeds:
            feeds, self._feeds = self._feeds, []
            if trainer.world_size > 1:  # every rank was fed at the same point (a callback hook), so all get here
                feeds = trainer.strategy.broadcast(feeds, src=0)
            for step, raw in feeds:
                done = frozen + list(new)
                values = {}
                members = callback.unit_modules
                for unit in eligible + [u for u in callback.units or [] if u not in eligible]:
                    if unit in done:
                        continue
                    paths = {unit, *members.get(unit, ())}
                    hits = [v for k, v in raw.items() if any(k == p or k.startswith(p + ".") for p in paths)]
                    if hits:
                        values[unit] = float("nan") if any(math.isnan(v) for v in hits) else min(hits)
                new.update(self._record(step, values, done, eligible))
        return new

    def _check_due(self, trainer: pl.Trainer, at_epoch_end: bool) -> bool:
        if self._probe is None:
            return False
        if self.check_every_n_steps is None:  # a reference before training, then every epoch end
            if at_epoch_end:
                return self._last_check is None or self._last_check < trainer.current_epoch
            return self._last_check is None
        step = trainer.global_step
        return not at_epoch_end and step % self.check_every_n_steps == 0 and step != self._last_check

    def _measure(
        self, callback: FreezeTraining, pl_module: pl.LightningModule, candidates: list[str]
    ) -> dict[str, float]:
        """CKA of each candidate unit's probe Gram with the previous check's; {} on the first check."""
        assert self._probe is not None
        if not candidates:
            return {}
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        with isolated_rng(device):
            feats = capture_blocks(
                pl_module,
                self._probe,
                [Block(unit, (unit,), callback.unit_output(unit)) for unit in candidates],
                batch_size=_PROBE_CHUNK,
                max_features=self.max_features,
                forward=lambda model, inputs: callback.probe_forward(pl_module, inputs),
            )
        values: dict[str, float] = {}
        for unit in candidates:
            if unit not in feats:
                values[unit] = float("nan")
                continue
            gram = gram_linear(feats[unit]).cpu()
            previous = self._reference.get(unit)
            self._reference[unit] = gram
            if previous is not None:
                values[unit] = float(cka(previous, gram))
        for unit in list(self._reference):
            if unit not in candidates:
                del self._reference[unit]
        return values

    def _record(self, step: int, values: dict[str, float], frozen: list[str], eligible: list[str]) -> dict[str, str]:
        """Update the patience counters with one check; the lowest trainable unit, if stable, with why."""
        self._history.append({"step": int(step), "values": dict(values)})
        for unit, value in values.items():
            stable = not math.isnan(value) and value >= self.threshold
            self._streaks[unit] = self._streaks.get(unit, 0) + 1 if stable else 0
        lowest = next((u for u in eligible if u not in frozen), None)
        if lowest is None or self._streaks.get(lowest, 0) < self.patience:
            return {}
        value = values.get(lowest, float("nan"))
        why = (
            f"similarity schedule: linear CKA with the previous check >= {self.threshold} for "
            f"{self._streaks[lowest]} consecutive checks (last {value:.5f})"
        )
        self._streaks.pop(lowest, None)
        self._reference.pop(lowest, None)
        return {lowest: why}

    def state_dict(self) -> dict[str, Any]:
        return {
            "streaks": dict(self._streaks),
            "history": self.history,
            "last_check": self._last_check,
            "probe": self._probe,
            "reference": dict(self._reference),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._streaks = dict(state_dict.get("streaks", {}))
        self._history = [{"step": h["step"], "values": dict(h["values"])} for h in state_dict.get("history", [])]
        self._last_check = state_dict.get("last_check")
        if not self._probe_given and state_dict.get("probe") is not None:
            self._probe = state_dict["probe"].cpu()
        self._reference = dict(state_dict.get("reference", {}))
