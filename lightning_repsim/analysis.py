"""Similarities between models, runs and steps, and the convergence of each layer.

What the callbacks and the CLI compute, as functions:

* :func:`compare` — every layer of one model against every layer of another, on a probe;
* :func:`similarity_between` — the same between two stored snapshots (two runs, or two steps of
  one run), from the snapshot stores, without re-running a model;
* :func:`similarity_to_final` — every stored snapshot of each layer against its last one;
* :func:`convergence_steps` — the step from which each layer stays near its final similarity;
* :func:`write_convergence_report` — the one writer of the convergence report (map, curves,
  table, CSV), used by the callback at the end of training and by ``lightning-repsim report``.

Results of :func:`compare` and :func:`similarity_between` are :class:`Comparison` objects, which
draw and write themselves through :mod:`lightning_repsim.report`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from lightning_repsim import report
from lightning_repsim._io import PathLike
from lightning_repsim.capture import LayerSelector, Probe, capture, select_names
from lightning_repsim.convergence import (
    ConvergenceReport,
    convergence_interval,
    convergence_steps,
    convergence_table,
    final_intervals,
    similarity_to_final,
    write_convergence_report,
)
from lightning_repsim.errors import RepSimError, RepSimValueError
from lightning_repsim.functional import Representations, similarity_matrix
from lightning_repsim.functional._validation import MIN_MEANINGFUL_EXAMPLES, too_small_probe
from lightning_repsim.functional.intervals import INTERVAL_MEASURES, interval_matrix
from lightning_repsim.measures import MEASURES, resolve_measures, resolve_options
from lightning_repsim.store import SnapshotStore, StepLike, open_store

__all__ = [
    "Comparison",
    "ConvergenceReport",
    "FreezeLog",
    "REFERENCES",
    "ROW_COLUMNS",
    "compare",
    "convergence_interval",
    "convergence_steps",
    "convergence_table",
    "final_intervals",
    "INTERVAL_COLUMNS",
    "logged_measures",
    "logged_options",
    "read_freeze_log",
    "similarity_between",
    "similarity_bounds",
    "similarity_rows",
    "similarity_to_final",
    "write_convergence_report",
]

Progress = Callable[[Iterable[str]], Iterable[str]]


# --------------------------------------------------------------------------- comparisons


@dataclass
class Comparison:
    """The result of :func:`compare` and :func:`similarity_between`: layer names of each side and one
    matrix per measure.

    ``matrices[measure][i, j]`` is the similarity of ``layers_a[i]`` and ``layers_b[j]`` (float64).
    ``steps`` are the two stored steps compared (``similarity_between``; ``None`` for ``compare``).
    With ``interval=`` given, ``low[measure]`` and ``high[measure]`` are the per-cell confidence
    interval's ends at coverage ``level`` (:func:`~lightning_repsim.functional.interval_matrix`; NaN
    for SVCCA and PWCCA, which have no interval); otherwise ``low`` and ``high`` are empty.
    """

    layers_a: list[str]
    layers_b: list[str]
    matrices: dict[str, torch.Tensor]
    probe_hash: str
    n: int
    names: tuple[str, str] = field(default=("model A", "model B"))
    steps: tuple[int, int] | None = None
    low: dict[str, torch.Tensor] = field(default_factory=dict)
    high: dict[str, torch.Tensor] = field(default_factory=dict)
    level: float | None = None

    def __getitem__(self, measure: str) -> torch.Tensor:
        if measure not in self.matrices:
            raise RepSimValueError(f"no {measure!r} in this comparison; it has {list(self.matrices)}.")
        return self.matrices[measure]

    def plot(self, measure: str | None = None, path: str | Path | None = None) -> Figure:
        """Heatmap of one measure (default: the first), saved as PNG when ``path`` is given."""
        measure = measure or next(iter(self.matrices))
        row_title, col_title = (
            self.names
            if self.steps is None
            else (f"{name} (step {step})" for name, step in zip(self.names, self.steps))
        )
        figure = report.heatmap_figure(
            self[measure].cpu().numpy(),
            self.layers_a,
            self.layers_b,
            measure=measure,
            row_title=row_title,
            col_title=col_title,
            title=f"{measure}: {self.names[0]} vs {self.names[1]} (n = {self.n})",
            ties=self._ties(measure),
        )
        if path is not None:
            report.save_png(figure, path)
        return figure

    def _ties(self, measure: str) -> np.ndarray | None:
        if measure not in self.low:
            return None
        return report.row_ties(
            self[measure].cpu().numpy(), self.low[measure].cpu().numpy(), self.high[measure].cpu().numpy()
        )

    def to_csv(self, directory: str | Path) -> list[Path]:
        """One CSV per measure, ``<directory>/<measure>.csv``, rows layers_a, columns layers_b; with intervals
        also ``<measure>__low.csv`` and ``<measure>__high.csv``, laid out alike."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tables = [(m, "", matrix) for m, matrix in self.matrices.items()]
        tables += [(m, f"__{end}", bound[m]) for end, bound in (("low", self.low), ("high", self.high)) for m in bound]
        return [
            report.write_matrix_csv(directory / f"{m}{suffix}.csv", t.cpu().numpy(), self.layers_a, self.layers_b)
            for m, suffix, t in tables
        ]


