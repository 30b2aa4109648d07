"""Layout shared by the figures: sizes that grow with the number of layers, shortened tick labels,
titles, colour bars and cell annotations, on Matplotlib's Agg canvas (see :mod:`.figures`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.layout_engine import LayoutEngine
from matplotlib.spines import Spine

#: Colour of NaN / non-finite cells in heatmaps and convergence maps.
NAN_COLOR = "#d3d3d3"  # light grey: outside viridis, readable on white paper

CMAP = colormaps["viridis"].with_extremes(bad=NAN_COLOR)

# Layout constants (inches / points). Cells are about 0.2 in; axes grow with the number of
# layers between the two bounds, and tick labels shrink from 10 pt down to 5 pt to fit.
_CELL_IN = 0.2
_MIN_AXES_IN = 2.4
_MAX_AXES_IN = 11.0
_MIN_FONT_PT = 5.0
_MAX_FONT_PT = 10.0
_MAX_LABEL_CHARS = 40
ANNOTATE_MAX_CELLS = 12  # write the numbers into the cells up to 12 x 12
DEFAULT_DPI = 100


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


def new_figure(
    width_in: float, height_in: float, dpi: int = DEFAULT_DPI, *, colorbar: bool = False
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


def shorten_all(labels: Sequence[str], max_chars: int = _MAX_LABEL_CHARS) -> list[str]:
    """Shorten every label, unless that would make two different labels look the same."""
    short = [_shorten(s, max_chars) for s in labels]
    if len(set(short)) < len(set(labels)):
        return list(labels)
    return short


def axes_inches(n: int) -> float:
    return float(np.clip(n * _CELL_IN, _MIN_AXES_IN, _MAX_AXES_IN))


def tick_font(n: int, axes_in: float) -> float:
    cell_pt = axes_in * 72.0 / n
    return float(np.clip(0.6 * cell_pt, _MIN_FONT_PT, _MAX_FONT_PT))


def tick_stride(n: int, axes_in: float, font_pt: float) -> int:
    """Label every k-th tick so that labels never overlap (k = 1 up to ~100 layers)."""
    cell_pt = axes_in * 72.0 / n
    return max(1, math.ceil(1.2 * font_pt / cell_pt))


def text_inches(labels: Sequence[str], font_pt: float) -> float:
    longest = max((len(s) for s in labels), default=0)
    return longest * font_pt * 0.62 / 72.0


def set_layer_ticks(ax: Any, axis: Literal["x", "y"], shown: list[str], font_pt: float, stride: int) -> None:
    """Label every ``stride``-th cell with its layer name (x labels rotated by 90 degrees), with
    short tick marks.

    The style is set before the ticks exist, so each tick is created with it instead of being
    restyled afterwards (a tick is five artists; restyling them costs milliseconds per figure).
    """
    idx = list(range(0, len(shown), stride))
    ax.tick_params(axis=axis, length=2, labelsize=font_pt, labelrotation=90 if axis == "x" else 0)
    (ax.set_xticks if axis == "x" else ax.set_yticks)(idx, [shown[i] for i in idx])


def set_title(ax: Any, title: str, font_pt: float) -> None:
    """Title the axes at its top edge (plus Matplotlib's title padding).

    An explicit ``y`` turns off Matplotlib's automatic title placement, which measures the
    y axis at every draw to dodge tick labels on top of the axes; the figures here have none.
    """
    ax.set_title(title, fontsize=font_pt, y=1.0)


def nan_note(values: np.ndarray) -> str:
    n_nan = int(np.isnan(values).sum())
    n_inf = int(np.isinf(values).sum())
    if n_nan + n_inf == 0:
        return ""
    what = "NaN" if n_inf == 0 else ("Inf" if n_nan == 0 else "NaN/Inf")
    cells = n_nan + n_inf
    return f"grey = {what} ({cells} cell{'s' if cells != 1 else ''})"


def matrix_image(ax: Any, values: np.ndarray, lo: float, hi: float) -> Any:
    """Draw a matrix as cells (row 0 at the top, NaN cells in the colour map's "bad" grey)."""
    return ax.imshow(
        np.ma.masked_invalid(values),
        cmap=CMAP,
        vmin=lo,
        vmax=hi,
        origin="upper",
        aspect="auto",
        interpolation="nearest",
    )


def colorbar(fig: Figure, mappable: Any, cax: Any, label: str, note: str, lo: float) -> Any:
    # A range that starts below 0 (debiased CKA, RV2) can be undershot: show the arrow.
    cbar = fig.colorbar(mappable, cax=cax, extend="min" if lo < 0 else "neither")
    cbar.set_label(label + (f"\n{note}" if note else ""), fontsize=10)
    cbar.ax.tick_params(labelsize=8)
    return cbar


def annotate_cells(ax: Any, values: np.ndarray, lo: float, hi: float, font_pt: float) -> None:
    norm = Normalize(lo, hi, clip=True)
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            text, colour = f"{v:.2f}", ("black" if norm(v) > 0.55 else "white")
        else:
            text, colour = "NaN" if np.isnan(v) else f"{v}", "dimgray"
        ax.text(j, i, text, ha="center", va="center", fontsize=font_pt, color=colour)
