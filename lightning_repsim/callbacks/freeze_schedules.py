r"""When each unit freezes: the schedules of :class:`~lightning_repsim.callbacks.FreezeTraining`.

A schedule is a small object holding its own options. :math:`i = 1, \dots, L` counts the units
from the input side and :math:`T` is ``trainer.estimated_stepping_batches``; a unit freezes once
``trainer.global_step`` reaches its time.

* :class:`LinearSchedule` (Raghu et al. 2017): unit :math:`i` at :math:`\lfloor T\,(s + (e - s)\, i / L)\rfloor`.
* :class:`CubicSchedule` (FreezeOut, Brock et al. 2017): the linear position cubed.
* :class:`TimesSchedule`: a time per unit name or glob (steps, epochs, fractions of training).
* :class:`~lightning_repsim.callbacks.SimilaritySchedule` (in :mod:`.freeze_similarity`): the lowest
  trainable unit freezes once its representation has stopped changing.

``FreezeTraining(schedule=...)`` also takes the shorthands ``"linear"``, ``"cubic"``,
``"similarity"`` (each with its defaults) and a dict (a :class:`TimesSchedule`); see :func:`as_schedule`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning_repsim.callbacks._freezing import bounded
from lightning_repsim.capture import name_matches
from lightning_repsim.errors import RepSimValueError

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from lightning_repsim.callbacks.freeze import FreezeTraining

__all__ = ["CubicSchedule", "FreezeSchedule", "LinearSchedule", "TimesSchedule", "as_schedule"]

ScheduleValue = int | float | str | None
_DICT_HELP = (
    "use an int for a global step (100), a float in [0, 1] for a fraction of "
    "trainer.estimated_stepping_batches (0.5), or a string 'step:100', 'epoch:3' or 'fraction:0.5'."
)


class Trigger:
    """When one unit freezes: ``kind`` is ``"step"``, ``"epoch"`` or ``"fraction"``."""

    __slots__ = ("kind", "value")

    def __init__(self, kind: str, value: int | float) -> None:
        self.kind = kind
        self.value = value

    def __repr__(self) -> str:
        return f"{self.kind}:{self.value:g}" if self.kind == "fraction" else f"{self.kind}:{self.value}"


def parse_trigger(key: str, value: ScheduleValue) -> Trigger | None:
    """One value of a dict schedule: int = step, float in [0, 1] = fraction, "epoch:N" / "step:N" / "fraction:F"."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise RepSimValueError(f"schedule[{key!r}] = {value!r}: a bool is not a freeze time; {_DICT_HELP}")
    if isinstance(value, int):
        if value < 0:
            raise RepSimValueError(f"schedule[{key!r}] = {value}: a step must be >= 0.")
        return Trigger("step", value)
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise RepSimValueError(
                f"schedule[{key!r}] = {value}: a float is a fraction of training and must lie in [0, 1]; "
                f"write an int ({int(value)}) for a step or 'epoch:{int(value)}' for an epoch."
            )
        return Trigger("fraction", value)
    if isinstance(value, str):
        kind, sep, number = value.partition(":")
        kind = kind.strip().lower()
        if sep and kind in ("step", "epoch"):
            try:
                parsed = int(number)
            except ValueError:
                parsed = -1
            if parsed >= 0:
                return Trigger(kind, parsed)
        if sep and kind in ("fraction", "frac"):
            try:
                fraction = float(number)
            except ValueError:
                fraction = -1.0
            if 0.0 <= fraction <= 1.0:
                return Trigger("fraction", fraction)
    raise RepSimValueError(f"schedule[{key!r}] = {value!r} is not a freeze time; {_DICT_HELP}")


