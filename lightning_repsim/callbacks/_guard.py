"""The monitor never stops a fit: its work runs guarded, failures become one warning with their step.

Only a user's configuration error may stop a fit, and it is raised at construction or setup,
outside this guard. Every other exception inside the monitor's work is reported (a warning, and a
``repsim/errors`` text in TensorBoard) and training goes on, unless ``strict`` asks for it to be
raised. Warnings about the data (a dead layer, NaN activations) are shown once per run.
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable
from typing import Any

from pytorch_lightning.utilities import rank_zero_warn

from lightning_repsim.errors import RepSimWarning


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
            self.log_text(f"`{type(err).__name__}: {err}` at {where}", step)

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
