"""What RepresentationSimilarity computes and writes at each logging point and at the end of training.

At each logging point the snapshot is compared with every reference, all layer pairs per measure,
and each matrix is drawn as a heatmap (labels and colour bar drawn once per series, then only the
cells are repainted), logged as per-layer scalars and written as PNG and CSV. At the end, every
stored snapshot is compared with the last one and the convergence report is written.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_repsim import report
from lightning_repsim.analysis import similarity_to_final, write_convergence_report
from lightning_repsim.callbacks._guard import Guard
from lightning_repsim.callbacks._outputs import STEP_FOLDER
from lightning_repsim.callbacks._probing import Reference
from lightning_repsim.errors import RepSimWarning
from lightning_repsim.functional import Representations, similarity_matrix
from lightning_repsim.store import SnapshotStore

# Each side of a comparison keeps its n x n Grams between measures and logging points (a fixed
# reference is prepared once for the whole run) within this much memory; past it they are recomputed.
GRAM_CACHE_BYTES = 128 << 20

FIGURE_FILES = "the figure files"

#: The loggers that store images (``report.LoggerSink.kinds``).
IMAGE_LOGGERS = frozenset({"tensorboard", "mlflow", "wandb"})


class PointReporter:
    """Compares each snapshot with the references and draws and writes the results, for one fit.

    Args:
        layer_names: the monitored layers, in depth order.
        options: ``{measure: options}``.
        references: what the layers are compared with (``"final"`` is handled by :meth:`final`).
        sink: the Trainer's loggers (heatmap images, the convergence report), or None.
        figures: ``<output dir>/figures`` for the PNG and CSV files, or None for no files.
        prefix: the first component of every tag (``repsim``, or ``repsim-<name>``).
        guard: the callback's guard, which switches a failing output (the figure files) off; None
            lets failures raise.

    The scalars (each layer against the reference's layer of the same name, tags from
    :func:`lightning_repsim.report.layer_tags`, in depth order) are returned rather than logged:
    the callback hands them to the loggers and ``trainer.callback_metrics`` from the training loop.
    """

    def __init__(
        self,
        layer_names: Sequence[str],
        options: Mapping[str, Mapping[str, Any]],
        references: Sequence[Reference],
        sink: report.LoggerSink | None,
        figures: Path | None,
        prefix: str = "repsim",
        guard: Guard | None = None,
    ) -> None:
        self.layer_names = list(layer_names)
        self.options = options
        self.references = list(references)
        self.sink = sink
        self.figures = figures
        self.prefix = prefix
        self.guard = guard
        self._frames: dict[tuple[str, str, tuple[str, ...]], report.HeatmapFrames] = {}
        self._prepared: dict[str, tuple[Mapping[str, torch.Tensor], Representations]] = {}

    def scalar_series(self) -> dict[str, list[str]]:
        """``{category: [tag prefixes]}``: one chart per measure and reference (TensorBoard's custom scalars)."""
        labels = [ref.label for ref in self.references]
        return {f"{self.prefix}/{m}": [f"{self.prefix}/{m}/{label}" for label in labels] for m in self.options}

    def point(
        self, features: dict[str, torch.Tensor], previous: dict[str, torch.Tensor] | None, step: int
    ) -> dict[str, float]:
        """Compare one snapshot with every reference (``previous`` is the last logging point's), draw and
        write; returns the scalars of this point.

        Runs on the worker thread when the callback works in the background: it reads nothing that
        the training loop changes.
        """
        scalars: dict[str, float] = {}
        current = Representations(features, max_cache_bytes=GRAM_CACHE_BYTES)  # shared by every measure
        for ref in self.references:
            if ref.kind == "final":
                continue
            other = self._prepared_reference(ref, previous if ref.kind == "previous" else ref.features, features)
            if other is None:
                continue
            for measure, options in self.options.items():
                # warn=False: NaN layers were reported by name at capture time, once
                matrix = similarity_matrix(current, other, measure, warn=False, **options)
                scalars.update(self.matrix(measure, ref.label, matrix, other.names, step))
        if any(ref.kind == "previous" for ref in self.references):
            self._prepared["previous"] = (features, current)  # its Grams serve the next point's "previous"
        return scalars

    def _prepared_reference(
        self, ref: Reference, features: Mapping[str, torch.Tensor] | None, like: Mapping[str, torch.Tensor]
    ) -> Representations | None:
        """The reference's layers on the current device, prepared once and reused while they stay the same."""
        if features is None:
            return None
        cached = self._prepared.get(ref.label)
        if cached is None or cached[0] is not features:
            device = next(iter(like.values())).device
            moved = {k: x.to(device) for k, x in features.items()}
            cached = (features, Representations(moved, max_cache_bytes=GRAM_CACHE_BYTES))
            self._prepared[ref.label] = cached
        return cached[1]

    def matrix(
        self, measure: str, label: str, matrix: torch.Tensor, ref_names: list[str], step: int
    ) -> dict[str, float]:
        """Draw and write one matrix of one logging point; returns its per-layer scalars.

        Nothing is drawn while no output takes the image (no logger that stores images, no figure files)."""
        names = self.layer_names
        values = matrix.cpu().numpy()
        prefix = f"{self.prefix}/{measure}/{label}"
        tags = report.layer_tags(prefix, names)
        scalars = {tags[name]: value for name, value in matched_diagonal(values, names, ref_names).items()}
        files = self.figures is not None and (self.guard is None or FIGURE_FILES not in self.guard.off)
        images = self.sink is not None and bool(IMAGE_LOGGERS & set(self.sink.kinds))
        if not (files or images):
            return scalars
        key = (measure, label, tuple(ref_names))
        if key not in self._frames:  # labels and colour bar are drawn once; each step repaints the cells
            self._frames[key] = report.HeatmapFrames(
                names, ref_names, measure=measure, title=f"{measure} vs {label}", row_title="layers", col_title=label
            )
        png = report.encode_png(self._frames[key].render(values, step=step))  # once, for the loggers and the file
        if self.sink is not None:
            self.sink.log_png(f"{prefix}/heatmap", png, step)
        if self.figures is not None:
            folder = self.figures / STEP_FOLDER.format(step)

            def write() -> None:
                report.write_matrix_csv(folder / f"{measure}__{label}.csv", values, names, ref_names)
                report.write_png_bytes(png, folder / f"{measure}__{label}.png")

            if self.guard is None:
                write()
            else:
                self.guard.output(FIGURE_FILES, step, write)
        return scalars

    def final(
        self,
        store: SnapshotStore,
        folder: Path,
        threshold: float,
        progress: Callable[[Iterable[str]], Iterable[str]],
        warn: Callable[[str, str], None],
    ) -> tuple[dict[str, str], list[tuple[int, dict[str, float]]]]:
        """Every stored snapshot of every layer against the last snapshot (Raghu et al. 2017): the
        convergence report in ``folder`` (and to the loggers).

        Returns ``({measure: the convergence table}, [(step, scalars)])``: the scalars
        ``<prefix>/<measure>/final/<NN>_<layer>`` of every stored step, for the callback to log (both
        empty when fewer than two snapshots are stored).
        """
        steps = store.steps
        if len(steps) < 2:
            warn(
                "final-too-short",
                "reference='final' needs at least two snapshots; training was too short for a convergence map.",
            )
            return {}, []
        for name in self.layer_names:
            if "pwcca" in self.options and store.kinds.get(name) != "features":
                warn(
                    f"pwcca-factor:{name}",
                    f"pwcca against the final snapshot is NaN for layer {name!r}: it was stored as a Gram factor "
                    "(p > n), without its neurons.",
                )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RepSimWarning)  # NaN layers were reported by name at capture time
            values = similarity_to_final(store, self.options, progress=progress)
        series: list[tuple[int, dict[str, float]]] = [(step, {}) for step in steps]
        for measure, table in values.items():
            tags = report.layer_tags(f"{self.prefix}/{measure}/final", self.layer_names)
            for t, (_, scalars) in enumerate(series):
                scalars.update({tags[name]: float(table[i, t]) for i, name in enumerate(self.layer_names)})

        def write(out: Path) -> dict[str, Any]:
            return write_convergence_report(
                {m: v.numpy() for m, v in values.items()},
                self.layer_names,
                steps,
                out,
                threshold=threshold,
                sink=self.sink,
                tag_prefix=self.prefix,
            )

        reports = None
        if self.guard is None:
            reports = write(folder)
        elif FIGURE_FILES not in self.guard.off:
            reports = self.guard.output(FIGURE_FILES, steps[-1], lambda: write(folder))
        if reports is None:  # no files: the loggers still get the report, drawn in a scratch folder
            with tempfile.TemporaryDirectory(prefix="repsim-final-") as scratch:
                reports = write(Path(scratch))
        return {measure: written.table for measure, written in reports.items()}, series


def settings_table(settings: Mapping[str, Any]) -> str:
    """A run's settings as a markdown table for TensorBoard's text plugin."""
    rows = "\n".join(f"| {k} | `{v}` |" for k, v in settings.items())
    return "| setting | value |\n|---|---|\n" + rows


def matched_diagonal(values: Any, names: list[str], ref_names: list[str]) -> dict[str, float]:
    """Layer i against the reference layer of the same name, or of the same index as a fallback."""
    index = {name: j for j, name in enumerate(ref_names)}
    if any(name in index for name in names):
        return {name: float(values[i, index[name]]) for i, name in enumerate(names) if name in index}
    if len(names) == len(ref_names):
        return {name: float(values[i, i]) for i, name in enumerate(names)}
    return {}
