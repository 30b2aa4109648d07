"""Figures: heatmaps, convergence maps and per-layer curves, drawn with Matplotlib's Agg canvas.

Pure rendering: every function takes arrays and names (and what the analysis computed, such as
each layer's convergence step) and knows nothing about capture, callbacks or the snapshot store.

Matplotlib is used through the non-interactive Agg canvas *only*: each figure is a
:class:`matplotlib.figure.Figure` with its own :class:`~matplotlib.backends.backend_agg.
FigureCanvasAgg`. ``matplotlib.pyplot`` is never imported and the global backend is never
changed, so rendering works headless, inside worker threads and next to a user's interactive
session, and figures are freed by the garbage collector like any other object (nothing is
registered in pyplot's figure manager, so nothing leaks).

Colour scale:
    Every measure has one fixed colour range, :data:`~lightning_repsim.report.MEASURE_RANGES`, used
    by every heatmap and convergence map regardless of the data, so frames logged at different steps
    (and figures of different runs) are comparable by eye. Values outside the range are clipped
    *in colour only*; CSV and JSON files always carry the exact numbers. Non-finite cells (a dead
    layer, a diverged run) are drawn in light grey (:data:`NAN_COLOR`) and counted in the
    colour-bar label.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.layout_engine import LayoutEngine
from matplotlib.spines import Spine

from lightning_repsim.errors import RepSimValueError
from lightning_repsim.report._common import (
    as_array,
    check_labels,
    check_steps,
    colour_range,
    figure_to_array,
    measure_label,
)
from lightning_repsim.report.ties import TIES_CAPTION, outline_cells

__all__ = ["NAN_COLOR", "HeatmapFrames", "convergence_map_figure", "curves_figure", "freeze_figure", "heatmap_figure"]

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

    def __init__(
        self,
        ax: Any,
        cax: Any = None,
        *,
        pad_in: float = 0.04,
        gap_in: float = 0.05,
        cbar_width_in: float = 0.16,
        passes: int = 1,
    ) -> None:
        super().__init__()
        self._ax, self._cax = ax, cax
        self._params = {"pad_in": pad_in, "gap_in": gap_in, "cbar_width_in": cbar_width_in, "passes": passes}

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
        extra = [a for a in ax.get_default_bbox_extra_artists() if not isinstance(a, Spine) and a is not ax.patch]
        tight = ax.get_tightbbox(renderer, for_layout_only=True, bbox_extra_artists=extra)
        if tight is None:
            return 0.0, 0.0, 0.0, 0.0
        return (
            max(0.0, box.x0 - tight.x0),
            max(0.0, tight.x1 - box.x1),
            max(0.0, box.y0 - tight.y0),
            max(0.0, tight.y1 - box.y1),
        )

    def execute(self, fig: Figure) -> None:
        get_renderer = getattr(fig, "_get_renderer", None)
        renderer = get_renderer() if get_renderer is not None else fig.canvas.get_renderer()  # type: ignore[attr-defined]
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


def _new_figure(
    width_in: float, height_in: float, dpi: int = _DEFAULT_DPI, *, colorbar: bool = False
) -> tuple[Figure, Any, Any]:
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
        tail = label[-(max_chars - 1) :]
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


def _set_layer_ticks(ax: Any, axis: Literal["x", "y"], shown: list[str], font_pt: float, stride: int) -> None:
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
    return ax.imshow(
        np.ma.masked_invalid(values),
        cmap=_CMAP,
        vmin=lo,
        vmax=hi,
        origin="upper",
        aspect="auto",
        interpolation="nearest",
    )


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
    title: str | None = None,
    row_title: str | None = None,
    col_title: str | None = None,
    value_range: tuple[float, float] | None = None,
    annotate: bool | None = None,
    dpi: int = _DEFAULT_DPI,
    ties: Any = None,
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
        ties: an optional boolean mask of the matrix's shape (from
            :func:`~lightning_repsim.report.ties.row_ties`): those cells are outlined and the title
            gains the legend line :data:`~lightning_repsim.report.ties.TIES_CAPTION`.

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
    values = as_array(matrix, "matrix", 2)
    n_rows, n_cols = values.shape
    rows = check_labels(row_labels, n_rows, "row_labels", "rows")
    cols = check_labels(col_labels, n_cols, "col_labels", "columns")
    lo, hi = colour_range(measure, value_range)

    axes_w, axes_h = _axes_inches(n_cols), _axes_inches(n_rows)
    font = min(_tick_font(n_cols, axes_w), _tick_font(n_rows, axes_h))
    shown_rows, shown_cols = _shorten_all(rows), _shorten_all(cols)
    width = axes_w + _text_inches(shown_rows, font) + 1.6 + (0.3 if row_title else 0.0)
    height = axes_h + _text_inches(shown_cols, font) + 0.5 + (0.4 if title else 0.0) + (0.3 if col_title else 0.0)
    height += 0.4 if ties is not None else 0.0  # the legend line
    fig, ax, cax = _new_figure(width, height, dpi, colorbar=True)
    image = _matrix_image(ax, values, lo, hi)
    _set_layer_ticks(ax, "x", shown_cols, font, _tick_stride(n_cols, axes_w, font))
    _set_layer_ticks(ax, "y", shown_rows, font, _tick_stride(n_rows, axes_h, font))
    if row_title:
        ax.set_ylabel(row_title)
    if col_title:
        ax.set_xlabel(col_title)
    if ties is not None:
        if np.shape(ties) != values.shape:
            raise RepSimValueError(f"`ties` has shape {np.shape(ties)}, the matrix {values.shape}.")
        outline_cells(ax, ties)
        title = f"{title}\n{TIES_CAPTION}" if title else TIES_CAPTION
    if title:
        _set_title(ax, title, 11)
    if annotate or (annotate is None and max(n_rows, n_cols) <= _ANNOTATE_MAX_CELLS):
        cell_pt = min(axes_w / n_cols, axes_h / n_rows) * 72.0
        _annotate(ax, values, lo, hi, float(np.clip(0.3 * cell_pt, 5.0, 10.0)))
    _colorbar(fig, image, cax, measure_label(measure), _nan_note(values), lo)
    return fig


class HeatmapFrames:
    """Many heatmaps of one series (same labels, measure and title), fast enough for every step.

    Labels, axis titles and the colour bar are drawn once by :func:`heatmap_figure`; each
    :meth:`render` then repaints only the cells' pixels with the same colour map and fixed
    colour range (NaN cells light grey), writes the step beside the title and, up to 12 x 12, the
    values into the cells (as :func:`heatmap_figure` does), which takes milliseconds instead of a
    full matplotlib draw.

    Example:
        >>> import numpy as np
        >>> frames = HeatmapFrames(["conv1", "fc"], ["conv1", "fc"], measure="linear_cka", title="linear_cka vs init")
        >>> image = frames.render(np.array([[1.0, 0.3], [0.3, np.nan]]), step=100)
        >>> image.dtype, image.shape == frames.render(np.eye(2)).shape
        (dtype('uint8'), True)
    """

    def __init__(
        self,
        row_labels: Sequence[Any],
        col_labels: Sequence[Any],
        *,
        measure: str,
        title: str | None = None,
        row_title: str | None = None,
        col_title: str | None = None,
        value_range: tuple[float, float] | None = None,
        annotate: bool | None = None,
        dpi: int = _DEFAULT_DPI,
    ) -> None:
        self.shape = (len(row_labels), len(col_labels))
        fig = heatmap_figure(
            np.zeros(self.shape),
            row_labels,
            col_labels,
            measure=measure,
            title=title,
            row_title=row_title,
            col_title=col_title,
            value_range=value_range,
            annotate=False,
            dpi=dpi,
        )
        self._template = figure_to_array(fig)
        height = self._template.shape[0]
        n_rows, n_cols = self.shape
        ax = fig.axes[0]
        to_pixels = ax.transData.transform
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
        self._norm = Normalize(*colour_range(measure, value_range), clip=True)
        # where the values and the step go, and in which font (the figure's own, at its size)
        self._centres = ((x_edges[:-1] + x_edges[1:]) / 2, (y_edges[:-1] + y_edges[1:]) / 2)
        self._annotate = max(self.shape) <= _ANNOTATE_MAX_CELLS if annotate is None else annotate
        cell_pt = min((x_edges[1] - x_edges[0]), (y_edges[1] - y_edges[0])) * 72.0 / dpi
        self._value_px = float(np.clip(0.3 * cell_pt, 5.0, 10.0)) * dpi / 72.0
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
        box = ax.title.get_window_extent(renderer) if ax.get_title() else None
        self._step_px = 11 * dpi / 72.0
        self._step_at = (
            (box.x1 + 0.6 * self._step_px, height - (box.y0 + box.y1) / 2)
            if box is not None
            else (x_edges[0], max(self._step_px, y_edges[0] - 1.2 * self._step_px))
        )

    def render(self, matrix: Any, step: int | None = None) -> np.ndarray:
        """The heatmap of ``matrix`` as an ``(H, W, 3)`` ``uint8`` image (for add_image, HWC), with
        ``step`` written beside the title when given."""
        values = as_array(matrix, "matrix", 2)
        if values.shape != self.shape:
            raise RepSimValueError(f"HeatmapFrames was made for {self.shape} matrices; got {values.shape}.")
        colours = _CMAP(self._norm(np.ma.masked_invalid(values)), bytes=True)[..., :3]
        image = self._template.copy()
        image[self._y, self._x] = np.repeat(np.repeat(colours, self._row_heights, axis=0), self._column_widths, axis=1)
        if self._annotate:
            light = np.asarray(self._norm(np.nan_to_num(values))) > 0.55  # dark text on light cells
            for (i, j), v in np.ndenumerate(values):
                if np.isfinite(v):
                    text, colour = f"{v:.2f}", (_BLACK if light[i, j] else _WHITE)
                else:
                    text, colour = "NaN" if np.isnan(v) else f"{v}", _DIM_GREY
                _paint_text(image, text, self._value_px, self._centres[0][j], self._centres[1][i], colour, "mm")
        if step is not None:
            _paint_text(image, f"step {int(step)}", self._step_px, *self._step_at, _BLACK, "lm")
        return image


_BLACK, _WHITE, _DIM_GREY = (0, 0, 0), (255, 255, 255), (105, 105, 105)


def _paint_text(
    image: np.ndarray, text: str, size_px: float, x: float, y: float, colour: tuple[int, ...], anchor: str
) -> None:
    """Blend ``text`` (Matplotlib's font, anti-aliased) into ``image`` in place, anchored at ``(x, y)``
    (PIL's anchors: ``"mm"`` centred, ``"lm"`` left-middle). Glyph masks are cached, so repainting the
    values of a heatmap costs blits, not text layout."""
    mask, (dx, dy) = _text_mask(text, round(size_px), anchor)
    x0, y0 = int(round(x)) + dx, int(round(y)) + dy
    h, w = mask.shape
    y1, x1 = min(y0 + h, image.shape[0]), min(x0 + w, image.shape[1])
    if x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
        return
    alpha = mask[: y1 - y0, : x1 - x0, None].astype(np.float32) / 255.0
    region = image[y0:y1, x0:x1].astype(np.float32)
    image[y0:y1, x0:x1] = (region * (1.0 - alpha) + np.asarray(colour, np.float32) * alpha).round().astype(np.uint8)


@functools.lru_cache(maxsize=4096)
def _text_mask(text: str, size_px: int, anchor: str) -> tuple[np.ndarray, tuple[int, int]]:
    """The coverage mask of ``text`` and its offset from the anchor point."""
    from PIL import Image, ImageDraw

    font = _truetype(size_px)
    left, top, right, bottom = font.getbbox(text, anchor=anchor)
    canvas = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(canvas).text((-left, -top), text, fill=255, font=font, anchor=anchor)
    return np.asarray(canvas), (left, top)


@functools.lru_cache(maxsize=16)
def _truetype(size_px: int) -> Any:
    from matplotlib import font_manager
    from PIL import ImageFont

    return ImageFont.truetype(font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans")), size_px)


def convergence_map_figure(
    values: Any,
    layer_names: Sequence[Any],
    steps: Sequence[int],
    *,
    measure: str,
    reference: str = "final snapshot",
    converged: Sequence[int | None] | None = None,
    threshold: float | None = None,
    sustained: bool = True,
    title: str | None = None,
    value_range: tuple[float, float] | None = None,
    dpi: int = _DEFAULT_DPI,
) -> Figure:
    """Draw a layer x step map of each layer's similarity to a reference (the final snapshot).

    Rows are layers (input first, at the top), columns are snapshots in order; columns have
    equal width whatever the spacing of ``steps`` and the x ticks show the actual step numbers.
    The colour range is fixed per measure as in :func:`heatmap_figure`. With ``converged`` (each
    layer's convergence step, from :func:`lightning_repsim.analysis.convergence_steps`), a
    white-edged marker shows where each layer converged, which makes bottom-up convergence
    visible as a staircase; ``threshold`` and ``sustained`` then say in the title how.

    Args:
        values: ``(n_layers, n_steps)``; ``values[l, t]`` is the similarity of layer ``l`` at
            ``steps[t]`` to the same layer in the reference.
        layer_names: one name per row.
        steps: strictly increasing global steps, one per column.
        measure: a key of :data:`MEASURE_RANGES`.
        reference: what the layers are compared with, for the colour-bar label.
        converged: one step of ``steps`` (or ``None``) per layer, marked on the map.
        threshold: the level ``converged`` was computed with, for the title.
        sustained: whether ``converged`` asks the level to hold to the end, for the title.
        title: figure title, none by default.
        value_range: ``(low, high)`` overriding the measure's colour range.
        dpi: resolution of the figure.

    Returns:
        A :class:`~matplotlib.figure.Figure`; ``fig.axes[0]`` is the map.

    Raises:
        RepSimValueError: on shapes, names or steps that do not match, a ``converged`` step that
            is not among ``steps``, or an unknown measure.

    Example:
        >>> import numpy as np
        >>> fig = convergence_map_figure(np.array([[0.5, 0.9, 1.0], [0.2, 0.6, 1.0]]),
        ...                              ["conv1", "fc"], [0, 100, 200], measure="linear_cka")
        >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
        ['0', '100', '200']
    """
    data = as_array(values, "values", 2)
    n_layers, n_steps = data.shape
    names = check_labels(layer_names, n_layers, "layer_names", "rows")
    step_list = check_steps(steps, n_steps)
    lo, hi = colour_range(measure, value_range)

    axes_w = float(np.clip(n_steps * 0.25, 4.0, 10.0))
    axes_h = _axes_inches(n_layers)
    font = _tick_font(n_layers, axes_h)
    shown = _shorten_all(names)
    width = axes_w + _text_inches(shown, font) + 1.9
    height = axes_h + 1.0 + (0.4 if title else 0.0) + (0.3 if converged is not None else 0.0)
    fig, ax, cax = _new_figure(width, height, dpi, colorbar=True)
    image = _matrix_image(ax, data, lo, hi)
    _set_layer_ticks(ax, "y", shown, font, _tick_stride(n_layers, axes_h, font))
    n_xticks = min(n_steps, max(2, int(axes_w / 0.6)))
    x_idx = sorted({int(round(i)) for i in np.linspace(0, n_steps - 1, n_xticks)})
    ax.tick_params(axis="x", length=2, labelsize=8)  # before the ticks exist, see _set_layer_ticks
    ax.set_xticks(x_idx, [str(step_list[i]) for i in x_idx])
    ax.set_xlabel("step")
    if converged is not None:
        if len(converged) != n_layers:
            raise RepSimValueError(f"`converged` has {len(converged)} entries for {n_layers} layers.")
        pos = {s: i for i, s in enumerate(step_list)}
        stray = [s for s in converged if s is not None and s not in pos]
        if stray:
            raise RepSimValueError(f"`converged` names steps {stray} that are not among `steps`.")
        pts = [(pos[s], row) for row, s in enumerate(converged) if s is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(
                xs,
                ys,
                marker="o",
                s=min(30.0, (font * 0.8) ** 2),
                c="white",
                edgecolors="black",
                linewidths=0.6,
                zorder=3,
            )
        how = "held to the end" if sustained else "first reached"
        level = f"\u2265 {threshold:g} \u00d7 final value, " if threshold is not None else ""
        _set_title(ax, (f"{title}\n" if title else "") + f"\u25cb convergence: {level}{how}", 9 if not title else 10)
    elif title:
        _set_title(ax, title, 11)
    _colorbar(fig, image, cax, f"{measure_label(measure)} to {reference}", _nan_note(data), lo)
    return fig


def curves_figure(
    values: Any,
    layer_names: Sequence[Any],
    steps: Sequence[int],
    *,
    measure: str,
    threshold: float | None = None,
    reference: str = "final snapshot",
    title: str | None = None,
    value_range: tuple[float, float] | None = None,
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
    data = as_array(values, "values", 2)
    n_layers, n_steps = data.shape
    names = check_labels(layer_names, n_layers, "layer_names", "rows")
    step_list = check_steps(steps, n_steps)
    lo, hi = colour_range(measure, value_range)

    use_legend = n_layers <= 12
    shown = _shorten_all(names)
    legend_w = _text_inches(shown, 8.0) + 0.8 if use_legend else 1.8
    fig, ax, cax = _new_figure(6.5 + legend_w, 4.2 + (0.3 if title else 0.0), dpi, colorbar=not use_legend)
    colours = colormaps["viridis"](np.linspace(0.0, 0.9, n_layers))
    marker = "o" if n_steps <= 30 else None
    for row, name in enumerate(names):
        ax.plot(step_list, data[row], color=colours[row], marker=marker, markersize=3, linewidth=1.4, label=name)
    if threshold is not None:
        ax.axhline(threshold, color="0.3", linestyle="--", linewidth=1.0, label=f"threshold {threshold:g}")
    pad = 0.03 * (hi - lo)
    ax.set_ylim(lo - pad, hi + pad)
    _set_step_scale(ax, step_list, xscale)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{measure_label(measure)} to {reference}")
    ax.grid(True, linewidth=0.4, alpha=0.5)
    if title:
        _set_title(ax, title, 11)
    if use_legend:
        handles, labels = ax.get_legend_handles_labels()
        labels = shown + labels[n_layers:]  # the threshold line, if any, comes last
        ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
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


def freeze_figure(
    fraction: Sequence[tuple[int, float]],
    units: Sequence[tuple[int, float]],
    event_steps: Sequence[int],
    *,
    dpi: int = _DEFAULT_DPI,
) -> Figure:
    """Freeze training over time: the fraction of parameters frozen (a step plot), the number of
    frozen units (dashed, right axis) and a dotted line at each freeze event.

    Args:
        fraction: ``(step, fraction of parameters frozen)`` pairs, ascending.
        units: ``(step, frozen units)`` pairs, ascending.
        event_steps: the step of each freeze event (one per unit frozen).
        dpi: resolution of the figure.

    Example:
        >>> fig = freeze_figure([(0, 0.0), (5, 0.4)], [(0, 0), (5, 1)], [5])
        >>> fig.axes[0].get_title()
        'freeze training: 1 event(s)'
    """
    fig = Figure(figsize=(7.0, 3.6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if fraction:
        steps, values = zip(*fraction)
        ax.step(
            steps,
            values,
            where="post",
            color="tab:blue",
            marker="o",
            markersize=3,
            label="fraction of parameters frozen",
        )
    if units:
        twin = ax.twinx()
        steps, values = zip(*units)
        twin.step(steps, values, where="post", color="tab:orange", linestyle="--", label="frozen units")
        twin.set_ylabel("frozen units")
        twin.yaxis.get_major_locator().set_params(integer=True)  # type: ignore[call-arg]
    for step in sorted(set(event_steps)):
        ax.axvline(step, color="0.5", linestyle=":", linewidth=0.8)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of parameters frozen")
    ax.set_title(f"freeze training: {len(event_steps)} event(s)", fontsize=10)
    ax.grid(True, linewidth=0.4, alpha=0.5)
    return fig
