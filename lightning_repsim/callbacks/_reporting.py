"""Where each logging point's similarity matrices go: heatmaps and per-layer scalars, PNG and CSV files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_repsim import report
from lightning_repsim.callbacks._outputs import STEP_FOLDER


class MatrixReporter:
    """Draws and writes the matrices of one fit: one heatmap per measure and reference at every logging
    point (labels and colour bar drawn once per series, then only the cells are repainted), the
    scalars of each layer against the reference's layer of the same name, and the files."""

    def __init__(
        self, layer_names: Sequence[str], tensorboard: report.TensorBoardReporter | None, figures: Path | None
    ) -> None:
        self.layer_names = list(layer_names)
        self.tensorboard = tensorboard
        self.figures = figures  # <output dir>/figures, or None for no files
        self._frames: dict[tuple[str, str, tuple[str, ...]], report.HeatmapFrames] = {}

    def matrix(self, measure: str, label: str, matrix: torch.Tensor, ref_names: list[str], step: int) -> None:
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


def matched_diagonal(values: Any, names: list[str], ref_names: list[str]) -> dict[str, float]:
    """Layer i against the reference layer of the same name, or of the same index as a fallback."""
    index = {name: j for j, name in enumerate(ref_names)}
    if any(name in index for name in names):
        return {name: float(values[i, index[name]]) for i, name in enumerate(names) if name in index}
    if len(names) == len(ref_names):
        return {name: float(values[i, i]) for i, name in enumerate(names)}
    return {}


__all__ = ["MatrixReporter", "matched_diagonal"]