def compare(
    model_a: nn.Module,
    model_b: nn.Module | None = None,
    probe: Any = None,
    measures: Sequence[str] = ("linear_cka",),
    layers: LayerSelector = None,
    layers_b: LayerSelector = None,
    *,
    measure_options: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int | None = 256,
    max_features: int = 4096,
    names: tuple[str, str] = ("model A", "model B"),
    interval: float | None = None,
    **capture_options: Any,
) -> Comparison:
    """Compare every layer of ``model_a`` with every layer of ``model_b`` on a fixed probe set.

    Rows are probe examples; each layer's output is reduced to (n, p) by the rule of
    :func:`lightning_repsim.capture.reduce_output` (conv maps average pooled to at most
    ``max_features``). Architectures may differ. To compare checkpoints, load them first, e.g.
    ``MyModule.load_from_checkpoint(path)``.

    Args:
        model_a: the first network.
        model_b: the second network; ``None`` compares ``model_a`` with itself (one triangle).
        probe: a tensor, an ``(x, y)`` tuple, a DataLoader or a :class:`~lightning_repsim.capture.Probe`.
        measures: measure names (see :data:`lightning_repsim.functional.MEASURES`).
        layers: layer selector for ``model_a`` (names, globs, module types; None: leaf modules
            with parameters in execution order).
        layers_b: the same for ``model_b`` (default: ``layers``).
        measure_options: per-measure options, e.g. ``{"rbf_cka": {"sigma": 0.5}}``.
        batch_size: probe examples per forward pass.
        max_features: cap on p per conv layer. Offline comparisons keep spatial detail up to
            4096 features per layer; the callback, which compares at every logging point,
            defaults to 256.
        names: labels of the two models in figures.
        interval: a coverage such as 0.95: also compute each cell's confidence interval for the
            population similarity (``result.low``, ``result.high``; see
            :func:`~lightning_repsim.functional.interval_matrix`), all pairs at once from the Grams.
            ``None`` (default): values only.
        **capture_options: ``layout``, ``token_reduction``, ``output_selector``, ``forward``
            (see :func:`lightning_repsim.capture.capture`).

    Raises:
        RepSimValueError: a model that is not an ``nn.Module`` (a checkpoint path: load it
            first), no probe or one of fewer than 4 examples, or an unknown measure or option.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> result = compare(net, probe=torch.randn(64, 8), measures=("linear_cka", "rv2"))
        >>> result.layers_a, tuple(result["rv2"].shape)
        (['0', '2'], (2, 2))
    """
    for what, model in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(model, nn.Module) and (model is not None or what == "model_a"):
            hint = (
                f"; to compare a checkpoint, load it first, e.g. MyModule.load_from_checkpoint({str(model)!r})"
                if isinstance(model, (str, os.PathLike))
                else ""
            )
            raise RepSimValueError(f"compare() needs {what} as an nn.Module, got {type(model).__name__}{hint}.")
    if probe is None:
        raise RepSimValueError("compare() needs a probe: a tensor, an (x, y) tuple or a DataLoader of inputs.")
    options = resolve_measures(measures, measure_options)
    probe = probe if isinstance(probe, Probe) else Probe(probe)
    if len(probe) < MIN_MEANINGFUL_EXAMPLES:
        raise RepSimValueError(too_small_probe(len(probe), "compare()'s probe"))
    features_a = capture(model_a, probe, layers, batch_size=batch_size, max_features=max_features, **capture_options)
    features_b = None
    if model_b is not None:
        features_b = capture(
            model_b,
            probe,
            layers if layers_b is None else layers_b,
            batch_size=batch_size,
            max_features=max_features,
            **capture_options,
        )
        device = next(iter(features_a.values())).device
        features_b = {k: v.to(device) for k, v in features_b.items()}
    series_a = Representations(features_a)  # shared by the measures and the intervals
    series_b = None if features_b is None else Representations(features_b)
    matrices = {m: similarity_matrix(series_a, series_b, m, **o) for m, o in options.items()}
    result = Comparison(
        list(features_a),
        list(features_a if features_b is None else features_b),
        matrices,
        probe.hash,
        len(probe),
        names,
    )
    if interval is not None:
        _add_intervals(result, series_a, series_b, options, interval)
    return result


