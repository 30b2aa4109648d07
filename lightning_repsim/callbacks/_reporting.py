"""What RepresentationSimilarity computes and writes at each logging point and at the end of training.

At each logging point the snapshot is compared with every reference, all layer pairs per measure,
and each matrix is drawn as a heatmap (labels and colour bar drawn once per series, then only the
cells are repainted), logged as per-layer scalars and written as PNG and CSV. At the end, every
stored snapshot is compared with the last one and the convergence report is written.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_repsim import report
from lightning_repsim.analysis import similarity_to_final, write_convergence_report
from lightning_repsim.callbacks._outputs import STEP_FOLDER
from lightning_repsim.callbacks._probing import Reference
from lightning_repsim.errors import RepSimWarning
from lightning_repsim.functional import Representations, similarity_matrix
from lightning_repsim.store import SnapshotStore

# Each side of a comparison keeps its n x n Grams between measures and logging points (a fixed
# reference is prepared once for the whole run) within this much memory; past it they are recomputed.
GRAM_CACHE_BYTES = 128 << 20


class PointReporter:
    """Compares each snapshot with the references and draws and writes the results, for one fit.

    Args:
        layer_names: the monitored layers, in depth order.
        options: ``{measure: options}``.
        references: what the layers are compared with (``"final"`` is handled by :meth:`final`).
        tensorboard: where images, scalars and text go, or None.
        figures: ``<output dir>/figures`` for the PNG and CSV files, or None for no files.
    """

    def __init__(
        self,
        layer_names: Sequence[str],
        options: Mapping[str, Mapping[str, Any]],
        references: Sequence[Reference],
        tensorboard: report.TensorBoardReporter | None,
        figures: Path | None,
    ) -> None:
        self.layer_names = list(layer_names)
        self.options = options
        self.references = list(references)
        self.tensorboard = tensorboard
        self.figures = figures
        self._frames: dict[tuple[str, str, tuple[str, ...]], report.HeatmapFrames] = {}
        self._prepared: dict[str, tuple[Mapping[str, torch.Tensor], Representations]] = {}

    def point(self, features: dict[str, torch.Tensor], previous: dict[str, torch.Tensor] | None, step: int) -> None:
        """Compare one snapshot with every reference (``previous`` is the last logging point's), draw and write.

        Runs on the worker thread when the callback works in the background: it reads nothing that
        the training loop changes.
        """
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
                self.matrix(measure, ref.label, matrix, other.names, step)
        if any(ref.kind == "previous" for ref in self.references):
            self._prepared["previous"] = (features, current)  # its Grams serve the next point's "previous"

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

    def matrix(self, measure: str, label: str, matrix: torch.Tensor, ref_names: list[str], step: int) -> None:
        """Draw and write one matrix of one logging point."""
        names = self.layer_names
        values = matrix.cpu().numpy()
        key = (measure, label, tuple(ref_names))
        if key not in self._frames:  # labels and colour bar are drawn once; each step repaints the cells
            self._frames[key] = report.HeatmapFrames(
                names, ref_names, measure=measure, title=f"{measure} vs {label}", row_title="layers", col_title=label
            )
        png = report.encode_png(self._frames[key].render(values))  # once, for TensorBoard and the file
        if self.tensorboard is not None:
            prefix = f"repsim/{measure}/{label}"
            self.tensorboard.log_png(f"{prefix}/heatmap", png, step)
            self.tensorboard.log_layer_scalars(prefix, matched_diagonal(values, names, ref_names), step)
        if self.figures is not None:
            folder = self.figures / STEP_FOLDER.format(step)
            report.write_matrix_csv(folder / f"{measure}__{label}.csv", values, names, ref_names)
            report.write_png_bytes(png, folder / f"{measure}__{label}.png")

    def final(
        self,
        store: SnapshotStore,
        folder: Path,
        threshold: float,
        progress: Callable[[Iterable[str]], Iterable[str]],
        warn: Callable[[str, str], None],
    ) -> dict[str, str]:
        """Every stored snapshot of every layer against the last snapshot (Raghu et al. 2017): scalars
        ``repsim/<measure>/final/<layer>`` at every stored step and the convergence report in ``folder``.

        Returns ``{measure: the convergence table}`` (empty when fewer than two snapshots are stored).
        """
        steps = store.steps
        if len(steps) < 2:
            warn(
                "final-too-short",
                "reference='final' needs at least two snapshots; training was too short for a convergence map.",
            )
            return {}
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
        if self.tensorboard is not None:
            for measure, table in values.items():
                for t, step in enumerate(steps):
                    scalars = dict(zip(self.layer_names, table[:, t].tolist()))
                    self.tensorboard.log_layer_scalars(f"repsim/{measure}/final", scalars, step)
        reports = write_convergence_report(
            {m: v.numpy() for m, v in values.items()},
            self.layer_names,
            steps,
            folder,
            threshold=threshold,
            tensorboard=self.tensorboard,
        )
        return {measure: written.table for measure, written in reports.items()}


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
