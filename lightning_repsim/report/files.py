"""Files for papers and scripts: exact CSV, strict JSON and PNG, each written atomically.

Every writer goes through :func:`lightning_repsim._io.atomic_open` without ``fsync``: these are
derived files that a rerun regenerates (the snapshot store, which cannot be regenerated, is written
durably).
"""

from __future__ import annotations

import csv
import json
import math
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from lightning_repsim._io import PathLike, atomic_open
from lightning_repsim.errors import RepSimValueError
from lightning_repsim.report._common import as_array, check_labels, figure_to_array

__all__ = [
    "PNG_COMPRESS_LEVEL",
    "encode_png",
    "save_image_png",
    "save_png",
    "write_json",
    "write_matrix_csv",
    "write_png_bytes",
    "write_rows_csv",
]


def write_matrix_csv(
    path: PathLike,
    matrix: Any,
    row_labels: Sequence[Any],
    col_labels: Sequence[Any],
    *,
    corner: str = "",
) -> Path:
    """Write a labelled matrix as CSV, exactly: every float as Python's round-trip ``repr``.

    The first row is ``corner`` followed by the column labels; each further row is a row label
    followed by its values. ``float(cell)`` gives back the stored float64 bit for bit (NaN is
    written ``nan``, infinities ``inf``/``-inf``). Written atomically.

    Args:
        path: the ``.csv`` file; parent directories are created.
        matrix: ``(n_rows, n_cols)`` values.
        row_labels: one label per row.
        col_labels: one label per column.
        corner: the top-left cell.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        RepSimValueError: if the matrix is not 2-D or a label list has the wrong length.
    """
    values = as_array(matrix, "matrix", 2)
    rows = check_labels(row_labels, values.shape[0], "row_labels", "rows")
    cols = check_labels(col_labels, values.shape[1], "col_labels", "columns")
    with atomic_open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([corner, *cols])
        for label, row in zip(rows, values):
            writer.writerow([label, *(repr(float(v)) for v in row)])
    return Path(path)


def _to_jsonable(obj: Any, where: str = "payload") -> Any:
    if hasattr(obj, "detach"):  # torch.Tensor, without importing torch here
        tensor = obj.detach().to("cpu")
        obj = (tensor.double() if tensor.dtype.is_floating_point else tensor).numpy()
    if isinstance(obj, np.ndarray):
        return _to_jsonable(obj.tolist(), where)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise RepSimValueError(
                    f"JSON object keys must be strings; {where} has key {key!r} ({type(key).__name__})."
                )
            out[key] = _to_jsonable(value, f"{where}[{key!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise RepSimValueError(
        f"Cannot write {where} of type {type(obj).__name__} to JSON; use numbers, strings, "
        "lists, dicts, NumPy arrays or tensors."
    )


def write_json(path: PathLike, payload: Any) -> Path:
    """Write ``payload`` as strict JSON (RFC 8259), atomically (temp file + ``os.replace``).

    NumPy arrays, NumPy scalars and tensors become (nested) lists and numbers, paths become
    strings, tuples become lists. Non-finite floats (NaN, +-Inf) become ``null`` so that every
    JSON parser (JavaScript, ``jq``...) reads the file; keep exact values, NaN included, in the
    CSV files. Key order is kept (layers stay in depth order). On any error an existing file
    at ``path`` is left as it was.

    Args:
        path: the ``.json`` file; parent directories are created.
        payload: a JSON-like structure with string keys.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        RepSimValueError: for a non-string key or a value JSON cannot hold.

    Example:
        >>> import json, tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "cka.json"
        >>> _ = write_json(p, {"layers": ("a", "b"), "cka": [1.0, float("nan")]})
        >>> json.loads(p.read_text())
        {'layers': ['a', 'b'], 'cka': [1.0, None]}
    """
    data = _to_jsonable(payload)  # convert first: a bad payload never touches the disk
    text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False)
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    return Path(path)


