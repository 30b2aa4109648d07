"""Canonical correlation measures: SVCCA (Raghu et al. 2017) and PWCCA (Morcos et al. 2018).

Rows are examples; both sides are column-centred first. Canonical correlations are the singular
values of ``Qxᵀ Qy`` where Q are orthonormal bases of the centred column spaces from a
rank-revealing SVD, never from inverted covariance matrices: rank-deficient inputs and constant
columns give correct values, and no correlation exceeds 1.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from lightning_repsim.errors import RepSimValueError, RepSimWarning
from lightning_repsim.functional._validation import (
    MIN_MEANINGFUL_EXAMPLES,
    TensorLike,
    as_matrix,
    check_examples,
    few_examples_message,
    finite_or_zero,
    refuse_grad,
    warn_degenerate,
)


@dataclass
class _Basis:
    centred: torch.Tensor  # (n, p) float64
    basis: torch.Tensor  # (n, k) orthonormal columns, top-k left singular vectors
    problem: str | None


def _numerical_rank(singular_values: torch.Tensor, shape: torch.Size) -> int:
    """NumPy's matrix_rank rule: singular values above max(n, p) * eps * s_max."""
    if singular_values.numel() == 0 or float(singular_values[0]) == 0.0:
        return 0
    tolerance = singular_values[0] * max(shape) * torch.finfo(torch.float64).eps
    return int((singular_values > tolerance).sum())


def _kept_directions(singular_values: torch.Tensor, rank: int, keep: float | int | None) -> int:
    if keep is None:
        return rank
    if isinstance(keep, float):
        energy = singular_values[:rank].square()
        fraction = torch.cumsum(energy, 0) / energy.sum()
        # The small tolerance keeps keep=1.0 from dropping a direction to rounding.
        k = int(torch.searchsorted(fraction, torch.tensor(keep - 1e-12, dtype=fraction.dtype, device=fraction.device)))
        return min(k + 1, rank)
    return min(keep, rank)


def _validate_keep(keep: object) -> float | int:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise RepSimValueError(
            f"keep must be a float in (0, 1] (variance fraction) or an int >= 1 (directions); got {keep!r}."
        )
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise RepSimValueError(
            f"a float keep is the fraction of variance to keep and must lie in (0, 1]; got {keep}. "
            "Pass an int to keep a number of directions."
        )
    if isinstance(keep, int) and keep < 1:
        raise RepSimValueError(f"an int keep is a number of directions and must be >= 1; got {keep}.")
    return keep


