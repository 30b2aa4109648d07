r"""
Freeze training
^^^^^^^^^^^^^^^

Progressive freezing by depth (Raghu et al. 2017; FreezeOut, Brock et al. 2017; used by
Thompson et al. 2019): during training the network's units are frozen one by one from the input
side until only the top trains. A frozen unit really stops changing, its backward compute is
saved, and the frozen set survives resume and DDP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

import pytorch_lightning as pl
from pytorch_lightning.callbacks.callback import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_repsim.capture import Probe, capture, eval_mode, execution_order, name_matches
from lightning_repsim.errors import RepSimError, RepSimValueError
from lightning_repsim.functional import cka, gram_linear

__all__ = ["FreezeTraining"]

_SCHEDULES = ("linear", "cubic", "similarity")
_SOURCES = ("probe", "external")
_STATE_VERSION = 1
_PROBE_CHUNK = 256  # examples per probe forward; fixed so that results do not depend on the batch size

ScheduleValue = Union[int, float, str, None]


class _Trigger:
    """When one unit freezes: ``kind`` is ``"step"``, ``"epoch"`` or ``"fraction"``."""

    __slots__ = ("kind", "value")

    def __init__(self, kind: str, value: Union[int, float]) -> None:
        self.kind = kind
        self.value = value

    def __repr__(self) -> str:
        return f"{self.kind}:{self.value}"


def _parse_trigger(key: str, value: ScheduleValue) -> Optional[_Trigger]:
    """One value of a dict schedule: int = step, float in [0, 1] = fraction, "epoch:N" / "step:N" / "fraction:F"."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise RepSimValueError(f"schedule[{key!r}] = {value!r}: a bool is not a freeze time; {_DICT_HELP}")
    if isinstance(value, int):
        if value < 0:
            raise RepSimValueError(f"schedule[{key!r}] = {value}: a step must be >= 0.")
        return _Trigger("step", value)
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise RepSimValueError(
                f"schedule[{key!r}] = {value}: a float is a fraction of training and must lie in [0, 1]; "
                f"write an int ({int(value)}) for a step or 'epoch:{int(value)}' for an epoch."
            )
        return _Trigger("fraction", value)
    if isinstance(value, str):
        kind, sep, number = value.partition(":")
        kind = kind.strip().lower()
        if sep and kind in ("step", "epoch"):
            try:
                parsed = int(number)
            except ValueError:
                parsed = -1
            if parsed >= 0:
                return _Trigger(kind, parsed)
        if sep and kind in ("fraction", "frac"):
            try:
                fraction = float(number)
            except ValueError:
                fraction = -1.0
            if 0.0 <= fraction <= 1.0:
                return _Trigger("fraction", fraction)
    raise RepSimValueError(f"schedule[{key!r}] = {value!r} is not a freeze time; {_DICT_HELP}")


_DICT_HELP = (
    "use an int for a global step (100), a float in [0, 1] for a fraction of "
    "trainer.estimated_stepping_batches (0.5), or a string 'step:100', 'epoch:3' or 'fraction:0.5'."
)


