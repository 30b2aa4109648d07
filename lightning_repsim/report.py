"""Render similarity results as figures and write them to TensorBoard, PNG, CSV and JSON.

Pure rendering: every function here takes arrays (NumPy arrays, ``torch.Tensor`` or nested
sequences) and names, and knows nothing about capture, callbacks or the snapshot store.

Matplotlib is used through the non-interactive Agg canvas *only*: each figure is a
:class:`matplotlib.figure.Figure` with its own :class:`~matplotlib.backends.backend_agg.
FigureCanvasAgg`. ``matplotlib.pyplot`` is never imported and the global backend is never
changed, so rendering works headless, inside worker threads and next to a user's interactive
session, and figures are freed by the garbage collector like any other object (nothing is
registered in pyplot's figure manager, so nothing leaks).

Colour scale:
    Every measure has one fixed colour range, :data:`MEASURE_RANGES`, used by every heatmap and
    convergence map regardless of the data, so frames logged at different steps (and figures of
    different runs) are comparable by eye. Values outside the range are clipped *in colour only*;
    CSV and JSON files always carry the exact numbers. Non-finite cells (a dead layer, a
    diverged run) are drawn in light grey (:data:`NAN_COLOR`) and counted in the colour-bar
    label.

TensorBoard tag scheme (see :func:`make_tag` and :func:`scalar_tags`):

    ============================================  =========  ===================================
    tag                                           kind       content
    ============================================  =========  ===================================
    ``repsim/<measure>/<reference>/<layer>``      scalar     similarity of one layer to its
                                                             counterpart in ``<reference>``
    ``repsim/<measure>/<reference>/heatmap``      image      all pairs of layers
    ``repsim/<measure>/final/convergence_map``    image      layer x step map (vs final snapshot)
    ``repsim/<measure>/final/curves``             image      one curve per layer
    ``repsim/<measure>/final/convergence_summary`` text      markdown table of convergence steps
    ============================================  =========  ===================================

    ``<reference>`` names what the network is compared with: ``init``, ``final``, ``seed1``,
    a checkpoint name... Each ``/``-separated component is passed through
    :func:`sanitize_tag`: characters other than letters, digits, ``_``, ``.`` and ``-`` become
    ``_``, so module names such as ``features.0`` or ``encoder.layers.3.mlp`` are kept verbatim
    while a ``/`` or a space inside a layer label cannot create a spurious TensorBoard group.
    Non-finite similarities are logged as NaN (never skipped), so that a degenerate layer
    shows up at the step where it happened instead of silently vanishing from the chart.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import struct
import sys
import tempfile
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, Literal, Optional, Union

import matplotlib
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, to_rgba
from matplotlib.figure import Figure
from matplotlib.layout_engine import LayoutEngine
from matplotlib.spines import Spine

from lightning_repsim.errors import RepSimValueError, RepSimWarning

__all__ = [
    "HeatmapFrames",
    "MEASURE_LABELS",
    "MEASURE_RANGES",
    "NAN_COLOR",
    "PNG_COMPRESS_LEVEL",
    "TensorBoardReporter",
    "convergence_map_figure",
    "convergence_steps",
    "curves_figure",
    "encode_png",
    "figure_to_array",
    "heatmap_figure",
    "make_tag",
    "sanitize_tag",
    "save_image_png",
    "save_png",
    "scalar_tags",
    "summary_table",
    "write_json",
    "write_matrix_csv",
    "write_png_bytes",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Fixed colour range ``(vmin, vmax)`` per measure. Linear/RBF CKA, RV, SVCCA and PWCCA lie in
#: [0, 1] by construction. Debiased CKA (unbiased HSIC) and RV2 (diagonal of the Gram removed)
#: can be slightly negative for unrelated layers, so their range starts at -0.1; anything below
#: is drawn in the lowest colour (the colour bar shows an arrow for that).
MEASURE_RANGES: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "linear_cka": (0.0, 1.0),
        "debiased_cka": (-0.1, 1.0),
        "rbf_cka": (0.0, 1.0),
        "rv": (0.0, 1.0),
        "rv2": (-0.1, 1.0),
        "svcca": (0.0, 1.0),
        "pwcca": (0.0, 1.0),
    }
)

#: Human-readable name of each measure, used in colour-bar and axis labels.
MEASURE_LABELS: Mapping[str, str] = MappingProxyType(
    {
        "linear_cka": "linear CKA",
        "debiased_cka": "debiased CKA",
        "rbf_cka": "RBF CKA",
        "rv": "RV",
        "rv2": "RV2",
        "svcca": "SVCCA",
        "pwcca": "PWCCA",
    }
)

#: Colour of NaN / non-finite cells in heatmaps and convergence maps.
NAN_COLOR = "#d3d3d3"  # light grey: outside viridis, readable on white paper

_CMAP = colormaps["viridis"].with_extremes(bad=NAN_COLOR)

# Layout constants (inches / points). Cells are about 0.2 in; axes grow with the number of
# layers between the two bounds, and tick labels shrink from 10 pt down to 5 pt to fit.
_CELL_IN = 0.2
_MIN_AXES_IN = 2.4
_MAX_AXES_IN = 11.0
_MIN_FONT_PT = 5.0
_MAX_FONT_PT = 10.0
_MAX_LABEL_CHARS = 40
_ANNOTATE_MAX_CELLS = 12  # write the numbers into the cells up to 12 x 12
_DEFAULT_DPI = 100

_TAG_INVALID = re.compile(r"[^\w.\-]")


# --------------------------------------------------------------------------- validation


def _as_array(x: Any, name: str, ndim: int) -> np.ndarray:
    """Return ``x`` as a float64 NumPy array of ``ndim`` dimensions (tensors go to the CPU)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().to("cpu").double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise RepSimValueError(f"`{name}` must be numeric, could not convert it: {err}") from err
    if arr.ndim != ndim:
        raise RepSimValueError(
            f"`{name}` must have {ndim} dimension(s), got shape {tuple(arr.shape)}."
        )
    if arr.size == 0:
        raise RepSimValueError(f"`{name}` is empty (shape {tuple(arr.shape)}); nothing to draw.")
    return arr


def _labels(labels: Sequence[Any], expected: int, name: str, axis: str) -> list[str]:
    out = [str(label) for label in labels]
    if len(out) != expected:
        raise RepSimValueError(
            f"`{name}` has {len(out)} entries but the matrix has {expected} {axis}; "
            "pass one label per " + axis.rstrip("s") + "."
        )
    return out


