"""Tables of per-layer results: markdown for TensorBoard's text plugin, aligned text for terminals."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Optional

from lightning_repsim.errors import RepSimValueError
from lightning_repsim.report._common import md_escape

__all__ = ["summary_table"]


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
        lines = ["| " + " | ".join(md_escape(h) for h in headers) + " |"]
        lines.append("|" + "|".join(":--" if c == 1 else "--:" for c in range(len(headers)))
                     + "|")
        for row in rows:
            cells = [row[0], f"`{md_escape(row[1])}`", *row[2:]]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    widths = [max(len(r[c]) for r in [headers, *rows]) for c in range(len(headers))]

    def line(cells: list[str]) -> str:  # '#' and layer left-aligned, numbers right-aligned
        parts = [cell.rjust(w) if c >= 2 else cell.ljust(w)
                 for c, (cell, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    return "\n".join(line(r) for r in [headers, *rows])