class FreezeTraining(Callback):
    r"""Freeze the network's units one by one, input side first, until only the top trains.

    A *unit* is a module path of the LightningModule (``"features.0"``, ``"encoder.layer1"``).
    Units are ordered by depth; by default they are the model's top-level blocks that hold
    parameters, in the order they first execute
    (:func:`lightning_repsim.capture.execution_order` with ``top_level=True``, run once on the
    inputs of the first training batch, in eval mode, without gradients and with the RNG
    untouched). A LightningModule whose only such block is one wrapped network
    (``self.net = Net()``) is looked through: the units are then ``Net``'s top-level blocks.
    The last unit never freezes unless ``freeze_last=True``.

    Schedules (:math:`i = 1, \dots, L` counts the units from the input side, :math:`T` is
    ``trainer.estimated_stepping_batches``; a unit freezes once ``trainer.global_step`` reaches its
    time):

    * ``"linear"`` (Raghu et al. 2017): unit :math:`i` freezes at
      :math:`\lfloor T\,(s + (e - s)\, i / L)\rfloor` with ``s = start``, ``e = end``; with the
      defaults, unit 1 of 4 at 25 % of training, unit 2 at 50 %, unit 3 at 75 %.
    * ``"cubic"`` (FreezeOut, Brock et al. 2017): the linear position cubed,
      :math:`T\,(s + (e - s)\, i / L)^3`; with ``end=1`` this is FreezeOut's
      :math:`t_i = (t_0 + (1 - t_0)\, i / L)^3` with :math:`t_0` = ``start``.
    * a dict ``{unit name or glob: time}``: an ``int`` is a global (optimizer) step, a ``float``
      in [0, 1] a fraction of :math:`T`, a string ``"step:N"``, ``"epoch:N"`` (frozen from the
      start of 0-based epoch N) or ``"fraction:F"`` says it explicitly (YAML: ``1`` is step 1,
      ``1.0`` is the end of training). An exact unit name wins over a glob; otherwise the first
      matching key in the dict's order wins. Units not matched never freeze. Keys matching no
      unit raise :class:`~lightning_repsim.errors.RepSimValueError`.
    * ``"similarity"``: freeze the lowest still-trainable unit once its representation has
      stopped changing: the linear CKA of its output on a fixed probe set between consecutive
      checks stays ``>= threshold`` for ``patience`` consecutive checks. At most one unit
      freezes per check; the frozen set is always a contiguous prefix. The probe is ``probe``
      or the inputs of the first ``probe_size`` training examples (collected from the first
      training batches, no extra data loading). Every ``check_every_n_steps`` optimizer steps
      (every epoch when ``None``) the probe runs through the model in eval mode without
      gradients; each unit's output becomes ``(n, p)`` features
      (:func:`lightning_repsim.capture.reduce_output`: conv maps average-pooled to at most
      ``max_features`` columns, then flattened), and its Gram matrix is compared with the one
      of the previous check by linear CKA in float64
      (:func:`lightning_repsim.functional.cka`). With ``similarity_source="external"`` no probe
      runs; another callback feeds the values through :meth:`update_similarity`.

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

    Resume: :meth:`state_dict` holds the units, the frozen set, the freeze events and the
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
        schedule: ``"linear"``, ``"cubic"``, ``"similarity"`` or a dict ``{unit or glob: time}``
            (see above).
        start: fraction of training where the linear / cubic schedule begins.
        end: fraction of training where it ends (where unit ``L`` would freeze).
        units: depth-ordered module paths; ``None`` discovers them (see above).
        train_bn: keep the BatchNorm layers of frozen units in training mode (their affine
            parameters are still frozen, their running statistics keep updating).
        freeze_last: allow the last unit to freeze too, i.e. the whole network.
        threshold: similarity schedule: CKA at or above which a unit counts as unchanged.
        patience: similarity schedule: consecutive checks above ``threshold`` before freezing.
        check_every_n_steps: similarity schedule: optimizer steps between checks; ``None``
            checks at the end of every training epoch.
        probe: similarity schedule: a fixed tensor of model inputs (rows are examples).
        probe_size: similarity schedule: examples collected from the first training batches
            when ``probe`` is ``None``.
        similarity_source: ``"probe"`` (internal probe pass) or ``"external"``
            (:meth:`update_similarity` only).
        max_features: cap on the columns of a conv unit's features (see
            :func:`~lightning_repsim.capture.reduce_output`).
        verbose: print one ``rank_zero_info`` line per freeze.

    Raises:
        RepSimValueError: a bad argument here; in ``setup``: a fraction-based schedule with
            unbounded training, a DDP strategy without ``find_unused_parameters=True``, a sharded
            strategy; at the first batch: a schedule naming unknown units, or one that would
            freeze every unit without ``freeze_last=True``.

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
        >>> freeze.units
        ['body.0', 'body.2', 'head']
        >>> freeze.frozen_units  # body.0 froze at step 8, body.2 at step 16
        ['body.0', 'body.2']
        >>> [(event["unit"], event["step"]) for event in freeze.events]
        [('body.0', 8), ('body.2', 16)]
    """

    def __init__(
        self,
        schedule: Union[str, dict[str, ScheduleValue]] = "linear",
        start: float = 0.0,
        end: float = 1.0,
        units: Optional[list[str]] = None,
        train_bn: bool = False,
        freeze_last: bool = False,
        threshold: float = 0.99,
        patience: int = 3,
        check_every_n_steps: Optional[int] = 50,
        probe: Optional[torch.Tensor] = None,
        probe_size: int = 256,
        similarity_source: str = "probe",
        max_features: int = 4096,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(schedule, str):
            if schedule not in _SCHEDULES:
                raise RepSimValueError(
                    f"schedule={schedule!r} is not known; use one of {list(_SCHEDULES)} or a dict {{unit: time}}."
                )
        elif isinstance(schedule, Mapping):
            if not schedule:
                raise RepSimValueError("schedule is an empty dict; name at least one unit (or glob) to freeze.")
            for key, value in schedule.items():
                if not isinstance(key, str):
                    raise RepSimValueError(f"schedule keys are unit names or globs; got {key!r}.")
                _parse_trigger(key, value)
            schedule = dict(schedule)
        else:
            raise RepSimValueError(
                f"schedule must be 'linear', 'cubic', 'similarity' or a dict; got {type(schedule).__name__}."
            )
        if not (0.0 <= start <= end <= 1.0):
            raise RepSimValueError(f"Need 0 <= start <= end <= 1 (fractions of training); got start={start}, end={end}.")
        if units is not None:
            if isinstance(units, str) or not all(isinstance(u, str) for u in units):
                raise RepSimValueError(f"units must be a list of module paths; got {units!r}.")
            if len(set(units)) != len(units):
                raise RepSimValueError(f"units contains duplicates: {units!r}.")
            if not units:
                raise RepSimValueError("units is empty; pass None to discover the top-level blocks.")
            units = list(units)
        if not 0.0 < threshold <= 1.0:
            raise RepSimValueError(f"threshold must lie in (0, 1] (a CKA value); got {threshold}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise RepSimValueError(f"patience must be a positive int; got {patience!r}.")
        if check_every_n_steps is not None and (
            isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int) or check_every_n_steps < 1
        ):
            raise RepSimValueError(f"check_every_n_steps must be a positive int or None; got {check_every_n_steps!r}.")
        if isinstance(probe_size, bool) or not isinstance(probe_size, int) or probe_size < 2:
            raise RepSimValueError(f"probe_size must be an int >= 2 (CKA needs examples); got {probe_size!r}.")
        if probe is not None and (not isinstance(probe, torch.Tensor) or probe.ndim == 0 or probe.shape[0] < 2):
            raise RepSimValueError("probe must be a tensor of model inputs with at least 2 rows (examples).")
        if similarity_source not in _SOURCES:
            raise RepSimValueError(f"similarity_source must be one of {list(_SOURCES)}; got {similarity_source!r}.")

        self.schedule = schedule
        self.start = float(start)
        self.end = float(end)
        self.train_bn = train_bn
        self.freeze_last = freeze_last
        self.threshold = float(threshold)
        self.patience = patience
        self.check_every_n_steps = check_every_n_steps
        self.probe_size = probe_size
        self.similarity_source = similarity_source
        self.max_features = max_features
        self.verbose = verbose
        self._requested_units = units

        # state that travels in checkpoints
        self._units: Optional[list[str]] = units
        self._frozen: list[str] = []
        self._events: list[dict[str, Any]] = []
        self._streaks: dict[str, int] = {}
        self._history: list[dict[str, Any]] = []
        self._last_check: Optional[int] = None  # step (or epoch) of the last similarity check
        self._probe: Optional[torch.Tensor] = None if probe is None else probe.detach().cpu().clone()
        self._probe_given = probe is not None
        self._reference: dict[str, torch.Tensor] = {}

        # per-fit runtime
        self._module: Optional[pl.LightningModule] = None
        self._trainer: Optional[pl.Trainer] = None
        self._triggers: dict[str, _Trigger] = {}
        self._steps: dict[str, Optional[int]] = {}
        self._frozen_params: list[nn.Parameter] = []
        self._frozen_bn: list[_BatchNorm] = []
        self._probe_chunks: list[torch.Tensor] = []
        self._feeds: list[tuple[int, dict[str, float]]] = []

    # ------------------------------------------------------------------ public read-only views

    @property
    def units(self) -> Optional[list[str]]:
        """The depth-ordered units (``None`` until discovered at the first training batch)."""
        return None if self._units is None else list(self._units)

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
        """Similarity schedule: one ``{"step": int, "values": {unit: cka}}`` per check."""
        return [{"step": h["step"], "values": dict(h["values"])} for h in self._history]

    # ------------------------------------------------------------------ external similarity feed

    def update_similarity(self, step: int, values: Mapping[str, float]) -> None:
        """Feed one similarity check from outside (e.g. a ``RepresentationSimilarity`` callback).

        Each call counts as one check of the similarity schedule: ``values[name]`` is the
        similarity of a layer's representation with its representation at the previous check
        (1 = unchanged). A unit's value is the smallest of the values given for the unit itself
        or any layer inside it (keys ``"unit"`` or ``"unit.*"``); names outside every unit are
        ignored, NaN counts as "changed". Values are queued and taken into account before the
        next training batch.

        Call it on every rank, as a callback hook naturally does: under DDP the values of global
        rank 0 are broadcast to all ranks so that every rank freezes the same units.

        Args:
            step: the global step the values belong to (recorded in :attr:`history`).
            values: ``{layer or unit name: similarity}``.

        Raises:
            RepSimValueError: when the schedule is not ``"similarity"`` with
                ``similarity_source="external"``.

        Example:
            >>> freeze = FreezeTraining(schedule="similarity", similarity_source="external", patience=2)
            >>> freeze.update_similarity(100, {"features.0": 0.995, "features.3": 0.91})
        """
        if self.schedule != "similarity" or self.similarity_source != "external":
            raise RepSimValueError(
                "update_similarity() feeds the similarity schedule from outside; create the callback with "
                f"schedule='similarity', similarity_source='external' (got schedule={self.schedule!r}, "
                f"similarity_source={self.similarity_source!r})."
            )
        self._feeds.append((int(step), {str(k): float(v) for k, v in values.items()}))

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        self._trainer, self._module = trainer, pl_module
        self._check_strategy(trainer)
        if self._uses_fractions():
            total = trainer.estimated_stepping_batches
            if not self._bounded(total):
                raise RepSimValueError(
                    f"FreezeTraining(schedule={self._schedule_label()}) places freezes at fractions of training, but "
                    f"the training length is unbounded (trainer.estimated_stepping_batches = {total}, max_epochs="
                    f"{trainer.max_epochs}, max_steps={trainer.max_steps}). Set max_steps (or max_epochs with a "
                    "sized dataloader), or give the schedule in steps: a dict {unit: step} or {unit: 'epoch:N'}."
                )
        if self._units is not None:
            self._validate_units(pl_module, self._units)
            if isinstance(self.schedule, dict):
                self._match_dict(self._units)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._trainer, self._module = trainer, pl_module
        if self._units is not None:
            # BatchNorm eval mode waits for on_train_start: Lightning warns about modules in eval mode
            # between the two hooks (a resume re-freezing units is intentional, not a user mistake)
            self._apply(pl_module, modes=False)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._trainer, self._module = trainer, pl_module
        self._probe_chunks = []
        if self._units is not None:
            self._resolve(trainer)
            self._apply(pl_module)
            self._log_metrics(trainer)

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        if self._units is None:
            self._discover(trainer, pl_module, batch)
            self._resolve(trainer)
            self._log_metrics(trainer)
        if self.schedule == "similarity" and self.similarity_source == "probe":
            self._collect_probe(trainer, batch)
            if self._check_due(trainer, at_epoch_end=False):
                self._probe_check(trainer, pl_module, at_epoch_end=False)
        self._consume_feeds(trainer)
        self._advance(trainer, pl_module, epoch=trainer.current_epoch)
        self._apply(pl_module)
        if self._frozen and not any(p.requires_grad for p in pl_module.parameters()):
            raise RepSimError(
                "FreezeTraining: every parameter of the LightningModule is frozen, so this training step has "
                "nothing to train (its loss would not require grad). The callback asked the Trainer to stop; "
                "min_steps / min_epochs keep it running. Lower them or leave freeze_last=False."
            )

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Freezes due after this step take effect before the next batch; deciding here lets
        # ModelCheckpoint (which runs after us) save them and lets `should_stop` end training in time.
        if self._units is None:
            return
        if self.schedule == "similarity" and self.similarity_source == "probe":
            if self._check_due(trainer, at_epoch_end=False):
                self._probe_check(trainer, pl_module, at_epoch_end=False)
        self._consume_feeds(trainer)
        self._advance(trainer, pl_module, epoch=trainer.current_epoch)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._units is None:
            return
        if self.schedule == "similarity" and self.similarity_source == "probe":
            if self._check_due(trainer, at_epoch_end=True):
                self._probe_check(trainer, pl_module, at_epoch_end=True)
        self._consume_feeds(trainer)
        self._advance(trainer, pl_module, epoch=trainer.current_epoch + 1)

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._apply_modes()

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
    ) -> None:
        for param in self._frozen_params:
            param.grad = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "units": self._units,
            "frozen": list(self._frozen),
            "events": [dict(e) for e in self._events],
            "streaks": dict(self._streaks),
            "history": self.history,
            "last_check": self._last_check,
            "probe": self._probe,
            "reference": dict(self._reference),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        units = state_dict.get("units")
        if self._requested_units is not None and units is not None and list(units) != self._requested_units:
            rank_zero_warn(
                f"FreezeTraining: the checkpoint was written with units {units}, this callback has "
                f"{self._requested_units}; keeping this callback's units."
            )
            units = self._requested_units
        frozen = list(state_dict.get("frozen", []))
        if units is not None:
            unknown = [u for u in frozen if u not in units]
            if unknown:
                raise RepSimValueError(
                    f"FreezeTraining: the checkpoint's frozen units {unknown} are not among the units {units}."
                )
        self._units = None if units is None else list(units)
        self._frozen = frozen
        self._events = [dict(e) for e in state_dict.get("events", [])]
        self._streaks = dict(state_dict.get("streaks", {}))
        self._history = [{"step": h["step"], "values": dict(h["values"])} for h in state_dict.get("history", [])]
        self._last_check = state_dict.get("last_check")
        if not self._probe_given and state_dict.get("probe") is not None:
            self._probe = state_dict["probe"].cpu()
        self._reference = {k: v for k, v in state_dict.get("reference", {}).items()}

    # ------------------------------------------------------------------ overridable pieces

    def batch_inputs(self, batch: Any) -> torch.Tensor:
        """The model inputs in a training batch: the batch itself when it is a tensor, its first
        element for ``(x, y)`` batches, ``"input"`` / ``"inputs"`` / ``"x"`` or the first tensor of a
        mapping. Override for other batch layouts."""
        return Probe._batch_inputs(batch)

    def probe_forward(self, pl_module: "pl.LightningModule", inputs: torch.Tensor) -> Any:
        """Run the model on ``inputs`` (unit discovery and similarity probe); default ``pl_module(inputs)``."""
        return pl_module(inputs)

    # ------------------------------------------------------------------ configuration checks

    def _schedule_label(self) -> str:
        return repr(self.schedule) if isinstance(self.schedule, str) else "{...}"

    def _uses_fractions(self) -> bool:
        if self.schedule in ("linear", "cubic"):
            return True
        if isinstance(self.schedule, dict):
            return any(
                (t := _parse_trigger(k, v)) is not None and t.kind == "fraction" for k, v in self.schedule.items()
            )
        return False

    @staticmethod
    def _bounded(total: Union[int, float]) -> bool:
        return isinstance(total, (int, float)) and math.isfinite(total) and total > 0

    def _check_strategy(self, trainer: "pl.Trainer") -> None:
        from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

        sharded: tuple[type, ...] = (DeepSpeedStrategy, FSDPStrategy)
        try:
            from pytorch_lightning.strategies import ModelParallelStrategy

            sharded += (ModelParallelStrategy,)
        except ImportError:  # pragma: no cover - older Lightning
            pass
        strategy = trainer.strategy
        if isinstance(strategy, sharded):
            raise RepSimValueError(
                f"FreezeTraining does not support the sharded strategy {type(strategy).__name__}: parameters are "
                "flattened and sharded across ranks, so units cannot be frozen one by one. Use strategy='ddp_find_"
                "unused_parameters_true' (or a single device), or remove the callback."
            )
        if isinstance(strategy, DDPStrategy):
            kwargs = getattr(strategy, "_ddp_kwargs", {}) or {}
            if not kwargs.get("find_unused_parameters", False) or kwargs.get("static_graph", False):
                raise RepSimValueError(
                    "FreezeTraining freezes units after DDP has wrapped the model; DDP then waits for gradients of "
                    "the frozen parameters that never come and Lightning stops with 'parameters that were not used "
                    "in producing the loss'. Create the Trainer with strategy='ddp_find_unused_parameters_true' (or "
                    "'ddp_spawn_find_unused_parameters_true'), or strategy=DDPStrategy(find_unused_parameters=True)"
                    + (" and without static_graph=True" if kwargs.get("static_graph", False) else "")
                    + "."
                )

    def _validate_units(self, pl_module: "pl.LightningModule", units: list[str]) -> None:
        modules = dict(pl_module.named_modules())
        missing = [u for u in units if u not in modules or u == ""]
        if missing:
            raise RepSimValueError(
                f"FreezeTraining: units {missing} are not submodules of {type(pl_module).__name__}; "
                f"available top-level modules: {[n for n, _ in pl_module.named_children()]}."
            )
        for a in units:
            for b in units:
                if a != b and b.startswith(a + "."):
                    raise RepSimValueError(f"FreezeTraining: unit {b!r} lies inside unit {a!r}; units must not nest.")
        empty = [u for u in units if next(modules[u].parameters(), None) is None]
        if empty:
            rank_zero_warn(f"FreezeTraining: units {empty} hold no parameters; freezing them changes nothing.")

    # ------------------------------------------------------------------ discovery and schedule

    def _discover(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> None:
        inputs = self.batch_inputs(batch)[:2]

        def forward() -> Any:
            return self.probe_forward(pl_module, inputs)

        root: nn.Module = pl_module
        prefix = ""
        try:
            with eval_mode(pl_module), _isolated_rng(inputs.device):
                units = execution_order(pl_module, forward, top_level=True)
                # look through a single wrapped network (self.net = Net())
                while len(units) == 1 and _has_param_children(root.get_submodule(units[0])):
                    prefix = prefix + units[0] + "."
                    root = root.get_submodule(units[0])
                    units = execution_order(root, forward, top_level=True)
        except RepSimError:
            raise
        except Exception as err:
            raise RepSimValueError(
                f"FreezeTraining could not run {type(pl_module).__name__} on the inputs of the first training batch "
                f"to find its units ({type(err).__name__}: {err}). Pass units=[...] explicitly, or override "
                "FreezeTraining.batch_inputs / probe_forward."
            ) from err
        units = [prefix + u for u in units]
        if not units:
            raise RepSimValueError(
                f"FreezeTraining found no block with parameters in {type(pl_module).__name__}; pass units=[...]."
            )
        self._units = units
        self._validate_units(pl_module, units)

    def _eligible(self) -> list[str]:
        assert self._units is not None
        return list(self._units) if self.freeze_last else list(self._units[:-1])

    def _resolve(self, trainer: "pl.Trainer") -> None:
        """Turn the schedule into per-unit triggers and freeze steps for this fit."""
        units = self._units
        assert units is not None
        triggers: dict[str, _Trigger] = {}
        if self.schedule in ("linear", "cubic"):
            count = len(units)
            for i, unit in enumerate(units, start=1):
                position = self.start + (self.end - self.start) * i / count
                triggers[unit] = _Trigger("fraction", position**3 if self.schedule == "cubic" else position)
            if not self.freeze_last:
                triggers.pop(units[-1])
            if not triggers:
                rank_zero_warn(
                    f"FreezeTraining: only one unit ({units}) and freeze_last=False, so nothing will freeze; "
                    "pass units=[...] with several depth-ordered blocks."
                )
        elif isinstance(self.schedule, dict):
            triggers = self._match_dict(units)
        self._triggers = triggers
        total = trainer.estimated_stepping_batches if any(t.kind == "fraction" for t in triggers.values()) else None
        steps: dict[str, Optional[int]] = {}
        for unit, trigger in triggers.items():
            if trigger.kind == "step":
                steps[unit] = int(trigger.value)
            elif trigger.kind == "fraction":
                if not self._bounded(total):  # pragma: no cover - caught in setup
                    raise RepSimValueError(f"FreezeTraining: cannot place fractions in unbounded training ({total}).")
                steps[unit] = int(math.floor(trigger.value * total + 1e-9))
            else:
                steps[unit] = None  # epoch trigger
        self._steps = steps

    def _match_dict(self, units: list[str]) -> dict[str, _Trigger]:
        assert isinstance(self.schedule, dict)
        parsed = {key: _parse_trigger(key, value) for key, value in self.schedule.items()}
        unmatched = [k for k in parsed if not any(name_matches(u, k) for u in units)]
        if unmatched:
            raise RepSimValueError(
                f"FreezeTraining: schedule names {unmatched}, which match none of the units {units}. "
                "Use these names (or globs over them), or pass units=[...]."
            )
        triggers: dict[str, _Trigger] = {}
        for unit in units:
            if unit in parsed:
                trigger = parsed[unit]
            else:
                key = next((k for k in parsed if name_matches(unit, k)), None)
                trigger = None if key is None else parsed[key]
            if trigger is not None:
                triggers[unit] = trigger
        if len(triggers) == len(units) and not self.freeze_last:
            raise RepSimValueError(
                f"FreezeTraining: the schedule would freeze every unit ({units}), i.e. the whole network. "
                "Pass freeze_last=True if that is what you want."
            )
        order = [u for u in units if u in triggers]
        if order != units[: len(order)]:
            rank_zero_warn(
                f"FreezeTraining: the schedule freezes {order}, which is not a prefix of the units {units}; "
                "frozen units stop changing, but backward compute is saved only for a contiguous frozen prefix."
            )
        return triggers

    def _due(self, unit: str, step: int, epoch: int) -> bool:
        trigger = self._triggers.get(unit)
        if trigger is None:
            return False
        if trigger.kind == "epoch":
            return epoch >= trigger.value
        target = self._steps.get(unit)
        return target is not None and step >= target

    def _advance(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", epoch: int) -> None:
        if self.schedule == "similarity" or self._units is None:
            return
        step = trainer.global_step
        new = [u for u in self._units if u not in self._frozen and self._due(u, step, epoch)]
        if new:
            reason = f"{self.schedule} schedule" if isinstance(self.schedule, str) else "dict schedule"
            details = {u: f"{reason} ({self._triggers[u]!r}, step {self._steps.get(u)})" for u in new}
            self._freeze(trainer, pl_module, new, details)

    # ------------------------------------------------------------------ similarity schedule

    def _collect_probe(self, trainer: "pl.Trainer", batch: Any) -> None:
        if self._probe is not None:
            return
        # every rank collects (so all agree when the probe is complete); only rank 0 measures
        inputs = self.batch_inputs(batch).detach()
        have = sum(c.shape[0] for c in self._probe_chunks)
        self._probe_chunks.append(inputs[: self.probe_size - have].cpu().clone())
        if have + self._probe_chunks[-1].shape[0] >= self.probe_size:
            self._probe = torch.cat(self._probe_chunks)
            self._probe_chunks = []

    def _check_due(self, trainer: "pl.Trainer", at_epoch_end: bool) -> bool:
        if self._probe is None:
            return False
        if self.check_every_n_steps is None:  # a reference before training, then every epoch end
            if at_epoch_end:
                return self._last_check is None or self._last_check < trainer.current_epoch
            return self._last_check is None
        step = trainer.global_step
        return not at_epoch_end and step % self.check_every_n_steps == 0 and step != self._last_check

    def _probe_check(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", at_epoch_end: bool) -> None:
        """One similarity check: rank 0 runs the probe; its values are broadcast; every rank decides alike."""
        candidates = [u for u in self._eligible() if u not in self._frozen]
        values: dict[str, float] = {}
        if trainer.is_global_zero:
            values = self._measure(pl_module, candidates)
        if trainer.world_size > 1:
            values = trainer.strategy.broadcast(values, src=0)
        if self.check_every_n_steps is None:
            self._last_check = trainer.current_epoch if at_epoch_end else trainer.current_epoch - 1
        else:
            self._last_check = trainer.global_step
        if values:  # the first check only sets the reference
            self._record(trainer, pl_module, trainer.global_step, values)

    def _measure(self, pl_module: "pl.LightningModule", candidates: list[str]) -> dict[str, float]:
        """CKA of each candidate unit's probe Gram with the previous check's; {} on the first check."""
        assert self._probe is not None
        if not candidates:
            return {}
        probe = self._probe
        device = _module_device(pl_module)
        with _isolated_rng(device):
            feats = capture(
                pl_module,
                probe,
                layers=candidates,
                batch_size=_PROBE_CHUNK,
                max_features=self.max_features,
                forward=lambda model, x: self.probe_forward(model, x),
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

    def _consume_feeds(self, trainer: "pl.Trainer") -> None:
        if self.similarity_source != "external" or self._units is None:
            return
        if not self._feeds:
            return
        feeds = self._feeds
        self._feeds = []
        if trainer.world_size > 1:  # every rank was fed at the same point (a callback hook), so all get here
            feeds = trainer.strategy.broadcast(feeds, src=0)
        pl_module = self._module
        assert pl_module is not None
        for step, raw in feeds:
            values: dict[str, float] = {}
            for unit in self._units:
                if unit in self._frozen:
                    continue
                hits = [v for k, v in raw.items() if k == unit or k.startswith(unit + ".")]
                if hits:
                    values[unit] = float("nan") if any(math.isnan(v) for v in hits) else min(hits)
            self._record(trainer, pl_module, step, values)

    def _record(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", step: int, values: dict[str, float]
    ) -> None:
        """Update patience counters with one check and freeze the lowest trainable unit if it is stable."""
        self._history.append({"step": int(step), "values": dict(values)})
        for unit, value in values.items():
            stable = not math.isnan(value) and value >= self.threshold
            self._streaks[unit] = self._streaks.get(unit, 0) + 1 if stable else 0
        lowest = next((u for u in self._eligible() if u not in self._frozen), None)
        if lowest is not None and self._streaks.get(lowest, 0) >= self.patience:
            value = values.get(lowest, float("nan"))
            why = (
                f"similarity schedule: linear CKA with the previous check >= {self.threshold} for "
                f"{self._streaks[lowest]} consecutive checks (last {value:.5f})"
            )
            self._streaks.pop(lowest, None)
            self._reference.pop(lowest, None)
            self._freeze(trainer, pl_module, [lowest], {lowest: why})

    # ------------------------------------------------------------------ freezing

    def _freeze(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", new: list[str], reasons: dict[str, str]
    ) -> None:
        step, epoch = trainer.global_step, trainer.current_epoch
        for unit in new:
            self._frozen.append(unit)
            self._events.append({"unit": unit, "step": step, "epoch": epoch, "reason": reasons[unit]})
        self._apply(pl_module)
        fraction = self._frozen_fraction(pl_module)
        if self.verbose:
            for unit in new:
                rank_zero_info(
                    f"FreezeTraining: froze {unit!r} at step {step} (epoch {epoch}): {reasons[unit]}; "
                    f"{len(self._frozen)} unit(s), {100 * fraction:.1f}% of parameters frozen."
                )
        self._log_metrics(trainer, [(unit, reasons[unit]) for unit in new])
        if not any(p.requires_grad for p in pl_module.parameters()):
            rank_zero_info("FreezeTraining: every parameter is frozen; asking the Trainer to stop.")
            trainer.should_stop = True

    def _apply(self, pl_module: "pl.LightningModule", *, modes: bool = True) -> None:
        """(Re-)apply the frozen set: requires_grad=False, and BatchNorm eval mode unless ``modes=False``."""
        params: dict[int, nn.Parameter] = {}
        bns: list[_BatchNorm] = []
        for unit in self._frozen:
            module = pl_module.get_submodule(unit)
            for param in module.parameters():
                params[id(param)] = param
            if not self.train_bn:
                bns.extend(m for m in module.modules() if isinstance(m, _BatchNorm))
        for param in params.values():
            param.requires_grad_(False)
        self._frozen_params = list(params.values())
        self._frozen_bn = bns
        if modes:
            self._apply_modes()

    def _apply_modes(self) -> None:
        for bn in self._frozen_bn:
            bn.eval()

    @staticmethod
    def _count(params: Any) -> int:
        seen: dict[int, int] = {}
        for p in params:
            seen[id(p)] = p.numel()
        return sum(seen.values())

    def _frozen_fraction(self, pl_module: "pl.LightningModule") -> float:
        total = self._count(pl_module.parameters())
        return self._count(self._frozen_params) / total if total else 0.0

    def _log_metrics(self, trainer: "pl.Trainer", events: Optional[list[tuple[str, str]]] = None) -> None:
        if not trainer.is_global_zero or self._module is None:
            return
        step = trainer.global_step
        metrics = {
            "freeze/frozen_fraction": self._frozen_fraction(self._module),
            "freeze/frozen_units": float(len(self._frozen)),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if events and isinstance(logger, TensorBoardLogger):
                text = "\n".join(
                    f"step {step} (epoch {trainer.current_epoch}): froze `{unit}` ({why})" for unit, why in events
                )
                logger.experiment.add_text("freeze/events", text, global_step=step)


def _has_param_children(module: nn.Module) -> bool:
    return any(next(child.parameters(), None) is not None for child in module.children())


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def _isolated_rng(device: torch.device) -> Any:
    """Run a side pass (discovery, probe) without consuming the training run's random numbers."""
    return torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])
