"""What the figures, file writers and TensorBoard sinks share: input checks and measure metadata.

Every function of :mod:`lightning_repsim.report` takes arrays (NumPy arrays, ``torch.Tensor`` or
nested sequences) and names; these helpers turn them into float64 arrays and label lists with one
clear error each, and give each measure its fixed colour range and its human-readable name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_repsim.errors import RepSimValueError

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


def as_array(x: Any, name: str, ndim: int) -> np.ndarray:
    """Return ``x`` as a float64 NumPy array of ``ndim`` dimensions (tensors go to the CPU)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().to("cpu").double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise RepSimValueError(f"`{name}` must be numeric, could not convert it: {err}") from err
    if arr.ndim != ndim:
        raise RepSimValueError(f"`{name}` must have {ndim} dimension(s), got shape {tuple(arr.shape)}.")
    if arr.size == 0:
        raise RepSimValueError(f"`{name}` is empty (shape {tuple(arr.shape)}); nothing to draw.")
    return arr


def check_labels(labels: Sequence[Any], expected: int, name: str, axis: str) -> list[str]:
    out = [str(label) for label in labels]
    if len(out) != expected:
        raise RepSimValueError(
            f"`{name}` has {len(out)} entries but the matrix has {expected} {axis}; "
            "pass one label per " + axis.rstrip("s") + "."
        )
    return out


def colour_range(measure: str, value_range: tuple[float, float] | None) -> tuple[float, float]:
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise RepSimValueError(
                f"`value_range` must be two finite numbers (low, high) with low < high, got {value_range!r}."
            )
        return lo, hi
    try:
        return MEASURE_RANGES[measure]
    except KeyError:
        raise RepSimValueError(
            f"Unknown measure {measure!r}: choose one of {sorted(MEASURE_RANGES)} "
            "or pass `value_range=(low, high)` explicitly."
        ) from None


def measure_label(measure: str) -> str:
    return MEASURE_LABELS.get(measure, measure)


def check_steps(steps: Sequence[Any], expected: int) -> list[int]:
    out = [int(s) for s in steps]
    if len(out) != expected:
        raise RepSimValueError(f"`steps` has {len(out)} entries but `values` has {expected} columns (one per step).")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise RepSimValueError(f"`steps` must be strictly increasing, got {out}.")
    return out


def figure_to_array(fig: Figure) -> np.ndarray:
    """Rasterise a figure to an ``(H, W, 3)`` ``uint8`` RGB array.

    The result is what ``SummaryWriter.add_image(tag, array, step, dataformats="HWC")`` wants.
    ``H`` and ``W`` are the figure size in inches times its dpi. Works for any figure; one
    without an Agg canvas gets one attached.

    Example:
        >>> import numpy as np
        >>> from lightning_repsim.report import heatmap_figure
        >>> img = figure_to_array(heatmap_figure(np.ones((2, 2)), ["a", "b"], ["a", "b"],
        ...                                      measure="rv"))
        >>> img.ndim, img.shape[2], img.dtype
        (3, 3, dtype('uint8'))
    """
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # one copy, of the RGB channels


def md_escape(text: str) -> str:
    """Escape text for a markdown table cell (TensorBoard's text plugin)."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "'")
