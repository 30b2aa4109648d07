"""The closed-form jackknife behind :mod:`lightning_repsim.functional.intervals`.

Rows are examples. Each layer's Gram is U-centred (zero diagonal, zero row sums; for uncentred RV and
RV2 the raw Gram with its diagonal removed), which makes ``<U(K), U(L)> / (n (n - 3))`` the unbiased
HSIC estimator; leaving example i out then changes every inner product by one row-wise term, so all
leave-one-out similarities of all pairs of layers follow from one batched product of the Grams' rows.
The method, its assumptions and its simulated coverage are described in ``intervals``' docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import torch

from lightning_repsim.functional._engine import Representations
from lightning_repsim.functional._prepared import GramScratch, PreparedLayers, host_route
from lightning_repsim.functional.gram import numpy_median
from lightning_repsim.measures import GramSpec

#: Leave-one-out similarities are kept this far inside (-1, 1) before atanh.
_Z_EDGE = 1e-15

#: Within this distance of |s| = 1 the second-order correction is left out (it would be a ratio of
#: two rounding errors; the plain jackknife variance is used, which is conservative).
_CORRECTION_EDGE = 1e-6

#: Half-width, in probability, of the quantiles that give the density of the distances at their median.
_DENSITY_WINDOW = 0.05

#: Entries of the (rows x layers x n) blocks processed at once.
BLOCK_ENTRIES = 1 << 22


# --------------------------------------------------------------------------------------------------
# Per-layer U-centred (or zero-diagonal) Grams and what the point estimate needs besides them
# --------------------------------------------------------------------------------------------------


@dataclass
class Side:
    """One side's layers: ``bases`` (L, n, n) float64, each the layer's U-centred Gram (zero diagonal,
    zero row sums) or, for uncentred RV and RV2, its zero-diagonal Gram; and, per layer (columns of the
    (n, L) matrices), what the measure's own transformed Gram adds to it: off the diagonal
    ``add[i] + add[j] + const``, on it ``diag[i]``.

    RBF kernels also carry what the bandwidth's own variation needs (see :func:`_bandwidth_shift`):
    ``shift`` (n, L), the relative change of each layer's bandwidth when example i is left out;
    ``derivatives`` (L, n, n), the U-centred derivative of each kernel in the log bandwidth (kept only
    when asked); ``derivative_self`` (L,) ``<U(K'), U(K)>``; ``derivative_cross`` (L_other, L)
    ``<B_other, U(K')>`` against the bases passed as ``against``.
    """

    names: list[str]
    bases: torch.Tensor
    add: torch.Tensor
    const: torch.Tensor
    diag: torch.Tensor
    prepared: PreparedLayers
    shift: torch.Tensor | None = None
    derivatives: torch.Tensor | None = None
    derivative_self: torch.Tensor | None = None
    derivative_cross: torch.Tensor | None = None


def u_statistic_base(spec: GramSpec) -> str:
    """``"ucentre"`` for the centred measures (an order-4 U-statistic of covariances), ``"zero_diag"``
    for uncentred RV and RV2 (an order-2 U-statistic of second moments)."""
    return "zero_diag" if spec.kernel == "linear" and not spec.center_features else "ucentre"


def _u_centre_(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U-centre a symmetric n x n matrix in place (Székely & Rizzo 2014); returns the row sums and total
    of its zero-diagonal version, which the centring subtracted."""
    n = gram.shape[0]
    gram.diagonal().zero_()
    rho = gram.sum(1)
    total = rho.sum()
    gram.sub_(rho[:, None] / (n - 2)).sub_(rho[None, :] / (n - 2)).add_(total / ((n - 1) * (n - 2)))
    gram.diagonal().zero_()
    return rho, total


def _bandwidth_shift(distances: torch.Tensor, median: float) -> torch.Tensor:
    """(n,) first-order relative change of the median of the n² squared distances when example i is
    left out (its row and column: 2n - 1 entries).

    A quantile moves by (removed entries below it - half of those removed) / (entries left x density
    at it) (the Bahadur representation of a U-quantile); the density of the distances at the median is
    read off the quantiles at 1/2 ± 5 %. This is what the RBF bandwidth sigma² x median contributes to
    each leave-one-out similarity (5-8 % of the standard error in our simulations).
    """
    n = distances.shape[0]
    total, removed = n * n, 2 * n - 1
    flat = distances.reshape(-1)
    width = max(1, round(_DENSITY_WINDOW * total))
    middle = total // 2
    spread = float(flat.kthvalue(min(total, middle + width)).values - flat.kthvalue(max(1, middle - width)).values)
    if not spread > 0:
        return torch.zeros(n, dtype=torch.float64, device=distances.device)
    density = 2.0 * width / total / spread
    below = 2.0 * (distances <= median).sum(1).to(torch.float64) - 1.0  # row and column i, the 0 on the diagonal once
    return (below - removed / 2.0) / ((total - removed) * density) / median


def make_side(
    reps: Representations,
    spec: GramSpec,
    device: torch.device,
    problems: dict[str, str],
    keep_derivatives: bool = False,
    against: torch.Tensor | None = None,
) -> Side:
    prepared = reps.prepared(spec, device)
    n, count = prepared.n, len(prepared.names)
    base = u_statistic_base(spec)
    opts: dict[str, Any] = {"dtype": torch.float64, "device": device}
    bases = torch.empty(count, n, n, **opts)
    add, diag = torch.zeros(n, count, **opts), torch.zeros(n, count, **opts)
    const = torch.zeros(count, **opts)
    rbf = spec.kernel == "rbf"
    side = Side(list(prepared.names), bases, add, const, diag, prepared)
    shift = derivative_self = torch.zeros(0)  # RBF only
    derivatives = derivative_cross = None
    if rbf:
        shift = side.shift = torch.zeros(n, count, **opts)
        derivative_self = side.derivative_self = torch.zeros(count, **opts)
        derivatives = side.derivatives = torch.zeros(count, n, n, **opts) if keep_derivatives else None
        derivative_cross = side.derivative_cross = (
            None if against is None else torch.zeros(against.shape[0], count, **opts)
        )
    host = host_route(prepared.device)
    scratch = GramScratch.for_layers(prepared) if host and not rbf else None
    for i, name in enumerate(prepared.names):
        gram = bases[i]
        if host:
            prepared.gram(i, spec.kernel, out=gram, scratch=scratch)
        else:
            gram.copy_(prepared.gram(i, spec.kernel)[0])
        derivative = None
        if rbf:
            median = float(numpy_median(gram))
            if not median > 0:
                problems.setdefault(name, "its examples are (nearly all) identical: the RBF median distance is 0")
                gram.zero_()
            else:
                shift[:, i] = _bandwidth_shift(gram, median)
                rate = 1.0 / (2.0 * spec.sigma**2 * median)
                derivative = derivatives[i] if derivatives is not None else torch.empty_like(gram)
                torch.mul(gram, rate, out=derivative)  # d K / d log(bandwidth) = K o D / (2 sigma² median)
                gram.mul_(-rate).exp_()
                derivative.mul_(gram)
        own_diag = gram.diagonal().clone()
        rows = gram.sum(1)
        total = rows.sum()
        if base == "zero_diag":
            gram.diagonal().zero_()
            # K = K~ + diag: RV adds the diagonal back, RV2 is K~ itself.
            if spec.transform == "none":
                diag[:, i] = own_diag
            continue
        rho, rho_total = _u_centre_(gram)
        if derivative is not None:
            _u_centre_(derivative)
            derivative_self[i] = (derivative * gram).sum()
            if against is not None and derivative_cross is not None:
                derivative_cross[:, i] = against.reshape(against.shape[0], -1) @ derivative.reshape(-1)
        # Off the diagonal K = U(K) + rho_i/(n-2) + rho_j/(n-2) - sum(rho)/((n-1)(n-2)).
        if spec.transform == "unbiased":
            continue
        add[:, i] = rho / (n - 2)
        const[i] = -rho_total / ((n - 1) * (n - 2))
        if spec.transform == "center":  # H K H (RBF): K minus its row and column means plus the grand mean
            add[:, i] -= rows / n
            const[i] += total / n**2
            diag[:, i] = own_diag - 2.0 * rows / n + total / n**2
        elif spec.transform == "none":  # centred linear Gram K itself (linear CKA, RV)
            diag[:, i] = own_diag
        # "zero_diag" (centred RV2): the diagonal stays 0.
    return side


def bandwidth_terms(
    side_x: Side, side_y: Side, symmetric: bool, sums: PairSums
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d s / d log h_x (Lx, Ly), shift_x (n, Lx), d s / d log h_y, shift_y (n, Ly)): the first-order
    effect of each side's RBF bandwidth on every pair's similarity, and how far each left-out example
    moves it. Frees ``side_x.derivatives``."""
    assert side_x.derivatives is not None and side_x.derivative_self is not None and side_x.shift is not None
    assert side_y.derivative_self is not None and side_y.shift is not None
    derivatives = side_x.derivatives.reshape(side_x.derivatives.shape[0], -1)
    other = side_x.bases if symmetric else side_y.bases
    cross_x = derivatives @ other.reshape(other.shape[0], -1).T  # <U(K'_a), B_b>
    side_x.derivatives = None
    cross_y = cross_x.T if symmetric else side_y.derivative_cross
    assert cross_y is not None
    root = torch.sqrt(torch.outer(sums.self_x, sums.self_y))
    similarity = sums.cross / root
    grad_x = cross_x / root - similarity * (side_x.derivative_self / sums.self_x)[:, None]
    grad_y = cross_y / root - similarity * (side_y.derivative_self / sums.self_y)[None, :]
    return grad_x, side_x.shift, grad_y, side_y.shift


def additive_products(x: Side, y: Side, n: int) -> torch.Tensor:
    """``sum_{i != j} (u_i + u_j + c)(w_i + w_j + e)`` for every pair (u, c of x's layers, w, e of y's)."""
    u, w, c, e = x.add, y.add, x.const, y.const
    su, sw = u.sum(0), w.sum(0)
    return (
        (2 * n - 4) * (u.T @ w)
        + 2.0 * torch.outer(su, sw)
        + (2 * n - 2) * torch.outer(su, e)
        + (2 * n - 2) * torch.outer(c, sw)
        + float(n * n - n) * torch.outer(c, e)
    )


# --------------------------------------------------------------------------------------------------
# Inner products of all pairs, their row-wise parts, and the moments of the second-order correction
# --------------------------------------------------------------------------------------------------


@dataclass
class PairSums:
    """For bases B_a (x) and C_b (y): ``cross`` <B_a, C_b>, ``rows`` (n, Lx, Ly) sum_j B_a[i,j] C_b[i,j];
    ``self_x``/``rows_x``, ``self_y``/``rows_y`` the same of each side with itself; ``m22`` <B_a², C_b²>,
    ``m31`` <B_a³, C_b>, ``m13`` <B_a, C_b³>; ``fourth_x``, ``fourth_y`` sum B_a⁴ and sum C_b⁴."""

    cross: torch.Tensor
    rows: torch.Tensor
    self_x: torch.Tensor
    rows_x: torch.Tensor
    self_y: torch.Tensor
    rows_y: torch.Tensor
    m22: torch.Tensor
    m31: torch.Tensor
    m13: torch.Tensor
    fourth_x: torch.Tensor
    fourth_y: torch.Tensor


def pair_sums(bx: torch.Tensor, by: torch.Tensor | None) -> PairSums:
    """All of :class:`PairSums` in one pass over blocks of rows (``by=None``: y is x).

    Every quantity is a sum over the entries of the Grams, so the rows are taken a block at a time:
    four GEMMs (Lx x block·n x Ly) and one batched product per block, nothing n x n is formed twice.
    """
    symmetric = by is None
    by = bx if by is None else by
    count_x, n, _ = bx.shape
    count_y = by.shape[0]
    opts: dict[str, Any] = {"dtype": torch.float64, "device": bx.device}
    cross = torch.zeros(count_x, count_y, **opts)
    m22, m31 = torch.zeros_like(cross), torch.zeros_like(cross)
    m13 = torch.zeros_like(cross)  # the transpose of m31 when symmetric
    rows = torch.empty(n, count_x, count_y, **opts)
    rows_x = torch.empty(n, count_x, **opts)
    rows_y = rows_x if symmetric else torch.empty(n, count_y, **opts)
    fourth_x = torch.zeros(count_x, **opts)
    fourth_y = fourth_x if symmetric else torch.zeros(count_y, **opts)
    block = max(1, min(n, BLOCK_ENTRIES // (n * (count_x + count_y))))
    for start in range(0, n, block):
        stop = min(n, start + block)
        xb = bx[:, start:stop, :]  # (Lx, b, n): each layer's rows, contiguous within the layer
        x2 = xb.reshape(count_x, -1)
        x_sq = x2 * x2
        if symmetric:
            yb, y2, y_sq = xb, x2, x_sq
        else:
            yb = by[:, start:stop, :]
            y2 = yb.reshape(count_y, -1)
            y_sq = y2 * y2
        cross += x2 @ y2.T
        m22 += x_sq @ y_sq.T
        m31 += (x_sq * x2) @ y2.T
        if not symmetric:
            m13 += x2 @ (y_sq * y2).T
        rows[start:stop] = torch.bmm(xb.transpose(0, 1), yb.permute(1, 2, 0))
        rows_x[start:stop] = x_sq.reshape(count_x, stop - start, n).sum(2).T
        fourth_x += (x_sq * x_sq).sum(1)
        if not symmetric:
            rows_y[start:stop] = y_sq.reshape(count_y, stop - start, n).sum(2).T
            fourth_y += (y_sq * y_sq).sum(1)
    if symmetric:
        cross = (cross + cross.T) / 2  # exactly symmetric, as similarity_matrix's
        m13 = m31.T
    return PairSums(cross, rows, rows_x.sum(0), rows_x, rows_y.sum(0), rows_y, m22, m31, m13, fourth_x, fourth_y)


# --------------------------------------------------------------------------------------------------
# The jackknife
# --------------------------------------------------------------------------------------------------


def _leave_one_out(
    sums: PairSums, n: int, base: str, bandwidth: tuple[torch.Tensor, ...] | None = None
) -> torch.Tensor:
    """(n, Lx, Ly) similarities with example i left out: ``<B_-i, C_-i> = <B, C> - 2 kappa rows_i``;
    for RBF kernels (``bandwidth``, see :func:`bandwidth_terms`) plus the first-order effect of the
    bandwidths the n - 1 examples would have chosen."""
    kappa = (n - 2) / (n - 3) if base == "ucentre" else 1.0
    cross = sums.cross - 2.0 * kappa * sums.rows
    self_x = sums.self_x - 2.0 * kappa * sums.rows_x
    self_y = sums.self_y - 2.0 * kappa * sums.rows_y
    left_out = cross / torch.sqrt(self_x[:, :, None] * self_y[:, None, :])
    if bandwidth is not None:
        grad_x, shift_x, grad_y, shift_y = bandwidth
        left_out += grad_x[None] * shift_x[:, :, None] + grad_y[None] * shift_y[:, None, :]
    return left_out


def _second_order_variance(sums: PairSums, similarity: torch.Tensor, n: int) -> torch.Tensor:
    """The part of the jackknife variance of ``similarity`` that is its second-order Hoeffding component
    counted a second time, ``2 sigma_2² / (n (n - 1))`` on the similarity's own scale.

    Linearised, the similarity is a U-statistic of order 2 with kernel
    ``G = s n (n - 1) (B∘C / <B,C> - B∘B / (2 <B,B>) - C∘C / (2 <C,C>))``; sigma_2² is the variance
    of its doubly centred part, estimated without bias by ``<U(G), U(G)> / (n (n - 3))``, which needs
    only the moments in ``sums`` (Song et al.'s eq. 5 for ``<U(G), U(G)>``).
    """
    scale = float(n * (n - 1))
    root = torch.sqrt(torch.outer(sums.self_x, sums.self_y))
    a = scale / root  # s n(n-1) / <B,C>, written without dividing by <B,C> (which may be ~0)
    b = -similarity * scale / (2.0 * sums.self_x[:, None])
    c = -similarity * scale / (2.0 * sums.self_y[None, :])
    squares = (
        a * a * sums.m22
        + b * b * sums.fourth_x[:, None]
        + c * c * sums.fourth_y[None, :]
        + 2.0 * a * b * sums.m31
        + 2.0 * a * c * sums.m13
        + 2.0 * b * c * sums.m22
    )
    row_sums = a * sums.rows + b * sums.rows_x[:, :, None] + c * sums.rows_y[:, None, :]
    total = a * sums.cross + b * sums.self_x[:, None] + c * sums.self_y[None, :]  # 0 up to rounding
    centred = squares + total * total / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * row_sums.square().sum(0)
    return 2.0 * centred / (n * (n - 3)) / scale


def jackknife(
    sums: PairSums, n: int, base: str, level: float, bandwidth: tuple[torch.Tensor, ...] | None = None
) -> tuple[torch.Tensor, ...]:
    """(estimate, low, high, similarity of the U-statistics) for every pair."""
    similarity = sums.cross / torch.sqrt(torch.outer(sums.self_x, sums.self_y))
    left_out = _leave_one_out(sums, n, base, bandwidth)
    edge = 1.0 - _Z_EDGE
    z = torch.atanh(similarity.clamp(-edge, edge))
    z_left = torch.atanh(left_out.clamp(-edge, edge))
    z_mean = z_left.mean(0)
    variance = (n - 1) / n * (z_left - z_mean).square().sum(0)
    excess = _second_order_variance(sums, similarity, n) / (1.0 - similarity.square()).square()
    excess = torch.where((1.0 - similarity.abs()) > _CORRECTION_EDGE, excess, torch.zeros_like(excess))
    variance = variance - torch.minimum(excess.nan_to_num(0.0).clamp_min(0.0), 0.75 * variance)
    centre = n * z - (n - 1) * z_mean
    half = NormalDist().inv_cdf(0.5 + level / 2.0) * variance.clamp_min(0.0).sqrt()
    estimate, low, high = torch.tanh(centre), torch.tanh(centre - half), torch.tanh(centre + half)
    bad = ~torch.isfinite(left_out).all(0)
    for tensor in (estimate, low, high):
        tensor[bad] = float("nan")
    return estimate.clamp(0.0, 1.0), low.clamp(0.0, 1.0), high.clamp(0.0, 1.0), similarity
