"""The monitor never stops a fit: its work runs guarded, failures become one warning with their step.

Only a user's configuration error may stop a fit, and it is raised at construction or setup,
outside this guard. Every other exception inside the monitor's work is reported (a warning, and a
``repsim/errors`` text in TensorBoard) and training goes on, unless ``strict`` asks for it to be
raised. Warnings about the data (a dead layer, NaN activations) are shown once per run.

An output that fails (the snapshot store, the figure files; each logger, see
:class:`lightning_repsim.report.LoggerSink`) is switched off for the rest of the fit with one
warning, so that a full or read-only disk costs one message, not one per logging point, and the
other outputs go on.
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from pytorch_lightning.utilities import rank_zero_warn

from lightning_repsim.errors import RepSimWarning

T = TypeVar("T")


class Guard:
    """Runs the monitor's work, reports its failures, and shows each warning once per run.

    Args:
        strict: re-raise instead of reporting.
        name: who is speaking in messages.
    """

    def __init__(self, strict: bool = False, name: str = "RepresentationSimilarity") -> None:
        self.strict = strict
        self.name = name
        self.warned: set[str] = set()
        #: ``(text, step)`` -> logs the failure where the user looks (TensorBoard), or None
        self.log_text: Callable[[str, int], None] | None = None
        #: outputs switched off after a failure, by name
        self.off: set[str] = set()

    def output(self, name: str, step: int, work: Callable[[], T]) -> T | None:
        """Run one write to the output ``name`` (e.g. ``"the snapshot store"``); None once it is off.

        The first failure switches the output off for the rest of the fit, with one warning that
        names it, the step and the error; ``strict`` re-raises instead.
        """
        if name in self.off:
            return None
        try:
            return work()
        except Exception as err:
            if self.strict:
                raise
            self.switch_off(name, step, err)
            return None

    def switch_off(self, name: str, step: int | None, err: BaseException) -> None:
        self.off.add(name)
        at = "" if step is None else f" at global step {step}"
        cause = _root_cause(err)
        rank_zero_warn(
            f"{self.name}: writing {name} failed{at} ({type(cause).__name__}: {cause}); {name} "
            "is switched off for the rest of this fit. Training and the other outputs go on; what was written "
            "before stays readable.",
            category=RepSimWarning,
        )

    def run(self, work: Callable[[], Any], where: str, step: int) -> None:
        """Run ``work()``; an exception never leaves unless ``strict`` (then it re-raises)."""
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RepSimWarning)
                work()
        except Exception as err:
            self.replay(caught)  # warnings issued before the failure (their keys are marked as warned)
            if self.strict:
                raise
            self.report(f"{where} (global step {step})", err, traceback.format_exc(limit=3), step)
        else:
            self.replay(caught)

    def report(self, where: str, err: BaseException, trace: str, step: int) -> None:
        """Report one failure: a warning with its traceback, and a line in TensorBoard when there is one."""
        rank_zero_warn(
            f"{self.name} failed at {where} and is skipping it; training continues. "
            f"{type(err).__name__}: {err}\n{trace}",
            category=RepSimWarning,
        )
        if self.log_text is not None:
            log_text = self.log_text
            self.output("the error log", step, lambda: log_text(f"`{type(err).__name__}: {err}` at {where}", step))

    def replay(self, caught: list[warnings.WarningMessage]) -> None:
        for w in caught:
            if issubclass(w.category, RepSimWarning):
                self.warn_once(str(w.message), str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            rank_zero_warn(message, category=RepSimWarning)


def _root_cause(err: BaseException) -> BaseException:
    """The first error in ``err``'s chain: loggers wrap an ``OSError`` (e.g. in a ``ValueError``) that names the fix."""
    seen = {id(err)}
    while (nxt := err.__cause__ or err.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        err = nxt
    return err
