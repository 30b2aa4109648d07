"""The convergence of each layer: every stored snapshot against its last one, the step from which
each layer stays near its final similarity (with an interval when asked), and the one writer of the
convergence report (map, curves, table, CSV) used by the callback at the end of training and by
``lightning-repsim report``. Re-exported by :mod:`lightning_repsim.analysis`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_repsim import report
from lightning_repsim._io import PathLike, atomic_write
from lightning_repsim.errors import RepSimValueError
from lightning_repsim.functional import Representations, similarity_matrix
from lightning_repsim.functional.intervals import INTERVAL_MEASURES, interval_matrix
from lightning_repsim.report import _common as report_common
from lightning_repsim.store import SnapshotStore

__all__ = [
    "ConvergenceReport",
    "convergence_interval",
    "convergence_steps",
    "convergence_table",
    "final_intervals",
    "similarity_to_final",
    "write_convergence_report",
]

Progress = Callable[[Iterable[str]], Iterable[str]]


def similarity_to_final(
    store: SnapshotStore,
    measure_options: Mapping[str, Mapping[str, Any]],
    *,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Every stored snapshot of each layer against that layer's last snapshot.

    The convergence view of Raghu et al. (2017): ``{measure: (L, S) float64}``, rows the layers
    in store order, columns the stored steps; the last column is 1 for a finite layer. One layer
    at a time (memory: one layer's snapshots), one similarity call per layer and measure. PWCCA
    needs the neurons, so it is NaN for layers stored as Gram factors (``kind="gram_factor"``).

    Args:
        store: an open store with at least one snapshot.
        measure_options: ``{measure: options}``, e.g. ``{"linear_cka": {}, "svcca": {"keep": 0.99}}``.
        progress: wraps the iteration over layers (e.g. a tqdm factory).
    """
    steps, layers = store.steps, store.layers
    values = {m: torch.full((len(layers), len(steps)), float("nan"), dtype=torch.float64) for m in measure_options}
    for i, name in enumerate(layers if progress is None else progress(layers)):
        snapshots = [store.read(step, [name])[name] for step in steps]
        series, final = Representations(snapshots), Representations(snapshots[-1:])  # shared by the measures
        for measure, options in measure_options.items():
            if measure == "pwcca" and store.kinds.get(name) != "features":
                continue
            values[measure][i] = similarity_matrix(series, final, measure, **options)[:, 0].cpu()
    return values