def similarity_bounds(
    xs: Representations,
    ys: Representations | None,
    measure: str,
    options: Mapping[str, Any],
    level: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)``: each cell's ``level`` confidence interval (:func:`interval_matrix`), float64 on
    the CPU; all NaN for SVCCA and PWCCA, which have no interval."""
    rows, cols = len(xs), len(xs if ys is None else ys)
    if measure not in INTERVAL_MEASURES:
        nan = torch.full((rows, cols), float("nan"), dtype=torch.float64)
        return nan, nan.clone()
    bounds = interval_matrix(xs, ys, measure, level, warn=False, **options)
    return bounds.low.cpu(), bounds.high.cpu()


def _add_intervals(
    result: Comparison,
    xs: Representations,
    ys: Representations | None,
    options: Mapping[str, Mapping[str, Any]],
    level: float,
) -> None:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < float(level) < 1.0:
        raise RepSimValueError(f"interval is a coverage strictly between 0 and 1 (e.g. 0.95), got {level!r}.")
    result.level = float(level)
    for measure in result.matrices:
        result.low[measure], result.high[measure] = similarity_bounds(xs, ys, measure, options[measure], level)


def _as_store(store: Any, what: str) -> SnapshotStore:
    if isinstance(store, SnapshotStore):
        return store
    if isinstance(store, (str, os.PathLike)):
        return open_store(store)
    raise RepSimValueError(
        f"{what} must be a SnapshotStore or the path of a store directory (e.g. "
        f"'lightning_logs/version_3/repsim'), got {type(store).__name__}"
    )


def _stored_step(store: SnapshotStore, step: StepLike | None, what: str) -> int:
    """A stored step of ``store`` (``None``: the last); errors name the argument."""
    try:
        return store.resolve_step("last" if step is None else step)
    except RepSimValueError as err:
        raise RepSimValueError(f"{what}={step!r}: {err}") from None


def similarity_between(
    store_a: SnapshotStore | PathLike,
    store_b: SnapshotStore | PathLike,
    measures: str | Sequence[str] = ("linear_cka",),
    *,
    step_a: StepLike | None = None,
    step_b: StepLike | None = None,
    layers_a: str | Sequence[str] | None = None,
    layers_b: str | Sequence[str] | None = None,
    measure_options: Mapping[str, Mapping[str, Any]] | None = None,
    names: tuple[str, str] = ("store A", "store B"),
    progress: Progress | None = None,
    interval: float | None = None,
) -> Comparison:
    """Every layer of one stored snapshot against every layer of another, from two stores.

    The store counterpart of :func:`compare`: ``matrices[measure][i, j]`` is the similarity of layer
    ``layers_a[i]`` of ``store_a`` at ``step_a`` with layer ``layers_b[j]`` of ``store_b`` at
    ``step_b`` (float64, CPU), computed over the same ``n`` probe examples, so the stores must share
    a probe hash. Both may be one store (two steps of one run). Centring is the measure's own (see
    :mod:`lightning_repsim.functional.matrix`); the store keeps tensors uncentred. A layer stored as
    a Gram factor (``kind="gram_factor"``, ``F Fᵀ = X Xᵀ``) gives every Gram-based measure and SVCCA
    the values its features would; PWCCA needs the neurons, so its cells are NaN wherever either
    layer is a Gram factor.

    Args:
        store_a: a :class:`~lightning_repsim.store.SnapshotStore` or the path of a store directory
            (opened read-only).
        store_b: the other store, on the same probe set.
        measures: one measure name or several (see :data:`lightning_repsim.functional.MEASURES`).
        step_a: a stored step of ``store_a``; ``None`` or ``"last"``: its last snapshot.
        step_b: the same for ``store_b``.
        layers_a: layer names or fnmatch globs (``"block.*"``) of ``store_a``, kept in store
            order; ``None``: every layer.
        layers_b: the same for ``store_b``.
        measure_options: per-measure options, e.g. ``{"rbf_cka": {"sigma": 0.5}}``; others take
            their defaults (the CLI passes the options each run was logged with).
        names: labels of the two stores in figures.
        progress: wraps the iteration over measures (e.g. a tqdm factory).
        interval: a coverage such as 0.95: also each cell's confidence interval (``result.low``,
            ``result.high``, as :func:`compare`); ``None`` (default): values only.

    Returns:
        A :class:`Comparison` (``.plot()``, ``.to_csv()``) whose ``steps`` are the two steps compared.

    Raises:
        RepSimValueError: the probe hashes differ, an unknown step, layer, measure or option.
        RepSimError: a store that cannot be opened or read.

    Example:
        >>> import tempfile, torch
        >>> from lightning_repsim.store import SnapshotStore
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(20, 5, generator=g)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     a = SnapshotStore.create(tmp + "/a", probe_hash="3f2a", n=20)
        ...     a.add(0, {"conv": x, "fc": torch.randn(20, 3, generator=g)})
        ...     b = SnapshotStore.create(tmp + "/b", probe_hash="3f2a", n=20)
        ...     b.add(7, {"conv": 2 * x + 1})
        ...     result = similarity_between(a, tmp + "/b", ("linear_cka", "rv2"))
        >>> result.layers_a, result.layers_b, result.steps
        (['conv', 'fc'], ['conv'], (0, 7))
        >>> round(float(result["linear_cka"][0, 0]), 6)  # the same features, scaled and shifted
        1.0
    """
    store_a, store_b = _as_store(store_a, "store_a"), _as_store(store_b, "store_b")
    if store_a.probe_hash != store_b.probe_hash:
        raise RepSimValueError(
            f"probe hashes differ: {store_a.path} has {store_a.probe_hash!r}, {store_b.path} "
            f"has {store_b.probe_hash!r}; similarities are meaningful only on the same probe set, "
            "so compare stores of runs logged with the same probe (same examples, same order)"
        )
    options = resolve_measures(measures, measure_options)
    at_a, at_b = _stored_step(store_a, step_a, "step_a"), _stored_step(store_b, step_b, "step_b")
    names_a = select_names(store_a.layers, layers_a, "layers_a", str(store_a.path))
    names_b = select_names(store_b.layers, layers_b, "layers_b", str(store_b.path))
    # One snapshot against itself: read once and take the symmetric route (exact unit diagonal).
    same = store_a.path.resolve() == store_b.path.resolve() and at_a == at_b and names_a == names_b
    xs = store_a.read(at_a, names_a)
    ys = xs if same else store_b.read(at_b, names_b)

    series_a = Representations(xs)  # shared by the measures
    series_b = series_a if same else Representations(ys)
    matrices: dict[str, torch.Tensor] = {}
    for measure in options if progress is None else progress(list(options)):
        if measure != "pwcca":
            matrices[measure] = similarity_matrix(series_a, series_b, measure, **options[measure]).cpu()
            continue
        # PWCCA weights by the neurons: only layers stored as features have them.
        values = torch.full((len(names_a), len(names_b)), float("nan"), dtype=torch.float64)
        rows = [i for i, name in enumerate(names_a) if store_a.kinds[name] == "features"]
        cols = [j for j, name in enumerate(names_b) if store_b.kinds[name] == "features"]
        if rows and cols:
            sub_a = {names_a[i]: xs[names_a[i]] for i in rows}
            sub_b = None if same else {names_b[j]: ys[names_b[j]] for j in cols}
            sub = similarity_matrix(sub_a, sub_b, measure, **options[measure])
            values[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = sub.cpu()
        matrices[measure] = values
    result = Comparison(
        names_a,
        names_b,
        matrices,
        store_a.probe_hash,
        store_a.n,
        tuple(names),  # type: ignore[arg-type]
        steps=(at_a, at_b),
    )
    if interval is not None:
        _add_intervals(result, series_a, None if same else series_b, options, interval)
    return result


# --------------------------------------------------------------------------- runs, read back


def logged_measures(store: SnapshotStore) -> list[str]:
    """The measures a run was logged with (its store's ``settings["measures"]``), else ``["linear_cka"]``."""
    logged = store.settings.get("measures")
    if isinstance(logged, list) and logged and all(m in MEASURES for m in logged):
        return list(dict.fromkeys(logged))
    return ["linear_cka"]


def logged_options(store: SnapshotStore, measures: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each measure's options as the run logged them (its store's ``settings["options"]``), else the defaults."""
    logged = store.settings.get("options")
    options = {}
    for measure in measures:
        given = logged.get(measure) if isinstance(logged, dict) else None
        try:
            options[measure] = resolve_options(measure, given if isinstance(given, dict) else {})
        except RepSimError:
            options[measure] = resolve_options(measure, {})
    return options


#: What :func:`similarity_rows` compares each step with.
REFERENCES = ("final", "previous", "init")
#: The columns of :func:`similarity_rows`.
ROW_COLUMNS = ("run", "step", "measure", "reference", "layer_a", "layer_b", "value")
#: The two columns :func:`similarity_rows` adds with ``interval=``.
INTERVAL_COLUMNS = ("low", "high")


def similarity_rows(
    store: SnapshotStore,
    measures: Sequence[str],
    references: Sequence[str] = REFERENCES,
    *,
    run: str = "",
    measure_options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: Callable[..., Iterable[Any]] | None = None,
    interval: float | None = None,
) -> list[tuple[Any, ...]]:
    """Every similarity a store gives, as tidy rows ``(run, step, measure, reference, layer_a, layer_b, value)``.

    ``final``: each step of each layer against the same layer at the last step (``layer_a ==
    layer_b``). ``previous``: each step but the first against the step before (all pairs,
    ``layer_a`` at ``step``, ``layer_b`` at the previous step). ``init``: each step against the
    first stored step (all pairs, the first step included). Rows are ordered by reference, measure
    and step, layers in store order.

    Args:
        store: an open store.
        measures: measure names.
        references: any of :data:`REFERENCES`.
        run: the run's name, the first column.
        measure_options: per-measure options (default: each measure's defaults).
        progress: ``progress(iterable, desc=..., unit=...)`` wraps the loops (e.g. tqdm).
        interval: a coverage such as 0.95: each row gains the two columns of
            :data:`INTERVAL_COLUMNS`, the ends of the value's confidence interval
            (:func:`~lightning_repsim.functional.interval_matrix`; NaN for SVCCA and PWCCA).
    """
    if interval is not None and (
        isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0.0 < float(interval) < 1.0
    ):
        raise RepSimValueError(f"interval is a coverage strictly between 0 and 1 (e.g. 0.95), got {interval!r}.")
    options = resolve_measures(measures, measure_options)
    measures = list(options)
    wrap = progress or (lambda iterable, **_: iterable)
    steps, layers = store.steps, store.layers
    rows: list[tuple[Any, ...]] = []
    if "final" in references:
        layer_progress = lambda names: wrap(names, desc="layers vs final snapshot", unit="layer")
        if interval is None:
            values = {m: (v,) for m, v in similarity_to_final(store, options, progress=layer_progress).items()}
        else:
            values = final_intervals(store, options, interval, progress=layer_progress)  # type: ignore[assignment]
        for measure in measures:
            data = values[measure]
            rows += [
                (run, step, measure, "final", name, name, *(float(d[i, t]) for d in data))
                for t, step in enumerate(steps)
                for i, name in enumerate(layers)
            ]
    pairwise = [r for r in references if r in ("previous", "init")]
    if pairwise:
        first = Representations(store.read(steps[0]))  # "init" meets every step: its statistics are kept
        earlier: Representations | None = None
        for t, step in enumerate(wrap(steps, desc="steps vs previous / first", unit="step")):
            current = first if t == 0 else Representations(store.read(step))
            for reference in pairwise:
                if reference == "previous" and t == 0:
                    continue
                other = earlier if reference == "previous" else first
                for measure in measures:
                    cells = [_stored_matrix(store, current, other, measure, options[measure])]
                    if interval is not None:
                        cells += similarity_bounds(current, other, measure, options[measure], interval)
                    rows += [
                        (run, step, measure, reference, a, b, *(float(d[i, j]) for d in cells))
                        for i, a in enumerate(layers)
                        for j, b in enumerate(layers)
                    ]
            earlier = current
    order = {r: k for k, r in enumerate(REFERENCES)}
    rows.sort(key=lambda r: (order[r[3]], measures.index(r[2]), r[1]))  # stable: layer order kept
    return rows


def _stored_matrix(
    store: SnapshotStore, xs: Representations, ys: Representations | None, measure: str, options: Mapping[str, Any]
) -> torch.Tensor:
    """All pairs of stored layers; PWCCA is NaN where a layer is stored as a Gram factor (no neurons)."""
    if measure != "pwcca":
        return similarity_matrix(xs, ys, measure, **options).cpu()
    layers = store.layers
    values = torch.full((len(layers), len(layers)), float("nan"), dtype=torch.float64)
    keep = [i for i, name in enumerate(layers) if store.kinds[name] == "features"]
    if keep:
        sub_x = {layers[i]: xs.matrices[i] for i in keep}
        sub_y = None if ys is None or ys is xs else {layers[i]: ys.matrices[i] for i in keep}
        index = torch.tensor(keep)
        values[index[:, None], index[None, :]] = similarity_matrix(sub_x, sub_y, measure, **options).cpu()
    return values


@dataclass
class FreezeLog:
    """What FreezeTraining wrote to a run's TensorBoard files."""

    fraction: list[tuple[int, float]] = field(default_factory=list)  # freeze/frozen_fraction
    units: list[tuple[int, float]] = field(default_factory=list)  # freeze/frozen_units
    events: list[tuple[int, str]] = field(default_factory=list)  # freeze/events text, one line each
    why_none: str = ""


def read_freeze_log(run_dir: PathLike) -> FreezeLog:
    """Read ``freeze/frozen_fraction``, ``freeze/frozen_units`` and ``freeze/events`` from the
    TensorBoard event files directly in ``run_dir`` (where the Lightning logger wrote them)."""
    run_dir = Path(run_dir)
    log = FreezeLog()
    if not any(run_dir.glob("events.out.tfevents.*")):
        log.why_none = f"no TensorBoard event files in {run_dir}"
        return log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {"scalars": 0, "tensors": 0, "images": 1, "histograms": 1, "audio": 1, "compressedHistograms": 1}
    acc = EventAccumulator(str(run_dir), size_guidance=guidance)
    acc.Reload()
    tags = acc.Tags()
    for tag, target in (("freeze/frozen_fraction", log.fraction), ("freeze/frozen_units", log.units)):
        if tag in tags.get("scalars", []):
            last = {e.step: e.value for e in acc.Scalars(tag)}  # the last write of a step wins (resume)
            target.extend(sorted(last.items()))
    for tag in ("freeze/events/text_summary", "freeze/events"):
        if tag in tags.get("tensors", []):
            for event in acc.Tensors(tag):
                for raw in event.tensor_proto.string_val:
                    for line in raw.decode("utf-8", "replace").splitlines():
                        if line.strip():
                            log.events.append((event.step, line.strip()))
            break
    if not (log.fraction or log.units or log.events):
        log.why_none = f"no freeze/* tags in the TensorBoard event files of {run_dir}"
    return log
