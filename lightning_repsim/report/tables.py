"""Tables of per-layer results: markdown for TensorBoard's text plugin, aligned text for terminals."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from lightning_repsim.errors import RepSimValueError
from lightning_repsim.report._common import md_escape

__all__ = ["comparison_summary", "summary_table", "text_table"]


def summary_table(
    layer_names: Sequence[Any],
    conv_steps: Sequence[int | None],
    *,
    final_values: Sequence[float] | None = None,
    fmt: Literal["markdown", "text"] = "markdown",
    step_header: str = "converged at step",
    final_header: str = "final value",
    extra: Mapping[str, Sequence[str]] | None = None,
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
        extra: more columns after the step column, ``{header: one preformatted cell per layer}``
            (e.g. the convergence step's interval).

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
        raise RepSimValueError(f"`conv_steps` has {len(conv_steps)} entries for {len(names)} layers.")
    if final_values is not None and len(final_values) != len(names):
        raise RepSimValueError(f"`final_values` has {len(final_values)} entries for {len(names)} layers.")
    if fmt not in ("markdown", "text"):
        raise RepSimValueError(f"`fmt` must be 'markdown' or 'text', got {fmt!r}.")
    headers = ["#", "layer", step_header]
    rows = [
        [str(i), name, "not reached" if s is None else str(int(s))]
        for i, (name, s) in enumerate(zip(names, conv_steps))
    ]
    for header, cells in (extra or {}).items():
        if len(cells) != len(names):
            raise RepSimValueError(f"column {header!r} has {len(cells)} entries for {len(names)} layers.")
        headers.append(header)
        for row, cell in zip(rows, cells):
            row.append(str(cell))
    if final_values is not None:
        headers.append(final_header)
        for row, v in zip(rows, final_values):
            row.append(f"{float(v):.4f}")
    if fmt == "markdown":
        lines = ["| " + " | ".join(md_escape(h) for h in headers) + " |"]
        lines.append("|" + "|".join(":--" if c == 1 else "--:" for c in range(len(headers))) + "|")
        for row in rows:
            cells = [row[0], f"`{md_escape(row[1])}`", *row[2:]]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    return text_table(headers, rows, left=2)  # '#' and layer left-aligned, numbers right-aligned


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, left: int = 1) -> str:
    """Aligned plain-text columns: the first ``left`` columns left-aligned, the others right-aligned.

    Example:
        >>> print(text_table(["layer", "rv2"], [["conv1", "0.9500"], ["fc", "nan"]]))
        layer     rv2
        conv1  0.9500
        fc        nan
    """
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[c]) for r in cells) for c in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(w) if c < left else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))).rstrip()
        for row in cells
    )


def comparison_summary(layers_a: Sequence[str], layers_b: Sequence[str], matrices: Mapping[str, Any]) -> str:
    """The values of same-named layers in both runs, else the best match in B of each layer of A.

    Example:
        >>> import numpy as np
        >>> print(comparison_summary(["conv", "fc"], ["conv", "fc"], {"rv2": np.array([[0.9, 0.1], [0.2, 0.8]])}))
        same layer in both runs:
        layer     rv2
        conv   0.9000
        fc     0.8000
    """
    index_b = {name: j for j, name in enumerate(layers_b)}
    shared = [(i, name) for i, name in enumerate(layers_a) if name in index_b]
    if shared:
        rows = [[name, *(_number(float(m[i, index_b[name]])) for m in matrices.values())] for i, name in shared]
        return "same layer in both runs:\n" + text_table(["layer", *matrices], rows)
    first, values = next(iter(matrices.items()))
    rows = []
    for i, name in enumerate(layers_a):
        row = np.asarray(values[i], dtype=np.float64)
        if np.isfinite(row).any():
            j = int(np.nanargmax(row))
            rows.append([name, layers_b[j], _number(float(row[j]))])
        else:
            rows.append([name, "-", "nan"])
    return f"layer names differ; best {first} match in B of each layer of A:\n" + text_table(
        ["layer A", "layer B", first], rows
    )


def _number(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.4f}"
