r"""
Freeze training
^^^^^^^^^^^^^^^

Progressive freezing by depth (Raghu et al. 2017; FreezeOut, Brock et al. 2017; used by
Thompson et al. 2019): during training the network's units are frozen one by one from the input
side until only the top trains. A frozen unit really stops changing, its backward compute is
saved, and the frozen set survives resume and DDP. When each unit freezes is the schedule's
business (:mod:`lightning_repsim.callbacks.freeze_schedules`,
:mod:`lightning_repsim.callbacks.freeze_similarity`); finding and freezing the units that of
:mod:`._freezing`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks.callback import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from lightning_repsim.callbacks._config import check_bounded_training, check_units_argument
from lightning_repsim.callbacks._freezing import (
    check_units,
    count_parameters,
    discover_blocks,
    freeze_modules,
    log_freeze_state,
    restored_units,
    single_blocks,
)
from lightning_repsim.callbacks._strategy import require_unused_parameter_search
from lightning_repsim.callbacks.freeze_schedules import FreezeSchedule, ScheduleValue, as_schedule
from lightning_repsim.callbacks.freeze_similarity import SimilaritySchedule
from lightning_repsim.capture import Block, Probe
from lightning_repsim.errors import RepSimError, RepSimValueError

__all__ = ["FreezeTraining"]

_STATE_VERSION = 2  # 2: the modules and output of each unit ("blocks"); 1: each unit one module


class FreezeTraining(Callback):
    r"""Freeze the network's units one by one, input side first, until only the top trains.

    A *unit* is what freezes at once. Units are ordered by depth; by default they are the model's
    blocks with parameters, in the order they first execute
    (:func:`lightning_repsim.capture.default_blocks`, run once on the inputs of the first training
    batch, in eval mode, without gradients and with the RNG untouched): each transformer or ResNet
    block of a stack, a conv or linear together with the normalisation and activation that follow
    it (unit ``"features.0"`` freezes ``features.0``, its BatchNorm ``features.1`` and
    ``features.2``; :attr:`unit_modules` lists them), the embeddings, the head. These are also the
    default layers of :class:`~lightning_repsim.callbacks.RepresentationSimilarity`, so its layer
    names are the units. ``units=[...]`` names module paths instead (``"encoder.layer1"``), each
    one unit. The last unit never freezes unless ``freeze_last=True``.

    Schedules (:mod:`lightning_repsim.callbacks.freeze_schedules`): a schedule object, or a shorthand:

    * ``"linear"`` or :class:`LinearSchedule` ``(start, end)`` (Raghu et al. 2017): unit :math:`i` of
      :math:`L` freezes at :math:`\lfloor T\,(s + (e - s)\, i / L)\rfloor`, :math:`T` =
      ``trainer.estimated_stepping_batches``; with the defaults, unit 1 of 4 at 25 % of training,
      unit 2 at 50 %, unit 3 at 75 %.
    * ``"cubic"`` or :class:`CubicSchedule` ``(start, end)`` (FreezeOut, Brock et al. 2017): the
      linear position cubed.
    * a dict ``{unit name or glob: time}`` (a :class:`TimesSchedule`): an ``int`` is a global step,
      a ``float`` in [0, 1] a fraction of :math:`T`, a string ``"step:N"``, ``"epoch:N"`` or
      ``"fraction:F"`` says it explicitly.
    * ``"similarity"`` or :class:`SimilaritySchedule` ``(threshold, patience, check_every_n_steps,
      probe, probe_size, source, max_features)``: the lowest trainable unit freezes once the
      linear CKA of its output on a fixed probe, between consecutive checks, stays above
      ``threshold`` for ``patience`` checks; with ``source="external"`` another callback feeds the
      values through :meth:`update_similarity`.

    What "frozen" means here, for every parameter and buffer of a frozen unit:

    * ``requires_grad=False``: autograd does not build the backward graph of the frozen prefix,
      so the backward compute of the prefix is saved.
    * ``.grad`` is set to ``None`` in ``on_before_optimizer_step`` (before gradient clipping and
      the step), so stale gradients (accumulation in progress, ``zero_grad(set_to_none=False)``)
      cannot move frozen weights; torch optimizers skip parameters whose gradient is ``None``,
      which also skips momentum and (decoupled) weight decay. Custom optimizers must do the same.
    * Optimizer parameter groups are left untouched: frozen parameters stay in their groups with
      their state (momentum buffers, Adam moments). Nothing about the optimizer changes, so
      checkpoints resume without any param-group bookkeeping.
    * BatchNorm layers of frozen units are put in eval mode (running statistics frozen, batch
      statistics no longer used) unless ``train_bn=True``; the flag is re-applied before every
      training batch and after validation.
    * Frozen units never unfreeze. When nothing in the LightningModule is left to train (only
      possible with ``freeze_last=True``), the callback sets ``trainer.should_stop``.

    Resume: :meth:`state_dict` holds the units (with the modules of each), the frozen set, the freeze events and the
    similarity schedule's state (probe, reference Grams, history, patience counters); the frozen
    set is re-applied in ``on_fit_start`` / ``on_train_start``, before the first step. Fractions
    are resolved against the current Trainer's ``estimated_stepping_batches`` at every fit.

    DDP: freezing after DDP wrapped the model makes DDP's reducer wait for gradients that never
    come (Lightning then stops with "parameters that were not used in producing the loss").
    The callback therefore requires ``strategy="ddp_find_unused_parameters_true"`` (or
    ``DDPStrategy(find_unused_parameters=True)``) and says so in ``setup``. Data-dependent
    decisions (similarity values) are taken on global rank 0 and broadcast, so every rank
    freezes the same units at the same step. Frozen parameters never move on any rank; the
    BatchNorm buffers of frozen units follow DDP's ``broadcast_buffers`` (rank 0's values, synced
    at the first forward after the freeze, constant afterwards). Sharded strategies (FSDP, DeepSpeed, model
    parallel) are refused in ``setup``.

    Logging (global rank 0): ``freeze/frozen_fraction`` (fraction of the LightningModule's
    parameters frozen) and ``freeze/frozen_units`` against the global step, through every logger
    of the Trainer, at train start and at every freeze; a TensorBoard text entry
    ``freeze/events`` saying which unit froze, at which step and why; a ``rank_zero_info`` line
    per freeze. Works without a logger.

    Args:
        schedule: a :class:`~lightning_repsim.callbacks.freeze_schedules.FreezeSchedule`, or
            ``"linear"``, ``"cubic"``, ``"similarity"`` (each with its defaults) or a dict
            ``{unit or glob: time}`` (see above). In LightningCLI YAML a schedule object is a
            ``class_path`` / ``init_args`` entry.
        units: depth-ordered module paths, each one unit; ``None`` discovers the blocks (see above).
        train_bn: keep the BatchNorm layers of frozen units in training mode (their affine
            parameters are still frozen, their running statistics keep updating).
        freeze_last: allow the last unit to freeze too, i.e. the whole network.
        verbose: print one ``rank_zero_info`` line per freeze.

    Raises:
        RepSimValueError: a bad argument here; in ``setup``: a fraction-based schedule with
            unbounded training, a DDP strategy without ``find_unused_parameters=True``, a sharded
            strategy; at the first batch: a model in which no block holds parameters, a schedule
            naming unknown units, or one that would freeze every unit without ``freeze_last=True``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> import pytorch_lightning as pl
        >>> class Net(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        ...         self.head = nn.Linear(8, 2)
        ...     def forward(self, x):
        ...         return self.head(self.body(x))
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return nn.functional.cross_entropy(self(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        >>> data = DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,))), batch_size=8)
        >>> freeze = FreezeTraining(schedule="linear")
        >>> trainer = pl.Trainer(max_steps=24, callbacks=[freeze], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Net(), data)
        >>> freeze.units  # body.0 with its ReLU, body.2, head
        ['body.0', 'body.2', 'head']
        >>> freeze.unit_modules["body.0"]
        ['body.0', 'body.1']
        >>> freeze.frozen_units  # body.0 froze at step 8, body.2 at step 16
        ['body.0', 'body.2']
        >>> [(event["unit"], event["step"]) for event in freeze.events]
        [('body.0', 8), ('body.2', 16)]
    """

    def __init__(
        self,
        schedule: FreezeSchedule | dict[str, ScheduleValue] | str = "linear",
        units: list[str] | None = None,
        train_bn: bool = False,
        freeze_last: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.schedule = as_schedule(schedule)
        units = check_units_argument(units)
        self.train_bn = train_bn
        self.freeze_last = freeze_last
        self.verbose = verbose
        self._requested_units = units

        # state that travels in checkpoints (with the schedule's own)
        self._units: list[str] | None = units
        self._blocks: dict[str, Block] = {} if units is None else single_blocks(units)
        self._frozen: list[str] = []
        self._events: list[dict[str, Any]] = []

        # per-fit runtime
        self._module: pl.LightningModule | None = None
        self._logged: tuple[int, dict[str, float]] | None = None  # the last values logged, and their step
        self._frozen_params: list[nn.Parameter] = []
        self._frozen_bn: list[_BatchNorm] = []

    # ------------------------------------------------------------------ public read-only views

    @property
    def units(self) -> list[str] | None:
        """The depth-ordered units (``None`` until discovered at the first training batch)."""
        return None if self._units is None else list(self._units)

    @property
    def unit_modules(self) -> dict[str, list[str]]:
        """``{unit: the module paths that freeze with it}`` (empty until the units are known)."""
        return {unit: list(self._block(unit).modules) for unit in self._units or []}

    def unit_output(self, unit: str) -> str:
        """The module whose output stands for ``unit`` (the last module of its block)."""
        return self._block(unit).output

    def _block(self, unit: str) -> Block:
        return self._blocks.get(unit) or Block(unit, (unit,), unit)

    @property
    def frozen_units(self) -> list[str]:
        """The frozen units, in the order they froze."""
        return list(self._frozen)

    @property
    def events(self) -> list[dict[str, Any]]:
        """One dict per freeze: ``unit``, ``step``, ``epoch``, ``reason``."""
        return [dict(e) for e in self._events]

    @property
    def history(self) -> list[dict[str, Any]]:
        """Similarity schedule: one ``{"step": int, "values": {unit: cka}}`` per check (else empty)."""
        return self.schedule.history if isinstance(self.schedule, SimilaritySchedule) else []

    # ------------------------------------------------------------------ external similarity feed

    def update_similarity(self, step: int, values: Mapping[str, float]) -> None:
        """Feed one similarity check from outside (e.g. a ``RepresentationSimilarity`` callback).

        Each call counts as one check of the similarity schedule: ``values[name]`` is the
        similarity of a layer's representation with its representation at the previous check
        (1 = unchanged). A unit's value is the smallest of the values given for the unit itself
        or any layer inside it (keys ``"unit"`` or ``"unit.*"``, or one of :attr:`unit_modules` or a layer
        inside one; RepresentationSimilarity's default layers are the units themselves); names outside every unit are
        ignored, NaN counts as "changed". Values are queued and taken into account before the
        next training batch.

        Call it on every rank, as a callback hook naturally does: under DDP the values of global
        rank 0 are broadcast to all ranks so that every rank freezes the same units.

        Args:
            step: the global step the values belong to (recorded in :attr:`history`).
            values: ``{layer or unit name: similarity}``.

        Raises:
            RepSimValueError: when the schedule is not ``SimilaritySchedule(source="external")``.

        Example:
            >>> from lightning_repsim.callbacks import SimilaritySchedule
            >>> freeze = FreezeTraining(schedule=SimilaritySchedule(source="external", patience=2))
            >>> freeze.update_similarity(100, {"features.0": 0.995, "features.3": 0.91})
        """
        if not (isinstance(self.schedule, SimilaritySchedule) and self.schedule.source == "external"):
            raise RepSimValueError(
                "update_similarity() feeds the similarity schedule from outside; create the callback with "
                f"schedule=SimilaritySchedule(source='external') (got schedule={self.schedule!r})."
            )
        self.schedule.feed(step, values)

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._module = pl_module
        self._logged = None
        require_unused_parameter_search(trainer.strategy)
        if self.schedule.uses_fractions:
            check_bounded_training(trainer, self.schedule)
        if self._units is not None:
            self._validate_units(pl_module, self._units)
            self.schedule.check(self._units, self.freeze_last)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._module = pl_module
        require_unused_parameter_search(trainer.strategy)  # the wrapped model now says what DDP was given
        if self._units is not None:
            # BatchNorm eval mode waits for on_train_start: Lightning warns about modules in eval mode
            # between the two hooks (a resume re-freezing units is intentional, not a user mistake)
            self._apply(pl_module, modes=False)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._module = pl_module
        if self._units is not None:
            self.schedule.start(trainer, self._units, self.freeze_last)
            self._apply(pl_module)
            self._log_metrics(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._units is None:
            self._discover(pl_module, batch)
            self.schedule.start(trainer, self.units or [], self.freeze_last)
            self._log_metrics(trainer)
        self.schedule.collect(self, trainer, batch)
        self._advance(trainer, pl_module, "batch_start")
        self._apply(pl_module)
        if self._frozen and not any(p.requires_grad for p in pl_module.parameters()):
            raise RepSimError(
                "FreezeTraining: every parameter of the LightningModule is frozen, so this training step has "
                "nothing to train (its loss would not require grad). The callback asked the Trainer to stop; "
                "min_steps / min_epochs keep it running. Lower them or leave freeze_last=False."
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Freezes due after this step take effect before the next batch; deciding here lets
        # ModelCheckpoint (which runs after us) save them and lets `should_stop` end training in time.
        if self._units is not None:
            self._advance(trainer, pl_module, "batch_end")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._units is not None:
            self._advance(trainer, pl_module, "epoch_end")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_modes()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for param in self._frozen_params:
            param.grad = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "units": self._units,
            "blocks": {u: {"modules": list(b.modules), "output": b.output} for u, b in self._blocks.items()},
            "frozen": list(self._frozen),
            "events": [dict(e) for e in self._events],
            **self.schedule.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._units, self._blocks, self._frozen = restored_units(state_dict, self._requested_units)
        self._events = [dict(e) for e in state_dict.get("events", [])]
        self.schedule.load_state_dict(state_dict)

    # ------------------------------------------------------------------ overridable pieces

    def batch_inputs(self, batch: Any) -> torch.Tensor:
        """The model inputs in a training batch: the batch itself when it is a tensor, its first
        element for ``(x, y)`` batches, ``"input"`` / ``"inputs"`` / ``"x"`` or the first tensor of a
        mapping. Override for other batch layouts."""
        return Probe._batch_inputs(batch)

    def probe_forward(self, pl_module: pl.LightningModule, inputs: torch.Tensor) -> Any:
        """Run the model on ``inputs`` (unit discovery and similarity probe); default ``pl_module(inputs)``."""
        return pl_module(inputs)

    # ------------------------------------------------------------------ discovery and freezing

    def _validate_units(self, pl_module: pl.LightningModule, units: list[str]) -> None:
        check_units(pl_module, {unit: self._block(unit).modules for unit in units})

    def _discover(self, pl_module: pl.LightningModule, batch: Any) -> None:
        inputs = self.batch_inputs(batch)[:2]
        blocks = discover_blocks(pl_module, lambda: self.probe_forward(pl_module, inputs), inputs.device)
        units = [block.name for block in blocks]
        self._blocks = {block.name: block for block in blocks}
        self._validate_units(pl_module, units)
        self.schedule.check(units, self.freeze_last)
        self._units = units

    def _advance(self, trainer: pl.Trainer, pl_module: pl.LightningModule, point: str) -> None:
        assert self._units is not None
        eligible = list(self._units) if self.freeze_last else list(self._units[:-1])
        new = self.schedule.due(point, self, trainer, pl_module, list(self._frozen), eligible)
        if new:
            self._freeze(trainer, pl_module, new)

    def _freeze(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reasons: dict[str, str]) -> None:
        step, epoch = trainer.global_step, trainer.current_epoch
        for unit, reason in reasons.items():
            self._frozen.append(unit)
            self._events.append({"unit": unit, "step": step, "epoch": epoch, "reason": reason})
        self._apply(pl_module)
        fraction = self._frozen_fraction(pl_module)
        if self.verbose:
            for unit, reason in reasons.items():
                rank_zero_info(
                    f"FreezeTraining: froze {unit!r} at step {step} (epoch {epoch}): {reason}; "
                    f"{len(self._frozen)} unit(s), {100 * fraction:.1f}% of parameters frozen."
                )
        self._log_metrics(trainer, list(reasons.items()))
        if not any(p.requires_grad for p in pl_module.parameters()):
            rank_zero_info("FreezeTraining: every parameter is frozen; asking the Trainer to stop.")
            trainer.should_stop = True

    def _apply(self, pl_module: pl.LightningModule, *, modes: bool = True) -> None:
        """(Re-)apply the frozen set: requires_grad=False, and BatchNorm eval mode unless ``modes=False``."""
        paths = (path for unit in self._frozen for path in self._block(unit).modules)
        self._frozen_params, self._frozen_bn = freeze_modules(pl_module, paths, self.train_bn)
        if modes:
            self._apply_modes()

    def _apply_modes(self) -> None:
        for bn in self._frozen_bn:
            bn.eval()

    def _frozen_fraction(self, pl_module: pl.LightningModule) -> float:
        total = count_parameters(pl_module.parameters())
        return count_parameters(self._frozen_params) / total if total else 0.0

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._units is not None:
            self._log_metrics(trainer)  # the curves reach the last step

    def _log_metrics(self, trainer: pl.Trainer, events: list[tuple[str, str]] | None = None) -> None:
        """``freeze/frozen_fraction`` and ``freeze/frozen_units`` as true step plots: at a change, the old
        value once more at the step before, so that a logger's line jumps instead of ramping between events.

        A logger that fails (a full disk, a dead writer) costs a warning, never the fit.
        """
        if not trainer.is_global_zero or self._module is None:
            return
        step = trainer.global_step
        metrics = {
            "freeze/frozen_fraction": self._frozen_fraction(self._module),
            "freeze/frozen_units": float(len(self._frozen)),
        }
        points = []
        if self._logged is not None and self._logged[1] != metrics and self._logged[0] < step - 1:
            points.append((step - 1, self._logged[1]))
        if self._logged is None or self._logged != (step, metrics):
            points.append((step, metrics))
        self._logged = (step, metrics)
        text = "\n".join(
            f"step {step} (epoch {trainer.current_epoch}): froze `{unit}` ({why})" for unit, why in events or []
        )
        log_freeze_state(trainer.loggers, points, text, step)