def final_intervals(
    store: SnapshotStore,
    measure_options: Mapping[str, Mapping[str, Any]],
    level: float = 0.95,
    *,
    progress: Progress | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`similarity_to_final` with each value's confidence interval: ``{measure: (values, low, high)}``.

    ``values`` equals :func:`similarity_to_final`'s exactly; ``low`` and ``high`` (``(L, S)`` float64) are the
    ends of the ``level`` interval of each step's similarity to the final snapshot
    (:func:`~lightning_repsim.functional.interval_matrix`, one call per layer and measure: every step
    of the layer against its last). SVCCA and PWCCA have no interval: NaN.
    """
    steps, layers = store.steps, store.layers
    shape = (len(layers), len(steps))
    result = {m: tuple(torch.full(shape, float("nan"), dtype=torch.float64) for _ in range(3)) for m in measure_options}
    for i, name in enumerate(layers if progress is None else progress(layers)):
        snapshots = [store.read(step, [name])[name] for step in steps]
        series, final = Representations(snapshots), Representations(snapshots[-1:])
        for measure, options in measure_options.items():
            values, low, high = result[measure]
            if measure == "pwcca" and store.kinds.get(name) != "features":
                continue
            values[i] = similarity_matrix(series, final, measure, **options)[:, 0].cpu()  # bit for bit
            if measure in INTERVAL_MEASURES:
                bounds = interval_matrix(series, final, measure, level, warn=False, **options)
                low[i], high[i] = bounds.low[:, 0].cpu(), bounds.high[:, 0].cpu()
    return result  # type: ignore[return-value]


def convergence_steps(
    values: Any,
    steps: Sequence[int],
    threshold: float = 0.95,
    *,
    sustained: bool = True,
) -> list[int | None]:
    """Per layer, the step at which it converges: the bottom-up convergence summary.

    A layer's level is ``threshold * final`` where ``final = values[layer, -1]`` (its value at
    the last step; 1 when the values are similarities to the final snapshot). The layer has
    converged at step ``steps[t]`` where ``t`` is

    * ``sustained=True`` (default): the first index from which **every** later value is
      ``>= level``, i.e. the layer reaches the level and stays there until the end. A transient
      spike followed by a dip does not count, which is what "this layer had settled by step s"
      means.
    * ``sustained=False``: the first index whose value is ``>= level`` (first reach).

    NaN values never satisfy the condition. The result is ``None`` for a layer whose final
    value is not finite or not positive (a relative level is meaningless then), and never
    ``None`` otherwise, since the last step always satisfies ``final >= threshold * final``.

    Args:
        values: ``(n_layers, n_steps)`` similarities in step order.
        steps: strictly increasing global steps, one per column.
        threshold: fraction of the final value, in ``(0, 1]``.
        sustained: require the level to hold until the last step (default) or only to be
            reached once.

    Returns:
        One entry per layer: a value from ``steps``, or ``None``.

    Raises:
        RepSimValueError: if ``threshold`` is outside ``(0, 1]`` or the shapes do not match.

    Example:
        >>> convergence_steps([[0.2, 0.97, 0.5, 0.98, 1.0],
        ...                    [0.1, 0.3, 0.6, 0.9, 1.0]], [0, 10, 20, 30, 40], 0.95)
        [30, 40]
        >>> convergence_steps([[0.2, 0.97, 0.5, 0.98, 1.0]], [0, 10, 20, 30, 40], 0.95,
        ...                   sustained=False)
        [10]
    """
    if not (isinstance(threshold, (int, float)) and 0.0 < float(threshold) <= 1.0):
        raise RepSimValueError(f"`threshold` is a fraction of the final similarity in (0, 1], got {threshold!r}.")
    data = report_common.as_array(values, "values", 2)
    step_list = report_common.check_steps(steps, data.shape[1])
    result: list[int | None] = []
    for row in data:
        final = row[-1]
        if not (np.isfinite(final) and final > 0.0):
            result.append(None)
            continue
        with np.errstate(invalid="ignore"):
            ok = row >= float(threshold) * final  # NaN -> False
        if sustained:
            failing = np.flatnonzero(~ok)
            index = int(failing[-1]) + 1 if failing.size else 0
        else:
            index = int(np.argmax(ok))  # ok[-1] is True, so argmax finds the first True
        result.append(step_list[index] if index < len(step_list) else None)
    return result


def convergence_interval(
    values: Any,
    low: Any,
    high: Any,
    steps: Sequence[int],
    threshold: float = 0.95,
) -> list[tuple[int, int] | None]:
    """Per layer, the range of steps within which it converged, given each step's confidence interval.

    With the level ``threshold * final`` of :func:`convergence_steps` (sustained), a layer has
    converged *between* steps ``a`` and ``b`` where

    * ``a`` (earliest) is the first step from which **every** later step's interval reaches the level
      (``high >= level``): from ``a`` on, no step is shown to lie below it, so the data cannot rule out
      that the layer had settled by ``a``;
    * ``b`` (latest) is the first step from which every later step's interval lies at or above the level
      (``low >= level``): from ``b`` on, every step is shown to have reached it.

    The range is widened to hold the point estimate of :func:`convergence_steps` when that falls
    outside it (a biased estimator's ``value`` can lie outside its own interval). Steps between ``a``
    and ``b`` are the ones statistically indistinguishable from the convergence step. ``None`` for a
    layer whose final value is not finite or positive, or whose intervals are NaN (SVCCA, PWCCA, or a
    last step with no interval): no statement can be made.

    Args:
        values: ``(L, S)`` similarities to the final snapshot, in step order.
        low: ``(L, S)`` lower ends of their intervals.
        high: ``(L, S)`` upper ends.
        steps: the S steps.
        threshold: fraction of the final value, in ``(0, 1]``.

    Example:
        >>> convergence_interval([[0.5, 0.9, 0.97, 1.0]], [[0.4, 0.8, 0.93, 1.0]], [[0.6, 0.96, 0.99, 1.0]],
        ...                      [0, 10, 20, 30], 0.95)
        [(10, 30)]
    """
    data = report_common.as_array(values, "values", 2)
    lows, highs = (report_common.as_array(t, name, 2) for t, name in ((low, "low"), (high, "high")))
    if lows.shape != data.shape or highs.shape != data.shape:
        raise RepSimValueError(
            f"`low` {lows.shape} and `high` {highs.shape} must have the shape of `values` {data.shape}."
        )
    step_list = report_common.check_steps(steps, data.shape[1])
    points = convergence_steps(data, step_list, threshold)
    result: list[tuple[int, int] | None] = []
    for row_low, row_high, point, final in zip(lows, highs, points, data[:, -1]):
        if point is None or not np.isfinite(row_low[-1]) or not np.isfinite(row_high[-1]):
            result.append(None)
            continue
        level = float(threshold) * final
        bounds = []
        for ends in (row_high, row_low):
            with np.errstate(invalid="ignore"):
                failing = np.flatnonzero(~(ends >= level))  # NaN fails
            index = int(failing[-1]) + 1 if failing.size else 0
            bounds.append(step_list[min(index, len(step_list) - 1)])
        result.append((min(bounds[0], point), max(bounds[1], point)))
    return result


@dataclass
class ConvergenceReport:
    """One measure's convergence report, as :func:`write_convergence_report` wrote it."""

    measure: str
    converged: list[int | None]  # per layer, from convergence_steps
    table: str  # the aligned text table of <measure>__convergence.txt
    markdown: str  # the same table for TensorBoard's text plugin, with a one-line caption
    files: list[Path]
    between: list[tuple[int, int] | None] | None = None  # per layer, from convergence_interval


def convergence_table(
    layers: Sequence[str],
    converged: Sequence[int | None],
    values: np.ndarray,
    steps: Sequence[int],
    *,
    fmt: str = "text",
    between: Sequence[tuple[int, int] | None] | None = None,
) -> str:
    """Each layer's convergence step and its first snapshot's similarity to the final one (how far it moved).

    With ``between`` (from :func:`convergence_interval`) a column ``converged between`` shows each
    layer's range ``a-b`` (``-`` where there is none).

    Example:
        >>> import numpy as np
        >>> print(convergence_table(["conv1", "fc"], [10, 20], np.array([[0.4, 1.0, 1.0], [0.1, 0.5, 1.0]]),
        ...                         [0, 10, 20]))
        #  layer  converged at step  at step 0
        0  conv1                 10     0.4000
        1  fc                    20     0.1000
    """
    return report.summary_table(
        layers,
        converged,
        final_values=list(values[:, 0]),
        fmt=fmt,  # type: ignore[arg-type]
        final_header=f"at step {steps[0]}",
        extra=None
        if between is None
        else {"converged between": ["-" if b is None else f"{b[0]}-{b[1]}" for b in between]},
    )


def write_convergence_report(
    values: Mapping[str, Any],
    layers: Sequence[str],
    steps: Sequence[int],
    out: PathLike,
    *,
    threshold: float = 0.95,
    title: str | None = None,
    freeze_steps: Sequence[int] = (),
    sink: report.TensorBoardReporter | report.LoggerSink | None = None,
    tag_prefix: str = "repsim",
    intervals: Mapping[str, tuple[Any, Any]] | None = None,
    level: float | None = None,
) -> dict[str, ConvergenceReport]:
    """Write the convergence report of each measure: the one writer of the callback and the CLI.

    For every measure, from ``values[measure]`` (``(L, S)``: each stored step of each layer against
    its last one, from :func:`similarity_to_final`), into the directory ``out``:
    ``<measure>__convergence_map.png`` (the layer x step map with each layer's convergence step
    marked), ``<measure>__curves.png`` (one curve per layer; dotted red lines at ``freeze_steps``),
    ``<measure>__final.csv`` (the values, exactly) and ``<measure>__convergence.txt`` (the table of
    :func:`convergence_table`). With ``sink`` (the Trainer's loggers, or one TensorBoard writer) the
    two images and the table also go to
    ``<tag_prefix>/<measure>/final/{convergence_map,curves,convergence_summary}`` at the last step.

    Args:
        values: ``{measure: (L, S) similarities to the final snapshot}``.
        layers: the L layer names, input first.
        steps: the S stored steps, ascending.
        out: the output directory (created).
        threshold: the fraction of the final similarity that counts as converged
            (:func:`convergence_steps`, sustained).
        title: a title for the figures (e.g. the run's name).
        freeze_steps: steps at which FreezeTraining froze a unit, marked on the curves.
        sink: where to log the images and the table as well (``log_png`` and ``log_text``).
        tag_prefix: the first component of their tags (``repsim``, or a named monitor's ``repsim-<name>``).
        intervals: ``{measure: (low, high)}``, each ``(L, S)`` (from :func:`final_intervals`): the
            table gains each layer's ``converged between`` range (:func:`convergence_interval`) and
            ``<measure>__final_low.csv`` / ``<measure>__final_high.csv`` are written. ``None``
            (default): no intervals, nothing extra computed.
        level: the intervals' coverage, for the caption.

    Returns:
        ``{measure: ConvergenceReport}``.
    """
    out = Path(out)
    reports = {}
    for measure, table in values.items():
        data = report_common.as_array(table, f"values[{measure!r}]", 2)
        converged = convergence_steps(data, steps, threshold)
        between = None
        if intervals is not None and measure in intervals:
            low, high = (report_common.as_array(t, f"intervals[{measure!r}]", 2) for t in intervals[measure])
            between = convergence_interval(data, low, high, steps, threshold)
        figures = {
            "convergence_map": report.convergence_map_figure(
                data, layers, steps, measure=measure, converged=converged, threshold=threshold, title=title
            ),
            "curves": report.curves_figure(data, layers, steps, measure=measure, threshold=threshold, title=title),
        }
        for step in freeze_steps:  # freeze events against convergence
            figures["curves"].axes[0].axvline(step, color="tab:red", linestyle=":", linewidth=0.9, alpha=0.7)
        files, prefix = [], f"{tag_prefix}/{measure}/final"
        for kind, figure in figures.items():
            png = report.encode_png(report.figure_to_array(figure))
            files.append(report.write_png_bytes(png, out / f"{measure}__{kind}.png"))
            if sink is not None:
                sink.log_png(f"{prefix}/{kind}", png, steps[-1])
        files.append(report.write_matrix_csv(out / f"{measure}__final.csv", data, layers, steps, corner="layer"))
        if between is not None:
            for end, bound in (("low", low), ("high", high)):
                files.append(
                    report.write_matrix_csv(out / f"{measure}__final_{end}.csv", bound, layers, steps, corner="layer")
                )
        text = convergence_table(layers, converged, data, steps, between=between)
        files.append(atomic_write(out / f"{measure}__convergence.txt", text + "\n"))
        caption = (
            f"**{report_common.md_escape(report.MEASURE_LABELS.get(measure, measure))} to the final snapshot**: "
            f"the step at which each layer reaches {threshold:g} \u00d7 its final value and stays there until "
            "the end."
        )
        if between is not None:
            caption += (
                f" Converged between a and b: from a on every step's {level or 0.95:g} interval reaches that level, "
                "from b on every one lies above it."
            )
        markdown = caption + "\n\n" + convergence_table(layers, converged, data, steps, fmt="markdown", between=between)
        if sink is not None:
            sink.log_text(f"{prefix}/convergence_summary", markdown, steps[-1])
        reports[measure] = ConvergenceReport(measure, converged, text, markdown, files, between)
    return reports