def _left_singular(centred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors (n, min(n, p)) and singular values of an (n, p) matrix.

    For wide layers (p > n) the SVD is taken of the n x n triangle R of ``centredᵀ = Q R``: then
    ``centred = Rᵀ Qᵀ`` has Rᵀ's left singular vectors and singular values exactly (Q is orthonormal),
    and the p x n factors LAPACK would otherwise form are never built (4x faster at 1024 x 4096).
    """
    n, p = centred.shape
    if p > n:
        triangle = torch.linalg.qr(centred.T, mode="r").R
        u, s, _ = torch.linalg.svd(triangle.T)
    else:
        u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    return u, s


def _basis(x: torch.Tensor, keep: float | int | None) -> _Basis:
    x, bad = finite_or_zero(x.to(torch.float64))
    centred = x - x.mean(0, keepdim=True)
    u, s = _left_singular(centred)
    rank = _numerical_rank(s, centred.shape)
    problem = "it contains NaN or Inf" if bad else None
    raw = float(x.square().sum())
    if problem is None and (rank == 0 or float(s[0]) ** 2 <= 1e-20 * raw):
        problem = "it has zero variance (a constant or dead layer)"
    k = _kept_directions(s, rank, keep) if problem is None else 0
    return _Basis(centred, u[:, :k], problem)


def canonical_correlations(x: TensorLike, y: TensorLike) -> torch.Tensor:
    """All min(rank x, rank y) canonical correlations of centred x and y, in descending order.

    Example:
        >>> import torch
        >>> x = torch.randn(50, 3, dtype=torch.float64)
        >>> canonical_correlations(x, x @ torch.randn(3, 3, dtype=torch.float64)).round(decimals=6).tolist()
        [1.0, 1.0, 1.0]
    """
    x, y = as_matrix(x, "x"), as_matrix(y, "y")
    refuse_grad("canonical_correlations", x, y)
    check_examples({"x": x.shape, "y": y.shape}, 2, "canonical correlation")
    bx, by = _basis(x, None), _basis(y.to(x.device), None)
    return torch.linalg.svdvals(bx.basis.T @ by.basis).clamp(0.0, 1.0)


def _pwcca_from_side(
    basis: torch.Tensor, rotation: torch.Tensor, centred: torch.Tensor, correlations: torch.Tensor
) -> torch.Tensor:
    """Weights from one side's canonical variates h_i = Q a_i: alpha_i = sum_j |<h_i, x_j>|."""
    variates = basis @ rotation  # (n, m), orthonormal columns
    weights = (variates.T @ centred).abs().sum(1)
    return (weights * correlations).sum() / weights.sum()


def cca_matrix(
    names_x: list[str],
    mats_x: list[torch.Tensor],
    other: tuple[list[str], list[torch.Tensor]] | None,
    n: int,
    measure: str,
    keep: Any = 0.99,
) -> tuple[torch.Tensor, dict[str, str]]:
    """SVCCA or PWCCA for all pairs; ``other=None`` compares the x side with itself.

    Each layer's SVD is taken once; one GEMM of all bases gives every pair's ``Qxᵀ Qy`` block, and
    for a symmetric input each unordered pair is decomposed once (PWCCA reads both directions off it).
    """
    keep_value = _validate_keep(keep) if measure == "svcca" else None
    device = mats_x[0].device
    bases_x = [_basis(m, keep_value) for m in mats_x]
    symmetric = other is None
    names_y, bases_y = (names_x, bases_x) if other is None else (other[0], [_basis(m, keep_value) for m in other[1]])
    problems = {name: b.problem for name, b in zip(names_x + names_y, bases_x + bases_y) if b.problem}
    result = torch.full((len(bases_x), len(bases_y)), float("nan"), dtype=torch.float64, device=device)

    all_x = torch.cat([b.basis for b in bases_x], 1)
    all_y = all_x if symmetric else torch.cat([b.basis for b in bases_y], 1)
    blocks = all_x.T @ all_y
    starts_x = _starts([b.basis.shape[1] for b in bases_x])
    starts_y = starts_x if symmetric else _starts([b.basis.shape[1] for b in bases_y])
    for i, bx in enumerate(bases_x):
        for j in range(i if symmetric else 0, len(bases_y)):
            by = bases_y[j]
            kx, ky = bx.basis.shape[1], by.basis.shape[1]
            if bx.problem or by.problem:
                continue
            if kx + ky >= n - 1:
                problems[f"{names_x[i]} vs {names_y[j]}"] = (
                    f"CCA is degenerate: the compared dimensions {kx} + {ky} >= n - 1 = {n - 1}, so the canonical "
                    "correlations reflect dimensions, not data (some are trivially 1); use more examples"
                    + (" or a smaller keep" if measure == "svcca" else "")
                )
                continue
            block = blocks[starts_x[i] : starts_x[i] + kx, starts_y[j] : starts_y[j] + ky]
            if measure == "svcca":
                value = torch.linalg.svdvals(block).clamp(0.0, 1.0).mean()
                result[i, j] = value
                if symmetric:
                    result[j, i] = value
                continue
            a, rho, vh = torch.linalg.svd(block, full_matrices=False)
            rho = rho.clamp(0.0, 1.0)
            # The smaller-rank side carries the weights; the first argument wins ties.
            x_side = _pwcca_from_side(bx.basis, a, bx.centred, rho)
            y_side = _pwcca_from_side(by.basis, vh.T, by.centred, rho)
            result[i, j] = x_side if kx <= ky else y_side
            if symmetric:
                result[j, i] = y_side if ky <= kx else x_side
    return result, problems


def _starts(widths: list[int]) -> list[int]:
    starts, total = [], 0
    for w in widths:
        starts.append(total)
        total += w
    return starts


def _pair(x: TensorLike, y: TensorLike, measure: str, **options: Any) -> torch.Tensor:
    x, y = as_matrix(x, "x"), as_matrix(y, "y")
    if x.device != y.device:
        raise RepSimValueError(f"x and y must be on one device; got {x.device} and {y.device}.")
    refuse_grad(measure, x, y)
    n = check_examples({"x": x.shape, "y": y.shape}, 2, measure)
    result, problems = cca_matrix(["x"], [x], (["y"], [y]), n, measure, **options)
    if n < MIN_MEANINGFUL_EXAMPLES:
        warnings.warn(few_examples_message(measure, n), RepSimWarning, stacklevel=3)
    warn_degenerate(problems, measure)
    return result[0, 0]


def svcca(x: TensorLike, y: TensorLike, keep: float | int = 0.99) -> torch.Tensor:
    r"""SVCCA of Raghu et al. (2017): CCA between the top singular directions of each side.

    Both sides are column-centred; each keeps its top-k singular directions (float ``keep``: the
    smallest k whose squared singular values reach that fraction of the total; int ``keep``:
    exactly that many, capped at the rank). The result is the plain mean of all min(kx, ky)
    canonical correlations between the reduced subspaces (not google/svcca's trimmed mean).

    Args:
        x: (n, p) features, rows are examples.
        y: (n, q) features of the same examples.
        keep: fraction of variance (float in (0, 1]) or number of directions (int >= 1).

    Returns:
        0-d float64 tensor in [0, 1]; NaN with a :class:`RepSimWarning` when a side is constant or
        the CCA is degenerate (kx + ky >= n - 1).

    Example:
        >>> import torch
        >>> x = torch.randn(200, 10, dtype=torch.float64)
        >>> q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
        >>> round(float(svcca(x, 3 * x @ q, keep=10)), 6)
        1.0
    """
    return _pair(x, y, "svcca", keep=keep)


def pwcca(x: TensorLike, y: TensorLike) -> torch.Tensor:
    r"""Projection-weighted CCA of Morcos, Raghu & Bengio (2018).

    .. math:: \mathrm{PWCCA} = \sum_i \alpha_i \rho_i, \quad
              \alpha_i \propto \sum_j \lvert\langle h_i, x_j\rangle\rvert, \quad \sum_i \alpha_i = 1

    Both sides are column-centred; :math:`\rho_i` are all min(rank x, rank y) canonical
    correlations and :math:`h_i` the unit-norm canonical variates of the side with the smaller rank
    (x on ties), weighted by how much of that side's centred neurons :math:`x_j` they account for.
    The measure is therefore not symmetric.

    google/svcca's ``compute_pwcca`` instead QR-orthonormalises un-whitened directions
    (``coef_x · acts``), weights against un-centred activations, and fails when the first layer is
    wider than the second. Here the canonical variates come from orthonormal bases, are orthonormal
    by construction, and either argument may be the wider one.

    Example:
        >>> import torch
        >>> x = torch.randn(200, 6, dtype=torch.float64)
        >>> round(float(pwcca(x, x @ torch.randn(6, 6, dtype=torch.float64))), 6)
        1.0
    """
    return _pair(x, y, "pwcca")