class FreezeSchedule:
    """Decides when units freeze. :class:`FreezeTraining` calls, in this order: :meth:`check` once
    the units are known, :meth:`start` at each fit, :meth:`collect` before every training batch and
    :meth:`due` at each decision point; :meth:`state_dict` travels in checkpoints.

    ``due`` returns ``{unit: reason}`` for the units to freeze now, in freezing order; ``frozen`` and
    ``eligible`` (the units allowed to freeze, depth-ordered) describe the current state.
    """

    #: shown in reasons and messages
    label = "schedule"
    #: whether freeze times are fractions of training (then training must be bounded)
    uses_fractions = False

    def check(self, units: list[str], freeze_last: bool) -> None:
        """Refuse a schedule that cannot work with these units (a configuration error)."""

    def start(self, trainer: pl.Trainer, units: list[str], freeze_last: bool) -> None:
        """Resolve the schedule for this fit."""

    def collect(self, callback: FreezeTraining, trainer: pl.Trainer, batch: Any) -> None:
        """See a training batch before it runs (the similarity schedule gathers its probe here)."""

    def due(
        self,
        point: str,
        callback: FreezeTraining,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        frozen: list[str],
        eligible: list[str],
    ) -> dict[str, str]:
        """The units to freeze now, with why; ``point`` is ``"batch_start"``, ``"batch_end"`` or ``"epoch_end"``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        pass


class _TimedSchedule(FreezeSchedule):
    """A schedule of fixed times per unit, resolved into global steps (or epochs) at each fit."""

    def __init__(self) -> None:
        self._triggers: dict[str, Trigger] = {}
        self._steps: dict[str, int | None] = {}

    def triggers(self, units: list[str], freeze_last: bool) -> dict[str, Trigger]:
        raise NotImplementedError

    def start(self, trainer: pl.Trainer, units: list[str], freeze_last: bool) -> None:
        self._triggers = self.triggers(units, freeze_last)
        fractions = any(t.kind == "fraction" for t in self._triggers.values())
        total = trainer.estimated_stepping_batches if fractions else None
        self._steps = {}
        for unit, trigger in self._triggers.items():
            if trigger.kind == "step":
                self._steps[unit] = int(trigger.value)
            elif trigger.kind == "fraction":
                if not bounded(total):  # pragma: no cover - refused in FreezeTraining.setup
                    raise RepSimValueError(f"FreezeTraining: cannot place fractions in unbounded training ({total}).")
                assert total is not None
                self._steps[unit] = int(math.floor(trigger.value * total + 1e-9))
            else:
                self._steps[unit] = None  # epoch trigger

    def due(
        self,
        point: str,
        callback: FreezeTraining,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        frozen: list[str],
        eligible: list[str],
    ) -> dict[str, str]:
        step = trainer.global_step
        epoch = trainer.current_epoch + (1 if point == "epoch_end" else 0)
        new = {}
        for unit, trigger in self._triggers.items():
            if unit in frozen:
                continue
            target = self._steps.get(unit)
            if (epoch >= trigger.value) if trigger.kind == "epoch" else (target is not None and step >= target):
                new[unit] = f"{self.label} ({trigger!r}, step {target})"
        order = {unit: i for i, unit in enumerate(self._triggers)}
        return dict(sorted(new.items(), key=lambda item: order[item[0]]))


class LinearSchedule(_TimedSchedule):
    r"""Unit :math:`i` of :math:`L` freezes at :math:`\lfloor T\,(s + (e - s)\, i / L)\rfloor` (Raghu et al. 2017).

    With the defaults, unit 1 of 4 freezes at 25 % of training, unit 2 at 50 %, unit 3 at 75 %; the
    last unit only with ``FreezeTraining(freeze_last=True)``, at ``end``.

    Args:
        start: fraction of training where the schedule begins.
        end: fraction of training where it ends (where unit ``L`` would freeze).

    Example:
        >>> LinearSchedule(start=0.5)
        LinearSchedule(start=0.5, end=1.0)
    """

    label = "linear schedule"
    uses_fractions = True

    def __init__(self, start: float = 0.0, end: float = 1.0) -> None:
        super().__init__()
        if not (0.0 <= start <= end <= 1.0):
            raise RepSimValueError(
                f"Need 0 <= start <= end <= 1 (fractions of training); got start={start}, end={end}."
            )
        self.start_fraction, self.end_fraction = float(start), float(end)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(start={self.start_fraction}, end={self.end_fraction})"

    def position(self, fraction: float) -> float:
        return fraction

    def triggers(self, units: list[str], freeze_last: bool) -> dict[str, Trigger]:
        count = len(units)
        spread = self.end_fraction - self.start_fraction
        triggers = {
            unit: Trigger("fraction", self.position(self.start_fraction + spread * i / count))
            for i, unit in enumerate(units, start=1)
        }
        if not freeze_last:
            triggers.pop(units[-1])
        return triggers

    def check(self, units: list[str], freeze_last: bool) -> None:
        if len(units) == 1 and not freeze_last:
            from pytorch_lightning.utilities.rank_zero import rank_zero_warn

            rank_zero_warn(
                f"FreezeTraining: only one unit ({units}) and freeze_last=False, so nothing will freeze; "
                "pass units=[...] with several depth-ordered blocks."
            )


class CubicSchedule(LinearSchedule):
    r"""FreezeOut (Brock et al. 2017): the linear schedule's position cubed, :math:`T\,(s + (e - s)\, i / L)^3`.

    With ``end=1`` this is FreezeOut's :math:`t_i = (t_0 + (1 - t_0)\, i / L)^3` with :math:`t_0` = ``start``.
    """

    label = "cubic schedule"

    def position(self, fraction: float) -> float:
        return fraction**3


class TimesSchedule(_TimedSchedule):
    """A freeze time per unit name or glob: ``{unit or glob: time}``.

    An ``int`` is a global (optimizer) step, a ``float`` in [0, 1] a fraction of
    ``trainer.estimated_stepping_batches``, a string ``"step:N"``, ``"epoch:N"`` (frozen from the
    start of 0-based epoch N) or ``"fraction:F"`` says it explicitly (YAML: ``1`` is step 1,
    ``1.0`` is the end of training). An exact unit name wins over a glob; otherwise the first
    matching key in the dict's order wins. Units not matched never freeze. Keys matching no unit
    are refused once the units are known.

    Example:
        >>> TimesSchedule({"features.*": "epoch:2", "classifier.0": 0.75}).times
        {'features.*': 'epoch:2', 'classifier.0': 0.75}
    """

    label = "dict schedule"

    def __init__(self, times: Mapping[str, ScheduleValue]) -> None:
        super().__init__()
        if not isinstance(times, Mapping):
            raise RepSimValueError(f"a dict schedule maps unit names or globs to times; got {type(times).__name__}.")
        if not times:
            raise RepSimValueError("schedule is an empty dict; name at least one unit (or glob) to freeze.")
        for key, _value in times.items():
            if not isinstance(key, str):
                raise RepSimValueError(f"schedule keys are unit names or globs; got {key!r}.")
        self._parsed = {key: parse_trigger(key, value) for key, value in times.items()}
        self.times = dict(times)
        self.uses_fractions = any(t is not None and t.kind == "fraction" for t in self._parsed.values())

    def __repr__(self) -> str:
        return f"TimesSchedule({self.times!r})"

    def check(self, units: list[str], freeze_last: bool) -> None:
        self.triggers(units, freeze_last)

    def triggers(self, units: list[str], freeze_last: bool) -> dict[str, Trigger]:
        unmatched = [k for k in self._parsed if not any(name_matches(u, k) for u in units)]
        if unmatched:
            raise RepSimValueError(
                f"FreezeTraining: schedule names {unmatched}, which match none of the units {units}. "
                "Use these names (or globs over them), or pass units=[...]."
            )
        triggers: dict[str, Trigger] = {}
        for unit in units:
            key = unit if unit in self._parsed else next((k for k in self._parsed if name_matches(unit, k)), None)
            trigger = None if key is None else self._parsed[key]
            if trigger is not None:
                triggers[unit] = trigger
        if len(triggers) == len(units) and not freeze_last:
            raise RepSimValueError(
                f"FreezeTraining: the schedule would freeze every unit ({units}), i.e. the whole network. "
                "Pass freeze_last=True if that is what you want."
            )
        order = [u for u in units if u in triggers]
        if order != units[: len(order)]:
            from pytorch_lightning.utilities.rank_zero import rank_zero_warn

            rank_zero_warn(
                f"FreezeTraining: the schedule freezes {order}, which is not a prefix of the units {units}; "
                "frozen units stop changing, but backward compute is saved only for a contiguous frozen prefix."
            )
        return triggers


def as_schedule(schedule: FreezeSchedule | str | Mapping[str, ScheduleValue]) -> FreezeSchedule:
    """A schedule object from what ``FreezeTraining(schedule=...)`` accepts.

    Example:
        >>> as_schedule("cubic"), as_schedule({"block1": 100})
        (CubicSchedule(start=0.0, end=1.0), TimesSchedule({'block1': 100}))
    """
    if isinstance(schedule, FreezeSchedule):
        return schedule
    if isinstance(schedule, str):
        from lightning_repsim.callbacks.freeze_similarity import SimilaritySchedule  # it builds on FreezeSchedule

        named: dict[str, type[FreezeSchedule]] = {
            "linear": LinearSchedule,
            "cubic": CubicSchedule,
            "similarity": SimilaritySchedule,
        }
        if schedule not in named:
            raise RepSimValueError(
                f"schedule={schedule!r} is not known; use one of {list(named)}, a dict "
                "{unit: time} or a schedule object (LinearSchedule(start=...), SimilaritySchedule(...))."
            )
        return named[schedule]()
    if isinstance(schedule, Mapping):
        return TimesSchedule(schedule)
    raise RepSimValueError(
        f"schedule must be 'linear', 'cubic', 'similarity', a dict or a FreezeSchedule; got {type(schedule).__name__}."
    )