def save_png(fig: Figure, path: PathLike, *, dpi: float | None = None) -> Path:
    """Save a figure as PNG, atomically (temp file + ``os.replace``).

    At the figure's own resolution an opaque figure is drawn once (:func:`figure_to_array`)
    and encoded by :func:`encode_png` (RGB), several times faster than ``savefig``'s encoder;
    another ``dpi``, a see-through figure background or ``savefig.*`` settings that change
    the look go through ``savefig``.

    Args:
        fig: the figure (e.g. from :func:`heatmap_figure`).
        path: the ``.png`` file; parent directories are created.
        dpi: resolution; default: the figure's own (100 for the figures made here). Use 200-300
            for papers.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if (dpi is None or float(dpi) == float(fig.dpi)) and _saves_as_drawn(fig):
        return write_png_bytes(encode_png(figure_to_array(fig)), path)
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    return Path(path)


def _saves_as_drawn(fig: Figure) -> bool:
    """Whether ``savefig`` would write exactly the canvas as drawn, fully opaque."""
    params = matplotlib.rcParams
    return (
        to_rgba(fig.get_facecolor())[3] == 1.0
        and not params["savefig.transparent"]
        and str(params["savefig.facecolor"]) == "auto"
        and str(params["savefig.edgecolor"]) == "auto"
        and params["savefig.bbox"] in (None, "standard")
        and params["savefig.dpi"] == "figure"
    )


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)
_PNG_CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4, 3: 3}  # PNG colour type -> channels (palette counts as RGB)
#: zlib level of :func:`encode_png`. Figures are flat colours on white, which deflate compresses
#: well at any level: level 3 (unfiltered rows) is 3-5x faster than Pillow's default encoder
#: (adaptive row filters, level 6) and its files are about 5 % smaller.
PNG_COMPRESS_LEVEL = 3


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: Any, *, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """Encode an ``(H, W, 3)`` ``uint8`` image (e.g. from :meth:`HeatmapFrames.render` or
    :func:`figure_to_array`) as PNG bytes, losslessly.

    Encode once, then pass the same bytes to :meth:`TensorBoardReporter.log_png` and
    :func:`write_png_bytes`. ``(H, W)`` greyscale and ``(H, W, 1|2|4)`` images work too.
    Rows are stored unfiltered and deflated with zlib at ``compress_level`` (0-9; see
    :data:`PNG_COMPRESS_LEVEL`); any PNG reader (Pillow, Matplotlib, browsers, TensorBoard)
    reads the result.

    Raises:
        RepSimValueError: if ``image`` is not a non-empty ``uint8`` array of one of those shapes.

    Example:
        >>> import io, numpy as np
        >>> from PIL import Image
        >>> image = np.zeros((2, 3, 3), dtype=np.uint8)
        >>> np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(image)))), image)
        True
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in _PNG_COLOUR_TYPE or arr.size == 0:
        raise RepSimValueError(
            f"encode_png wants a non-empty uint8 image of shape (H, W) or (H, W, 1|2|3|4); got "
            f"{arr.dtype} of shape {tuple(np.shape(image))}."
        )
    if not (isinstance(compress_level, int) and 0 <= compress_level <= 9):
        raise RepSimValueError(f"`compress_level` must be an int in 0..9, got {compress_level!r}.")
    height, width, channels = arr.shape
    rows = np.empty((height, width * channels + 1), dtype=np.uint8)
    rows[:, 0] = 0  # filter type "None" on every row
    rows[:, 1:] = arr.reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOUR_TYPE[channels], 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows.data, compress_level))
        + _png_chunk(b"IEND", b"")
    )


def _png_header(data: bytes) -> tuple[int, int, int]:
    """``(height, width, channels)`` from the IHDR chunk of PNG bytes."""
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise RepSimValueError("Not PNG data (bad signature or no IHDR chunk first); use encode_png().")
    width, height, _depth, colour_type = struct.unpack(">IIBB", data[16:26])
    return height, width, _PNG_CHANNELS.get(colour_type, 3)


def write_png_bytes(data: bytes, path: PathLike) -> Path:
    """Write already encoded PNG bytes (from :func:`encode_png`) to ``path``, atomically.

    Raises:
        RepSimValueError: if ``data`` does not start like a PNG file.
    """
    _png_header(data)
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def save_image_png(image: Any, path: PathLike) -> Path:
    """Save an ``(H, W, 3)`` ``uint8`` image (e.g. from :meth:`HeatmapFrames.render`) as PNG, atomically.

    Same as ``write_png_bytes(encode_png(image), path)``; when the image also goes to
    TensorBoard, encode it once and use :meth:`TensorBoardReporter.log_png` instead.
    """
    return write_png_bytes(encode_png(image), path)


def write_rows_csv(target: Any, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Write tidy rows as CSV to a path (atomically) or an open text handle (``sys.stdout``).

    The header is ``columns``; the last column of every row is a float written with ``repr``, so
    ``float(cell)`` gives it back exactly (NaN as ``nan``).
    """

    def write(handle: Any) -> None:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([*row[:-1], repr(float(row[-1]))])

    if hasattr(target, "write"):
        write(target)
        return
    with atomic_open(target, "w", newline="", encoding="utf-8") as handle:
        write(handle)
