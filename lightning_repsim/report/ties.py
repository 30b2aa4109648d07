"""Statistical ties in a similarity matrix: which cells of a row cannot be told apart from the row's best.

:func:`row_ties` computes the mask (a pure function of the values and their confidence intervals);
:func:`outline_cells` draws it on a heatmap's axes. :func:`~lightning_repsim.report.heatmap_figure`
takes the mask as ``ties=``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle

from lightning_repsim.errors import RepSimValueError
from lightning_repsim.report._common import as_array

__all__ = ["TIES_CAPTION", "outline_cells", "row_ties"]

#: The legend line of a heatmap whose tied cells are outlined.
TIES_CAPTION = "outlined: interval overlaps the row's best"


def row_ties(values: Any, low: Any, high: Any) -> np.ndarray:
    """Per row, the cells whose confidence interval overlaps that of the row's best cell.

    The row's best is the column of its largest ``value`` (the argmax a layer-identification test
    takes; NaN cells never win). Cell ``j`` is tied with the best ``b`` when the two intervals
    overlap, ``low[j] <= high[b]`` and ``high[j] >= low[b]``: at the intervals' level the data do
    not say which of the two is the more similar. The best cell itself is always in the mask; a
    cell with a NaN interval never is, and a row with no finite value has no tied cell.

    Args:
        values: ``(R, C)`` similarities.
        low: ``(R, C)`` lower ends of their intervals.
        high: ``(R, C)`` upper ends.

    Returns:
        A boolean ``(R, C)`` array.

    Example:
        >>> row_ties([[0.9, 0.85, 0.2]], [[0.8, 0.7, 0.1]], [[0.95, 0.82, 0.3]])
        array([[ True,  True, False]])
    """
    v = as_array(values, "values", 2)
    lo, hi = as_array(low, "low", 2), as_array(high, "high", 2)
    if lo.shape != v.shape or hi.shape != v.shape:
        raise RepSimValueError(f"`low` {lo.shape} and `high` {hi.shape} must have the shape of `values` {v.shape}.")
    mask = np.zeros(v.shape, dtype=bool)
    for i, row in enumerate(v):
        finite = np.isfinite(row)
        if not finite.any():
            continue
        best = int(np.nanargmax(np.where(finite, row, -np.inf)))
        with np.errstate(invalid="ignore"):
            mask[i] = (lo[i] <= hi[i, best]) & (hi[i] >= lo[i, best])  # NaN compares False
        mask[i, best] = True
    return mask


def outline_cells(ax: Axes, mask: Any, *, inset: float = 0.07, linewidth: float = 1.4) -> int:
    """Outline the cells of ``mask`` on a heatmap drawn with cell ``(i, j)`` centred at ``(j, i)``: a white
    line on a black one, inset so that neighbouring outlines stay apart and read on any colour; returns
    the number outlined."""
    cells = np.argwhere(np.asarray(mask, dtype=bool))
    side = 1.0 - 2.0 * inset
    for i, j in cells:
        for color, width in (("black", 2.2 * linewidth), ("white", linewidth)):
            ax.add_patch(
                Rectangle(
                    (j - 0.5 + inset, i - 0.5 + inset),
                    side,
                    side,
                    fill=False,
                    edgecolor=color,
                    linewidth=width,
                    zorder=3,
                )
            )
    return int(len(cells))
