"""Render similarity results: figures, files (PNG, CSV, JSON) and TensorBoard.

Pure rendering: every function takes arrays (NumPy arrays, ``torch.Tensor`` or nested sequences),
names and what the analysis computed (:mod:`lightning_repsim.analysis`), and knows nothing about
capture, callbacks or the snapshot store.

* :mod:`~lightning_repsim.report.figures` — heatmaps, convergence maps, per-layer curves;
* :mod:`~lightning_repsim.report.files` — exact CSV, strict JSON, PNG, each written atomically;
* :mod:`~lightning_repsim.report.tables` — per-layer tables in markdown or aligned text;
* :mod:`~lightning_repsim.report.ties` — which cells tie with their row's best, given intervals;
* :mod:`~lightning_repsim.report.loggers` — scalars, images and text to every Lightning logger;
* :mod:`~lightning_repsim.report.tensorboard` — tags and a reporter for images, scalars and text.
"""

from lightning_repsim.report._common import MEASURE_LABELS, MEASURE_RANGES, figure_to_array
from lightning_repsim.report.figures import (
    NAN_COLOR,
    HeatmapFrames,
    convergence_map_figure,
    curves_figure,
    freeze_figure,
    heatmap_figure,
)
from lightning_repsim.report.files import (
    PNG_COMPRESS_LEVEL,
    encode_png,
    save_image_png,
    save_png,
    write_json,
    write_matrix_csv,
    write_png_bytes,
    write_rows_csv,
)
from lightning_repsim.report.loggers import LoggerSink
from lightning_repsim.report.tables import comparison_summary, summary_table, text_table
from lightning_repsim.report.tensorboard import (
    TensorBoardReporter,
    accelerate_event_checksums,
    custom_scalars_layout,
    layer_tags,
    log_comparison,
    make_tag,
    sanitize_tag,
    scalar_tags,
)
from lightning_repsim.report.ties import TIES_CAPTION, outline_cells, row_ties

__all__ = [
    "MEASURE_LABELS",
    "MEASURE_RANGES",
    "NAN_COLOR",
    "PNG_COMPRESS_LEVEL",
    "TIES_CAPTION",
    "HeatmapFrames",
    "LoggerSink",
    "TensorBoardReporter",
    "accelerate_event_checksums",
    "comparison_summary",
    "convergence_map_figure",
    "curves_figure",
    "custom_scalars_layout",
    "encode_png",
    "figure_to_array",
    "freeze_figure",
    "heatmap_figure",
    "layer_tags",
    "log_comparison",
    "make_tag",
    "outline_cells",
    "row_ties",
    "sanitize_tag",
    "save_image_png",
    "save_png",
    "scalar_tags",
    "summary_table",
    "text_table",
    "write_json",
    "write_matrix_csv",
    "write_png_bytes",
    "write_rows_csv",
]
