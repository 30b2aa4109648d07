"""A single worker thread that runs a callback's work while training goes on.

Comparing a captured snapshot with the references, writing it to the snapshot store and drawing
its heatmaps do not need the training loop: they run here, in submission order, while the next
steps train. Torch's GEMMs, zlib and file writes release the GIL, so the work overlaps with
training wherever a core (or, on GPU, the host) would otherwise wait.

Failures are not raised in the worker: they are kept with the label of their job and handed back
to the caller by :meth:`Background.failures`, so the callback can report them with the step.
"""

from __future__ import annotations

import threading
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass
class Failure:
    """A job that raised: its label and context (as submitted), the exception and the formatted traceback."""

    label: str
    context: Any
    error: BaseException
    traceback: str


@dataclass
class _Job:
    label: str
    future: Future
    milestone: threading.Event  # set once the job's durable part (its store snapshot) is written


class Background:
    """FIFO jobs on one daemon-free worker thread, at most ``max_pending`` queued at a time.

    ``submit`` blocks while ``max_pending`` jobs are unfinished, so a slow disk cannot pile up
    snapshots in memory. A job receives a ``milestone`` callable to call once its durable part is
    done; :meth:`wait_milestones` waits for that only (a checkpoint needs the store to hold every
    submitted step, not the figures).
    """

    def __init__(
        self, max_pending: int = 2, name: str = "repsim", initializer: Callable[[], None] | None = None
    ) -> None:
        self.max_pending = max_pending
        self.name = name
        self.initializer = initializer  # run once in the worker thread when it starts
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: deque[_Job] = deque()
        self._failures: list[Failure] = []

    def submit(self, label: str, work: Callable[[Callable[[], None]], None], context: Any = None) -> None:
        """Queue ``work(milestone)``; ``milestone()`` marks the job's durable part as done. ``label`` and
        ``context`` come back with a failure."""
        self._reap(block_while=self.max_pending)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=self.name, initializer=self.initializer
            )
        milestone = threading.Event()
        self._jobs.append(_Job(label, self._executor.submit(self._run, label, context, work, milestone), milestone))

    def _run(
        self, label: str, context: Any, work: Callable[[Callable[[], None]], None], milestone: threading.Event
    ) -> None:
        try:
            work(milestone.set)
        except BaseException as err:  # handed back to the caller's thread by failures()
            self._failures.append(Failure(label, context, err, traceback.format_exc(limit=4)))
        finally:
            milestone.set()

    def _reap(self, block_while: int) -> None:
        """Forget finished jobs; wait for the oldest while more than ``block_while`` remain."""
        while self._jobs and (self._jobs[0].future.done() or len(self._jobs) >= max(block_while, 1)):
            self._jobs.popleft().future.result()  # never raises: _run keeps the exception

    def wait_milestones(self) -> None:
        """Block until every submitted job has written its durable part."""
        for job in list(self._jobs):
            job.milestone.wait()

    def drain(self) -> None:
        """Block until every submitted job has finished."""
        self._reap(block_while=0)

    def failures(self) -> list[Failure]:
        """The failures since the last call (the caller reports them)."""
        taken, self._failures = self._failures, []
        return taken

    @property
    def pending(self) -> int:
        return sum(not job.future.done() for job in self._jobs)

    def close(self) -> None:
        """Finish every job and stop the thread (a later submit starts a new one)."""
        self.drain()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def one_cpu_thread() -> None:
    """The worker's torch ops run on one CPU thread (a per-thread setting: training keeps its own).

    Two OpenMP teams on the same cores, the training loop's and the worker's, spin-wait against
    each other and slow both down several times over."""
    import torch

    torch.set_num_threads(1)