def _value_range(
    measure: str, value_range: Optional[tuple[float, float]]
) -> tuple[float, float]:
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise RepSimValueError(
                f"`value_range` must be two finite numbers (low, high) with low < high, "
                f"got {value_range!r}."
            )
        return lo, hi
    try:
        return MEASURE_RANGES[measure]
    except KeyError:
        raise RepSimValueError(
            f"Unknown measure {measure!r}: choose one of {sorted(MEASURE_RANGES)} "
            "or pass `value_range=(low, high)` explicitly."
        ) from None


def _measure_label(measure: str) -> str:
    return MEASURE_LABELS.get(measure, measure)


def _steps(steps: Sequence[Any], expected: int) -> list[int]:
    out = [int(s) for s in steps]
    if len(out) != expected:
        raise RepSimValueError(
            f"`steps` has {len(out)} entries but `values` has {expected} columns (one per step)."
        )
    if any(b <= a for a, b in zip(out, out[1:])):
        raise RepSimValueError(f"`steps` must be strictly increasing, got {out}.")
    return out


# --------------------------------------------------------------------------- layout helpers


class _MarginLayout(LayoutEngine):
    """Fit one axes, and optionally a colour bar to its right, into the figure at draw time.

    The only layouts drawn here are "axes + colour bar" and "axes + legend outside on the
    right", so instead of the general constrained layout (a constraint solver run twice, each
    time measuring every artist) this measures how far the tick labels, axis labels, titles and
    legend of each axes stick out of it (``get_tightbbox(for_layout_only=True)``), then sizes
    the axes so that all of it lies inside the figure with a small padding. The colour bar has a
    fixed width and the axes' height. One measuring pass is enough here: how far labels stick
    out hardly depends on the axes' size (by a pixel or so, through auto tick locators and the
    legend's anchor in axes coordinates, which the padding absorbs). The figure size never
    changes, and the layout is redone at every draw (after a change, at another dpi...), as
    with Matplotlib's own engines. A draw costs about 20 ms less than with
    ``layout="constrained"`` (whose solver measures every artist several times).
    """

    _adjust_compatible = False
    _colorbar_gridspec = False

    def __init__(self, ax: Any, cax: Any = None, *, pad_in: float = 0.04, gap_in: float = 0.05,
                 cbar_width_in: float = 0.16, passes: int = 1) -> None:
        super().__init__()
        self._ax, self._cax = ax, cax
        self._params = {"pad_in": pad_in, "gap_in": gap_in, "cbar_width_in": cbar_width_in,
                        "passes": passes}

    def set(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(self._params)
        if unknown:
            raise TypeError(f"unknown layout parameter(s): {sorted(unknown)}")
        self._params.update(kwargs)

    @staticmethod
    def _overhang(fig: Figure, ax: Any, renderer: Any) -> tuple[float, float, float, float]:
        """Pixels by which ``ax``'s decorations stick out (left, right, bottom, top)."""
        box = ax.get_position(original=True).transformed(fig.transFigure)
        # Spines and the background patch lie on the axes' edges (a spine sticks out by half
        # its line width, which the padding absorbs); measuring them would update every tick.
        extra = [a for a in ax.get_default_bbox_extra_artists()
                 if not isinstance(a, Spine) and a is not ax.patch]
        tight = ax.get_tightbbox(renderer, for_layout_only=True, bbox_extra_artists=extra)
        if tight is None:
            return 0.0, 0.0, 0.0, 0.0
        return (max(0.0, box.x0 - tight.x0), max(0.0, tight.x1 - box.x1),
                max(0.0, box.y0 - tight.y0), max(0.0, tight.y1 - box.y1))

    def execute(self, fig: Figure) -> None:
        get_renderer = getattr(fig, "_get_renderer", None)
        renderer = get_renderer() if get_renderer is not None else fig.canvas.get_renderer()
        width, height = fig.bbox.width, fig.bbox.height
        px = fig.dpi  # pixels per inch
        pad, gap = self._params["pad_in"] * px, self._params["gap_in"] * px
        cbar_w = self._params["cbar_width_in"] * px if self._cax is not None else 0.0
        for _ in range(int(self._params["passes"])):
            left, right, bottom, top = self._overhang(fig, self._ax, renderer)
            c_left = c_right = c_bottom = c_top = 0.0
            if self._cax is not None:
                c_left, c_right, c_bottom, c_top = self._overhang(fig, self._cax, renderer)
            x0 = pad + left
            y0 = pad + max(bottom, c_bottom)
            side = (right + gap + c_left + cbar_w + c_right) if self._cax is not None else right
            ax_w = width - x0 - side - pad
            ax_h = height - y0 - pad - max(top, c_top)
            if ax_w < 1.0 or ax_h < 1.0:  # the figure is too small for its labels: leave it be
                return
            self._ax.set_position([x0 / width, y0 / height, ax_w / width, ax_h / height])
            self._ax.set_in_layout(True)  # set_position() takes an axes out of layouts
            if self._cax is not None:
                cx = x0 + ax_w + right + gap + c_left
                self._cax.set_position([cx / width, y0 / height, cbar_w / width, ax_h / height])
                self._cax.set_in_layout(True)


def _new_figure(width_in: float, height_in: float, dpi: int = _DEFAULT_DPI, *,
                colorbar: bool = False) -> tuple[Figure, Any, Any]:
    """A figure on its own Agg canvas (never registered with pyplot), with its main axes and,
    if asked, an axes for a colour bar on its right (else ``None``); laid out by
    :class:`_MarginLayout` at draw time."""
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cax = fig.add_axes((0.9, ax.get_position().y0, 0.03, ax.get_position().height)) if colorbar else None
    fig.set_layout_engine(_MarginLayout(ax, cax))
    return fig, ax, cax


def _shorten(label: str, max_chars: int = _MAX_LABEL_CHARS) -> str:
    """Shorten a long label from the left, on dot boundaries where possible.

    The end of a module name tells layers apart, so that is kept:
    ``model.encoder.layers.3.self_attention.out_proj`` -> ``...layers.3.self_attention.out_proj``
    (with a one-character ellipsis).
    """
    if len(label) <= max_chars:
        return label
    tail = ""
    for part in reversed(label.split(".")):
        candidate = part if not tail else f"{part}.{tail}"
        if len(candidate) + 1 > max_chars:
            break
        tail = candidate
    if not tail:
        tail = label[-(max_chars - 1):]
    return "\u2026" + tail


def _shorten_all(labels: Sequence[str], max_chars: int = _MAX_LABEL_CHARS) -> list[str]:
    """Shorten every label, unless that would make two different labels look the same."""
    short = [_shorten(s, max_chars) for s in labels]
    if len(set(short)) < len(set(labels)):
        return list(labels)
    return short


def _axes_inches(n: int) -> float:
    return float(np.clip(n * _CELL_IN, _MIN_AXES_IN, _MAX_AXES_IN))


def _tick_font(n: int, axes_in: float) -> float:
    cell_pt = axes_in * 72.0 / n
    return float(np.clip(0.6 * cell_pt, _MIN_FONT_PT, _MAX_FONT_PT))


def _tick_stride(n: int, axes_in: float, font_pt: float) -> int:
    """Label every k-th tick so that labels never overlap (k = 1 up to ~100 layers)."""
    cell_pt = axes_in * 72.0 / n
    return max(1, math.ceil(1.2 * font_pt / cell_pt))


def _text_inches(labels: Sequence[str], font_pt: float) -> float:
    longest = max((len(s) for s in labels), default=0)
    return longest * font_pt * 0.62 / 72.0


def _set_layer_ticks(ax: Any, axis: Literal["x", "y"], shown: list[str], font_pt: float,
                     stride: int) -> None:
    """Label every ``stride``-th cell with its layer name (x labels rotated by 90 degrees), with
    short tick marks.

    The style is set before the ticks exist, so each tick is created with it instead of being
    restyled afterwards (a tick is five artists; restyling them costs milliseconds per figure).
    """
    idx = list(range(0, len(shown), stride))
    ax.tick_params(axis=axis, length=2, labelsize=font_pt, labelrotation=90 if axis == "x" else 0)
    (ax.set_xticks if axis == "x" else ax.set_yticks)(idx, [shown[i] for i in idx])


def _set_title(ax: Any, title: str, font_pt: float) -> None:
    """Title the axes at its top edge (plus Matplotlib's title padding).

    An explicit ``y`` turns off Matplotlib's automatic title placement, which measures the
    y axis at every draw to dodge tick labels on top of the axes; the figures here have none.
    """
    ax.set_title(title, fontsize=font_pt, y=1.0)


def _nan_note(values: np.ndarray) -> str:
    n_nan = int(np.isnan(values).sum())
    n_inf = int(np.isinf(values).sum())
    if n_nan + n_inf == 0:
        return ""
    what = "NaN" if n_inf == 0 else ("Inf" if n_nan == 0 else "NaN/Inf")
    cells = n_nan + n_inf
    return f"grey = {what} ({cells} cell{'s' if cells != 1 else ''})"


def _matrix_image(ax: Any, values: np.ndarray, lo: float, hi: float) -> Any:
    """Draw a matrix as cells (row 0 at the top, NaN cells in the colour map's "bad" grey)."""
    return ax.imshow(np.ma.masked_invalid(values), cmap=_CMAP, vmin=lo, vmax=hi, origin="upper", aspect="auto",
                     interpolation="nearest")


def _colorbar(fig: Figure, mappable: Any, cax: Any, label: str, note: str, lo: float) -> Any:
    # A range that starts below 0 (debiased CKA, RV2) can be undershot: show the arrow.
    cbar = fig.colorbar(mappable, cax=cax, extend="min" if lo < 0 else "neither")
    cbar.set_label(label + (f"\n{note}" if note else ""), fontsize=10)
    cbar.ax.tick_params(labelsize=8)
    return cbar


def _annotate(ax: Any, values: np.ndarray, lo: float, hi: float, font_pt: float) -> None:
    norm = Normalize(lo, hi, clip=True)
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            text, colour = f"{v:.2f}", ("black" if norm(v) > 0.55 else "white")
        else:
            text, colour = "NaN" if np.isnan(v) else f"{v}", "dimgray"
        ax.text(j, i, text, ha="center", va="center", fontsize=font_pt, color=colour)


# --------------------------------------------------------------------------- figures


def heatmap_figure(
    matrix: Any,
    row_labels: Sequence[Any],
    col_labels: Sequence[Any],
    *,
    measure: str,
    title: Optional[str] = None,
    row_title: Optional[str] = None,
    col_title: Optional[str] = None,
    value_range: Optional[tuple[float, float]] = None,
    annotate: Optional[bool] = None,
    dpi: int = _DEFAULT_DPI,
) -> Figure:
    """Draw a layer x layer similarity matrix as a heatmap.

    Row ``i`` is drawn at the top for ``i = 0`` (origin top-left), so with labels in execution
    order the input layers come first on both axes. The colour range is the fixed
    :data:`MEASURE_RANGES` entry of ``measure`` whatever the data; values outside it are clipped
    in colour only. Non-finite cells are light grey and counted in the colour-bar label.
    The figure grows with the number of layers (cells of ~0.2 in, axes between 2.4 and 11 in)
    and tick labels shrink from 10 pt to 5 pt. Labels longer than 40 characters keep their end
    (``...layers.3.self_attention.out_proj``) unless that would make two alike; beyond ~100
    layers only every k-th tick is labelled. Up to 12 x 12 the values are written in the cells.

    Args:
        matrix: ``(n_rows, n_cols)`` similarities; ``matrix[i, j]`` compares row layer ``i``
            with column layer ``j``.
        row_labels: one name per row (e.g. the module names of network A, input first).
        col_labels: one name per column.
        measure: a key of :data:`MEASURE_RANGES` (``"linear_cka"``, ``"rv2"``...); sets the
            colour range and the colour-bar label.
        title: figure title, none by default.
        row_title: y-axis label (e.g. ``"run A, step 1000"``).
        col_title: x-axis label.
        value_range: ``(low, high)`` colour range overriding the measure's fixed one (needed
            for a measure not in :data:`MEASURE_RANGES`).
        annotate: write the values into the cells; default: only up to 12 x 12.
        dpi: resolution of the figure (pixels per inch), for :func:`figure_to_array`.

    Returns:
        A :class:`~matplotlib.figure.Figure` on an Agg canvas; ``fig.axes[0]`` is the heatmap,
        ``fig.axes[1]`` the colour bar.

    Raises:
        RepSimValueError: if ``matrix`` is not 2-D and non-empty, a label list has the wrong
            length, or the measure is unknown and no ``value_range`` is given.

    Example:
        >>> import numpy as np
        >>> fig = heatmap_figure(np.eye(3), ["conv1", "conv2", "fc"], ["conv1", "conv2", "fc"],
        ...                      measure="linear_cka")
        >>> [t.get_text() for t in fig.axes[0].get_yticklabels()]
        ['conv1', 'conv2', 'fc']
        >>> fig.axes[0].images[0].get_clim()
        (0.0, 1.0)
    """
    values = _as_array(matrix, "matrix", 2)
    n_rows, n_cols = values.shape
    rows = _labels(row_labels, n_rows, "row_labels", "rows")
    cols = _labels(col_labels, n_cols, "col_labels", "columns")
    lo, hi = _value_range(measure, value_range)

    axes_w, axes_h = _axes_inches(n_cols), _axes_inches(n_rows)
    font = min(_tick_font(n_cols, axes_w), _tick_font(n_rows, axes_h))
    shown_rows, shown_cols = _shorten_all(rows), _shorten_all(cols)
    width = axes_w + _text_inches(shown_rows, font) + 1.6 + (0.3 if row_title else 0.0)
    height = axes_h + _text_inches(shown_cols, font) + 0.5 + (0.4 if title else 0.0) + (
        0.3 if col_title else 0.0
    )
    fig, ax, cax = _new_figure(width, height, dpi, colorbar=True)
    image = _matrix_image(ax, values, lo, hi)
    _set_layer_ticks(ax, "x", shown_cols, font, _tick_stride(n_cols, axes_w, font))
    _set_layer_ticks(ax, "y", shown_rows, font, _tick_stride(n_rows, axes_h, font))
    if row_title:
        ax.set_ylabel(row_title)
    if col_title:
        ax.set_xlabel(col_title)
    if title:
        _set_title(ax, title, 11)
    if annotate or (annotate is None and max(n_rows, n_cols) <= _ANNOTATE_MAX_CELLS):
        cell_pt = min(axes_w / n_cols, axes_h / n_rows) * 72.0
        _annotate(ax, values, lo, hi, float(np.clip(0.3 * cell_pt, 5.0, 10.0)))
    _colorbar(fig, image, cax, _measure_label(measure), _nan_note(values), lo)
    return fig



class HeatmapFrames:
    """Many heatmaps of one series (same labels, measure and title), fast enough for every step.

    Labels, axis titles and the colour bar are drawn once by :func:`heatmap_figure`; each
    :meth:`render` then repaints only the cells' pixels with the same colour map and fixed
    colour range (NaN cells light grey), which takes milliseconds instead of a full matplotlib
    draw. Values are not written into the cells; use :func:`heatmap_figure` for that.

    Example:
        >>> import numpy as np
        >>> frames = HeatmapFrames(["conv1", "fc"], ["conv1", "fc"], measure="linear_cka")
        >>> image = frames.render(np.array([[1.0, 0.3], [0.3, np.nan]]))
        >>> image.dtype, image.shape == frames.render(np.eye(2)).shape
        (dtype('uint8'), True)
    """

    def __init__(
        self,
        row_labels: Sequence[Any],
        col_labels: Sequence[Any],
        *,
        measure: str,
        title: Optional[str] = None,
        row_title: Optional[str] = None,
        col_title: Optional[str] = None,
        value_range: Optional[tuple[float, float]] = None,
        dpi: int = _DEFAULT_DPI,
    ) -> None:
        self.shape = (len(row_labels), len(col_labels))
        fig = heatmap_figure(np.zeros(self.shape), row_labels, col_labels, measure=measure, title=title,
                             row_title=row_title, col_title=col_title, value_range=value_range,
                             annotate=False, dpi=dpi)
        self._template = figure_to_array(fig)
        height = self._template.shape[0]
        n_rows, n_cols = self.shape
        to_pixels = fig.axes[0].transData.transform
        x_edges = to_pixels(np.c_[np.arange(n_cols + 1) - 0.5, np.zeros(n_cols + 1)])[:, 0]
        y_edges = height - to_pixels(np.c_[np.zeros(n_rows + 1), np.arange(n_rows + 1) - 0.5])[:, 1]
        x_edges, y_edges = np.round(x_edges).astype(int), np.round(y_edges).astype(int)
        # Paint strictly inside the axes so the spines drawn on its border stay visible.
        self._x = slice(x_edges[0] + 1, x_edges[-1] - 1)
        self._y = slice(y_edges[0] + 1, y_edges[-1] - 1)
        # How many pixel columns/rows each cell covers inside the painted area: np.repeat of the
        # cell colours by these counts is the painted block (3-4x faster than gathering by index).
        column_of = np.searchsorted(x_edges[1:-1], np.arange(self._x.start, self._x.stop), side="right")
        row_of = np.searchsorted(y_edges[1:-1], np.arange(self._y.start, self._y.stop), side="right")
        self._column_widths = np.bincount(column_of, minlength=n_cols)
        self._row_heights = np.bincount(row_of, minlength=n_rows)
        self._norm = Normalize(*_value_range(measure, value_range), clip=True)

    def render(self, matrix: Any) -> np.ndarray:
        """The heatmap of ``matrix`` as an ``(H, W, 3)`` ``uint8`` image (for add_image, HWC)."""
        values = _as_array(matrix, "matrix", 2)
        if values.shape != self.shape:
            raise RepSimValueError(f"HeatmapFrames was made for {self.shape} matrices; got {values.shape}.")
        colours = _CMAP(self._norm(np.ma.masked_invalid(values)), bytes=True)[..., :3]
        image = self._template.copy()
        image[self._y, self._x] = np.repeat(np.repeat(colours, self._row_heights, axis=0), self._column_widths, axis=1)
        return image


def convergence_map_figure(
    values: Any,
    layer_names: Sequence[Any],
    steps: Sequence[int],
    *,
    measure: str,
    reference: str = "final snapshot",
    threshold: Optional[float] = None,
    sustained: bool = True,
    title: Optional[str] = None,
    value_range: Optional[tuple[float, float]] = None,
    dpi: int = _DEFAULT_DPI,
) -> Figure:
    """Draw a layer x step map of each layer's similarity to a reference (the final snapshot).

    Rows are layers (input first, at the top), columns are snapshots in order; columns have
    equal width whatever the spacing of ``steps`` and the x ticks show the actual step numbers.
    The colour range is fixed per measure as in :func:`heatmap_figure`. With ``threshold``, a
    white-edged marker shows each layer's :func:`convergence_steps` step, which makes
    bottom-up convergence visible as a staircase.

    Args:
        values: ``(n_layers, n_steps)``; ``values[l, t]`` is the similarity of layer ``l`` at
            ``steps[t]`` to the same layer in the reference.
        layer_names: one name per row.
        steps: strictly increasing global steps, one per column.
        measure: a key of :data:`MEASURE_RANGES`.
        reference: what the layers are compared with, for the colour-bar label.
        threshold: if given, mark each layer's convergence step (see :func:`convergence_steps`).
        sustained: passed to :func:`convergence_steps`.
        title: figure title, none by default.
        value_range: ``(low, high)`` overriding the measure's colour range.
        dpi: resolution of the figure.

    Returns:
        A :class:`~matplotlib.figure.Figure`; ``fig.axes[0]`` is the map.

    Raises:
        RepSimValueError: on shapes, names or steps that do not match, or an unknown measure.

    Example:
        >>> import numpy as np
        >>> fig = convergence_map_figure(np.array([[0.5, 0.9, 1.0], [0.2, 0.6, 1.0]]),
        ...                              ["conv1", "fc"], [0, 100, 200], measure="linear_cka")
        >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
        ['0', '100', '200']
    """
    data = _as_array(values, "values", 2)
    n_layers, n_steps = data.shape
    names = _labels(layer_names, n_layers, "layer_names", "rows")
    step_list = _steps(steps, n_steps)
    lo, hi = _value_range(measure, value_range)

    axes_w = float(np.clip(n_steps * 0.25, 4.0, 10.0))
    axes_h = _axes_inches(n_layers)
    font = _tick_font(n_layers, axes_h)
    shown = _shorten_all(names)
    width = axes_w + _text_inches(shown, font) + 1.9
    height = axes_h + 1.0 + (0.4 if title else 0.0) + (0.3 if threshold is not None else 0.0)
    fig, ax, cax = _new_figure(width, height, dpi, colorbar=True)
    image = _matrix_image(ax, data, lo, hi)
    _set_layer_ticks(ax, "y", shown, font, _tick_stride(n_layers, axes_h, font))
    n_xticks = min(n_steps, max(2, int(axes_w / 0.6)))
    x_idx = sorted({int(round(i)) for i in np.linspace(0, n_steps - 1, n_xticks)})
    ax.tick_params(axis="x", length=2, labelsize=8)  # before the ticks exist, see _set_layer_ticks
    ax.set_xticks(x_idx, [str(step_list[i]) for i in x_idx])
    ax.set_xlabel("step")
    if threshold is not None:
        reached = convergence_steps(data, step_list, threshold, sustained=sustained)
        pos = {s: i for i, s in enumerate(step_list)}
        pts = [(pos[s], row) for row, s in enumerate(reached) if s is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, marker="o", s=min(30.0, (font * 0.8) ** 2), c="white",
                       edgecolors="black", linewidths=0.6, zorder=3)
        how = "held to the end" if sustained else "first reached"
        _set_title(ax, (f"{title}\n" if title else "") + f"\u25cb convergence: \u2265 {threshold:g} "
                   f"\u00d7 final value, {how}", 9 if not title else 10)
    elif title:
        _set_title(ax, title, 11)
    _colorbar(fig, image, cax, f"{_measure_label(measure)} to {reference}", _nan_note(data), lo)
    return fig


def curves_figure(
    values: Any,
    layer_names: Sequence[Any],
    steps: Sequence[int],
    *,
    measure: str,
    threshold: Optional[float] = None,
    reference: str = "final snapshot",
    title: Optional[str] = None,
    value_range: Optional[tuple[float, float]] = None,
    xscale: Literal["auto", "linear", "log"] = "auto",
    dpi: int = _DEFAULT_DPI,
) -> Figure:
    """Plot one similarity-vs-step curve per layer, coloured by depth.

    Colours run along viridis from dark (input layers) to light (output layers). Up to 12
    layers get a legend; beyond that a depth colour bar labelled with a few layer names.
    The y-axis spans the measure's fixed range (plus a small margin) so figures are
    comparable; NaN points leave gaps in a curve.

    Args:
        values: ``(n_layers, n_steps)`` similarities, as for :func:`convergence_map_figure`.
        layer_names: one name per layer, input first.
        steps: strictly increasing global steps (the x coordinates).
        measure: a key of :data:`MEASURE_RANGES`.
        threshold: draw a dashed horizontal line at ``y = threshold``. For similarities to the
            final snapshot (whose final value is 1) this is the level used by
            :func:`convergence_steps`.
        reference: what the layers are compared with, for the y-axis label.
        title: figure title, none by default.
        value_range: ``(low, high)`` overriding the measure's range for the y-axis.
        xscale: ``"log"`` suits snapshots spaced geometrically (dense early in training), with
            a linear stretch around step 0 if it is among the steps; ``"auto"`` (default) picks
            it when the gaps between steps differ by more than 4x, else ``"linear"``.
        dpi: resolution of the figure.

    Returns:
        A :class:`~matplotlib.figure.Figure`; ``fig.axes[0]`` holds one line per layer (in
        layer order), followed by the threshold line if any.

    Raises:
        RepSimValueError: on shapes, names or steps that do not match, or an unknown measure.

    Example:
        >>> import numpy as np
        >>> fig = curves_figure(np.array([[0.5, 0.9, 1.0], [0.2, 0.6, 1.0]]), ["conv1", "fc"],
        ...                     [0, 100, 200], measure="linear_cka", threshold=0.95)
        >>> [line.get_label() for line in fig.axes[0].get_lines()]
        ['conv1', 'fc', 'threshold 0.95']
    """
    data = _as_array(values, "values", 2)
    n_layers, n_steps = data.shape
    names = _labels(layer_names, n_layers, "layer_names", "rows")
    step_list = _steps(steps, n_steps)
    lo, hi = _value_range(measure, value_range)

    use_legend = n_layers <= 12
    shown = _shorten_all(names)
    legend_w = _text_inches(shown, 8.0) + 0.8 if use_legend else 1.8
    fig, ax, cax = _new_figure(6.5 + legend_w, 4.2 + (0.3 if title else 0.0), dpi,
                               colorbar=not use_legend)
    colours = colormaps["viridis"](np.linspace(0.0, 0.9, n_layers))
    marker = "o" if n_steps <= 30 else None
    for row, name in enumerate(names):
        ax.plot(step_list, data[row], color=colours[row], marker=marker, markersize=3,
                linewidth=1.4, label=name)
    if threshold is not None:
        ax.axhline(threshold, color="0.3", linestyle="--", linewidth=1.0,
                   label=f"threshold {threshold:g}")
    pad = 0.03 * (hi - lo)
    ax.set_ylim(lo - pad, hi + pad)
    _set_step_scale(ax, step_list, xscale)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{_measure_label(measure)} to {reference}")
    ax.grid(True, linewidth=0.4, alpha=0.5)
    if title:
        _set_title(ax, title, 11)
    if use_legend:
        handles, labels = ax.get_legend_handles_labels()
        labels = shown + labels[n_layers:]  # the threshold line, if any, comes last
        ax.legend(handles, labels, loc="center left",
                  bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    else:
        depth_cmap = colormaps["viridis"].resampled(256)
        sm = ScalarMappable(norm=Normalize(0, (n_layers - 1) / 0.9), cmap=depth_cmap)
        cbar = fig.colorbar(sm, cax=cax)
        tick_idx = sorted({int(round(i)) for i in np.linspace(0, n_layers - 1, 6)})
        cbar.set_ticks(tick_idx, labels=[shown[i] for i in tick_idx])
        cbar.ax.set_ylim(0, n_layers - 1)
        cbar.ax.invert_yaxis()  # input layers at the top, as in the maps
        cbar.ax.tick_params(labelsize=7)
        cbar.set_label("layer (depth)", fontsize=9)
    return fig


def _set_step_scale(ax: Any, steps: list[int], xscale: str) -> None:
    if xscale not in ("auto", "linear", "log"):
        raise RepSimValueError(f"`xscale` must be 'auto', 'linear' or 'log', got {xscale!r}.")
    gaps = np.diff(steps)
    positive = [s for s in steps if s > 0]
    if xscale == "auto":
        uneven = gaps.size >= 2 and gaps.max() > 4 * gaps.min()
        xscale = "log" if uneven and positive else "linear"
    if xscale == "log":
        if not positive:
            raise RepSimValueError(f"`xscale='log'` needs a positive step, got steps {steps}.")
        if min(steps) <= 0:  # keep the init snapshot (step 0) on the axis
            ax.set_xscale("symlog", linthresh=min(positive), linscale=0.5)
            ax.set_xlim(left=min(steps))  # no empty negative half
        else:
            ax.set_xscale("log")


def figure_to_array(fig: Figure) -> np.ndarray:
    """Rasterise a figure to an ``(H, W, 3)`` ``uint8`` RGB array.

    The result is what ``SummaryWriter.add_image(tag, array, step, dataformats="HWC")`` wants.
    ``H`` and ``W`` are the figure size in inches times its dpi. Works for any figure; one
    without an Agg canvas gets one attached.

    Example:
        >>> import numpy as np
        >>> img = figure_to_array(heatmap_figure(np.ones((2, 2)), ["a", "b"], ["a", "b"],
        ...                                      measure="rv"))
        >>> img.ndim, img.shape[2], img.dtype
        (3, 3, dtype('uint8'))
    """
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # one copy, of the RGB channels


# --------------------------------------------------------------------------- convergence


def convergence_steps(
    values: Any,
    steps: Sequence[int],
    threshold: float = 0.95,
    *,
    sustained: bool = True,
) -> list[Optional[int]]:
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
        raise RepSimValueError(
            f"`threshold` is a fraction of the final similarity in (0, 1], got {threshold!r}."
        )
    data = _as_array(values, "values", 2)
    step_list = _steps(steps, data.shape[1])
    result: list[Optional[int]] = []
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


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "'")


def summary_table(
    layer_names: Sequence[Any],
    conv_steps: Sequence[Optional[int]],
    *,
    final_values: Optional[Sequence[float]] = None,
    fmt: Literal["markdown", "text"] = "markdown",
    step_header: str = "converged at step",
    final_header: str = "final value",
) -> str:
    """Tabulate each layer's convergence step, in depth order.

    ``fmt="markdown"`` gives a GitHub-flavoured table that TensorBoard's text plugin renders
    (layer names in code spans, so ``_`` and ``*`` stay literal and ``|`` is escaped);
    ``fmt="text"`` gives aligned plain-text columns for terminals and logs. A layer whose step
    is ``None`` reads ``not reached``.

    Args:
        layer_names: one name per layer, input first.
        conv_steps: one step (or ``None``) per layer, e.g. from :func:`convergence_steps`.
        final_values: optional last value per layer, shown with 4 decimals (``nan`` kept).
        fmt: ``"markdown"`` or ``"text"``.
        step_header: header of the step column.
        final_header: header of the final-value column.

    Raises:
        RepSimValueError: on lengths that differ or an unknown ``fmt``.

    Example:
        >>> print(summary_table(["conv1", "fc"], [100, None], fmt="text"))
        #  layer  converged at step
        0  conv1                100
        1  fc           not reached
        >>> print(summary_table(["conv1"], [100]))
        | # | layer | converged at step |
        |--:|:--|--:|
        | 0 | `conv1` | 100 |
    """
    names = [str(n) for n in layer_names]
    if len(conv_steps) != len(names):
        raise RepSimValueError(
            f"`conv_steps` has {len(conv_steps)} entries for {len(names)} layers."
        )
    if final_values is not None and len(final_values) != len(names):
        raise RepSimValueError(
            f"`final_values` has {len(final_values)} entries for {len(names)} layers."
        )
    if fmt not in ("markdown", "text"):
        raise RepSimValueError(f"`fmt` must be 'markdown' or 'text', got {fmt!r}.")
    headers = ["#", "layer", step_header]
    rows = [
        [str(i), name, "not reached" if s is None else str(int(s))]
        for i, (name, s) in enumerate(zip(names, conv_steps))
    ]
    if final_values is not None:
        headers.append(final_header)
        for row, v in zip(rows, final_values):
            row.append(f"{float(v):.4f}")
    if fmt == "markdown":
        lines = ["| " + " | ".join(_md_escape(h) for h in headers) + " |"]
        lines.append("|" + "|".join(":--" if c == 1 else "--:" for c in range(len(headers)))
                     + "|")
        for row in rows:
            cells = [row[0], f"`{_md_escape(row[1])}`", *row[2:]]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    widths = [max(len(r[c]) for r in [headers, *rows]) for c in range(len(headers))]

    def line(cells: list[str]) -> str:  # '#' and layer left-aligned, numbers right-aligned
        parts = [cell.rjust(w) if c >= 2 else cell.ljust(w)
                 for c, (cell, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    return "\n".join(line(r) for r in [headers, *rows])


# --------------------------------------------------------------------------- file writers


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # read once at import, like open() would apply it


@contextlib.contextmanager
def _atomic_open(path: PathLike, mode: str, **kwargs: Any) -> Iterator[IO[Any]]:
    """Write to a temporary file beside ``path`` and ``os.replace`` it into place on success.

    Readers, and a process killed mid-write, never leave a half-written file at ``path``; on
    error the temporary file is removed and an existing ``path`` is left untouched. Missing
    parent directories are created. There is deliberately no ``fsync``: every file written
    here is derived output (figures, CSV/JSON copies of results) that a rerun regenerates, and
    syncing costs milliseconds per file on a real disk, at every logging step. (After a power
    loss or OS crash a file may be missing or empty; a killed process cannot cause that.)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
    values = _as_array(matrix, "matrix", 2)
    rows = _labels(row_labels, values.shape[0], "row_labels", "rows")
    cols = _labels(col_labels, values.shape[1], "col_labels", "columns")
    with _atomic_open(path, "w", newline="", encoding="utf-8") as handle:
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
                    f"JSON object keys must be strings; {where} has key {key!r} "
                    f"({type(key).__name__})."
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
    with _atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    return Path(path)


def save_png(fig: Figure, path: PathLike, *, dpi: Optional[float] = None) -> Path:
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
    with _atomic_open(path, "wb") as handle:
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
    return (_PNG_SIGNATURE + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows.data, compress_level))
            + _png_chunk(b"IEND", b""))


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
    with _atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def save_image_png(image: Any, path: PathLike) -> Path:
    """Save an ``(H, W, 3)`` ``uint8`` image (e.g. from :meth:`HeatmapFrames.render`) as PNG, atomically.

    Same as ``write_png_bytes(encode_png(image), path)``; when the image also goes to
    TensorBoard, encode it once and use :meth:`TensorBoardReporter.log_png` instead.
    """
    return write_png_bytes(encode_png(image), path)


# --------------------------------------------------------------------------- TensorBoard


def sanitize_tag(name: str) -> str:
    """Make one component of a TensorBoard tag: keep letters, digits, ``_``, ``.`` and ``-``.

    Every other character (``/``, spaces, brackets...) becomes ``_``; the empty name (the root
    module in ``named_modules()``) becomes ``_``. Module names are usually unchanged.

    Example:
        >>> sanitize_tag("features.0"), sanitize_tag("block 1/conv (3x3)"), sanitize_tag("")
        ('features.0', 'block_1_conv__3x3_', '_')
    """
    return _TAG_INVALID.sub("_", str(name)) or "_"


def make_tag(*parts: str) -> str:
    """Join tag parts with ``/``; each ``/``-separated component goes through
    :func:`sanitize_tag`.

    Raises:
        RepSimValueError: if a part has an empty component (``"a//b"``, a leading ``/``).

    Example:
        >>> make_tag("repsim/linear_cka", "init", "features.0")
        'repsim/linear_cka/init/features.0'
    """
    components = [c for part in parts for c in str(part).split("/")]
    if not components or any(c == "" for c in components):
        raise RepSimValueError(
            f"Tag parts {parts!r} contain an empty component; remove the doubled, leading or "
            "trailing '/'."
        )
    return "/".join(sanitize_tag(c) for c in components)


def scalar_tags(prefix: str, layer_names: Sequence[str]) -> dict[str, str]:
    """Map each layer name to its scalar tag ``f"{prefix}/{sanitize_tag(layer)}"``.

    The tags are stable across steps and runs. If two layer names sanitise to the same
    component (``"a b"`` and ``"a_b"``), later ones get ``_2``, ``_3``... appended, with one
    :class:`~lightning_repsim.errors.RepSimWarning`.

    Example:
        >>> scalar_tags("repsim/rv2/init", ["conv1", "fc"])
        {'conv1': 'repsim/rv2/init/conv1', 'fc': 'repsim/rv2/init/fc'}
    """
    base = make_tag(prefix)
    tags: dict[str, str] = {}
    used: set[str] = set()
    clashes: list[str] = []
    for name in layer_names:
        component = sanitize_tag(name)
        tag, k = f"{base}/{component}", 2
        while tag in used:
            tag, k = f"{base}/{component}_{k}", k + 1
        if k > 2:
            clashes.append(f"{name!r} -> {tag!r}")
        used.add(tag)
        tags[name] = tag
    if clashes:
        warnings.warn(
            "Layer names collide after tag sanitisation; renamed: " + ", ".join(clashes)
            + ". Give these layers distinct names to get clean tags.",
            RepSimWarning,
            stacklevel=2,
        )
    return tags


def _torch_file_writer(writer: Any) -> Any:
    """The event-file writer of a ``torch.utils.tensorboard.SummaryWriter``, else ``None``
    (tensorboardX and duck-typed writers use their own protobuf classes)."""
    module = sys.modules.get("torch.utils.tensorboard.writer")
    if module is None or not isinstance(writer, module.SummaryWriter):
        return None
    get = getattr(writer, "_get_file_writer", None)  # what add_image uses; reopens a closed writer
    file_writer = get() if get is not None else getattr(writer, "file_writer", None)
    return file_writer if hasattr(file_writer, "add_summary") else None


_CRC_MASK_DELTA = 0xA282EAD8


def _masked_crc32c_c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data`` (rotate right by 15, add a constant), computed in C."""
    import google_crc32c

    crc = google_crc32c.value(bytes(data))
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def accelerate_event_checksums() -> bool:
    """Let TensorBoard's event writer checksum its records in C; returns whether it now does.

    tensorboard frames every event record with a masked CRC-32C that it computes byte by byte in
    pure Python: about 5 ms per 40 KB heatmap PNG, during which its writer thread holds the GIL and
    the training loop waits. google-crc32c (a dependency) computes the same checksum in C. It
    replaces tensorboard's function only when its C extension loaded and both agree on a test
    record, so the event files are byte for byte what tensorboard would have written. The change
    is process-wide (every tensorboard writer benefits) and does not concern tensorboardX, which
    frames its records with its own code.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # google_crc32c warns on import when it falls back to Python
            import google_crc32c
        from tensorboard.summary.writer import record_writer
    except Exception:  # not installed, or an import that fails in any other way: keep tensorboard's own
        return False
    current = getattr(record_writer, "masked_crc32c", None)
    if current is _masked_crc32c_c:
        return True
    if current is None or google_crc32c.implementation != "c":
        return False
    sample = bytes(range(256)) * 3 + b"lightning_repsim"
    if current(sample) != _masked_crc32c_c(sample):
        return False
    record_writer.masked_crc32c = _masked_crc32c_c
    return True


class TensorBoardReporter:
    """Write similarity heatmaps, per-layer scalars, text and convergence plots to TensorBoard.

    Wraps a :class:`torch.utils.tensorboard.SummaryWriter`, which is what Lightning's
    ``TensorBoardLogger.experiment`` returns; the logger itself is also accepted and unwrapped.
    Tags follow the scheme in this module's docstring; every tag passes through
    :func:`make_tag`. Only call it on global rank zero (Lightning's logger is a no-op dummy on
    other ranks anyway).

    Args:
        writer: a ``SummaryWriter`` (or anything with ``add_image``, ``add_scalar`` and
            ``add_text``), or a Lightning ``TensorBoardLogger``.
        dpi: resolution of the images (pixels per inch of figure).

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> with SummaryWriter(tempfile.mkdtemp()) as writer:
        ...     tb = TensorBoardReporter(writer)
        ...     tb.log_layer_scalars("repsim/linear_cka/init", {"conv1": 0.8, "fc": 0.3}, step=10)
        ['repsim/linear_cka/init/conv1', 'repsim/linear_cka/init/fc']
    """

    def __init__(self, writer: Any, *, dpi: int = _DEFAULT_DPI) -> None:
        if not hasattr(writer, "add_image") and hasattr(writer, "experiment"):
            writer = writer.experiment
        missing = [m for m in ("add_image", "add_scalar", "add_text") if not hasattr(writer, m)]
        if missing:
            raise RepSimValueError(
                f"{type(writer).__name__} is not a TensorBoard SummaryWriter (no "
                f"{', '.join(missing)}); pass `TensorBoardLogger.experiment` or a SummaryWriter."
            )
        self.writer = writer
        self.dpi = dpi
        accelerate_event_checksums()

    def log_figure(self, tag: str, fig: Figure, step: int) -> np.ndarray:
        """Rasterise ``fig`` and log it as an image; returns the ``(H, W, 3)`` array."""
        image = figure_to_array(fig)
        self.log_png(tag, encode_png(image), step)
        return image

    def log_png(self, tag: str, png: bytes, step: int) -> None:
        """Log an image that is already PNG-encoded (from :func:`encode_png`) under ``tag``.

        With a ``torch.utils.tensorboard.SummaryWriter`` the bytes go into the event file as
        they are (an image ``Summary``, exactly what ``add_image`` writes, minus its own PNG
        encoding), so an image that is also saved with :func:`write_png_bytes` is encoded
        once. Other writers get the decoded array through ``add_image``.

        Raises:
            RepSimValueError: if ``png`` is not PNG data, or ``tag`` has an empty component.
        """
        height, width, channels = _png_header(png)
        tag = make_tag(tag)
        file_writer = _torch_file_writer(self.writer)
        if file_writer is None:
            import io

            from PIL import Image

            with Image.open(io.BytesIO(png)) as decoded:
                image = np.asarray(decoded.convert("RGBA" if channels in (2, 4) else "RGB"))
            self.writer.add_image(tag, image, global_step=int(step), dataformats="HWC")
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, image=Summary.Image(
            height=height, width=width, colorspace=channels, encoded_image_string=bytes(png)))])
        file_writer.add_summary(summary, int(step))

    def log_heatmap(
        self,
        tag: str,
        matrix: Any,
        row_labels: Sequence[Any],
        col_labels: Sequence[Any],
        *,
        measure: str,
        step: int,
        **figure_kwargs: Any,
    ) -> np.ndarray:
        """Log :func:`heatmap_figure` as an image under ``tag`` (e.g.
        ``repsim/linear_cka/init/heatmap``); extra keywords go to :func:`heatmap_figure`.

        Returns:
            The logged ``(H, W, 3)`` ``uint8`` image.
        """
        fig = heatmap_figure(matrix, row_labels, col_labels, measure=measure, dpi=self.dpi,
                             **figure_kwargs)
        return self.log_figure(tag, fig, step)

    def log_layer_scalars(
        self, prefix: str, values: Mapping[str, float], step: int
    ) -> list[str]:
        """Log one scalar per layer under ``f"{prefix}/{layer}"`` (see :func:`scalar_tags`).

        ``prefix`` is normally ``repsim/<measure>/<reference>``. Non-finite values are logged
        as they are (NaN stays NaN), so a degenerate layer is visible at its step.

        Returns:
            The tags written, in the order of ``values``.
        """
        tags = scalar_tags(prefix, list(values))
        for name, value in values.items():
            self.writer.add_scalar(tags[name], float(value), global_step=int(step))
        return list(tags.values())

    def log_text(self, tag: str, markdown: str, step: int) -> None:
        """Log markdown text (TensorBoard's text plugin renders it, tables included).

        TensorBoard stores it as a tensor under ``tag + "/text_summary"``.
        """
        self.writer.add_text(make_tag(tag), markdown, global_step=int(step))

    def log_convergence(
        self,
        prefix: str,
        values: Any,
        layer_names: Sequence[Any],
        steps: Sequence[int],
        *,
        measure: str,
        threshold: float = 0.95,
        sustained: bool = True,
        step: Optional[int] = None,
        reference: str = "final snapshot",
        png_dir: Optional[PathLike] = None,
        png_stem: str = "",
    ) -> list[Optional[int]]:
        """Log the convergence map, the curves and the summary table under ``prefix``.

        Writes images ``{prefix}/convergence_map`` and ``{prefix}/curves`` and the markdown
        text ``{prefix}/convergence_summary`` (normally ``prefix = "repsim/<measure>/final"``),
        all at ``step`` (default: the last of ``steps``).

        Args:
            prefix: tag prefix.
            values: ``(n_layers, n_steps)`` similarity of each layer to the reference.
            layer_names: one name per layer, input first.
            steps: strictly increasing global steps of the snapshots.
            measure: a key of :data:`MEASURE_RANGES`.
            threshold: level for :func:`convergence_steps`.
            sustained: see :func:`convergence_steps`.
            step: global step to log at.
            reference: what the layers are compared with.
            png_dir: if given, the two images are also saved there as
                ``{png_stem}convergence_map.png`` and ``{png_stem}curves.png`` (rendered once).

        Returns:
            The per-layer convergence steps, as :func:`convergence_steps` returns them.
        """
        data = _as_array(values, "values", 2)
        step_list = _steps(steps, data.shape[1])
        at = step_list[-1] if step is None else int(step)
        conv = convergence_steps(data, step_list, threshold, sustained=sustained)
        figures = {
            "convergence_map": convergence_map_figure(data, layer_names, step_list, measure=measure,
                                                      reference=reference, threshold=threshold,
                                                      sustained=sustained, dpi=self.dpi),
            "curves": curves_figure(data, layer_names, step_list, measure=measure, threshold=threshold,
                                    reference=reference, dpi=self.dpi),
        }
        for kind, fig in figures.items():
            png = encode_png(figure_to_array(fig))
            self.log_png(f"{prefix}/{kind}", png, at)
            if png_dir is not None:
                write_png_bytes(png, Path(png_dir) / f"{png_stem}{kind}.png")
        how = "and stays there until the end" if sustained else "for the first time"
        text = (
            f"**{_md_escape(_measure_label(measure))} to {_md_escape(reference)}**: the step at "
            f"which each layer reaches {threshold:g} \u00d7 its final value {how}.\n\n"
            + summary_table(layer_names, conv, final_values=list(data[:, -1]))
        )
        self.log_text(f"{prefix}/convergence_summary", text, at)
        return conv

    def flush(self) -> None:
        """Flush the underlying writer to disk."""
        if hasattr(self.writer, "flush"):
            self.writer.flush()
