r"""Confidence intervals and permutation tests for representational similarity.

Rows are examples. The probe's n examples are treated as an i.i.d. sample from a distribution (the
images, utterances or tokens the probe stands for); a similarity computed on them estimates the
*population* similarity of the two representations over that distribution. This module says how
precisely (:func:`similarity_interval`, :func:`interval_matrix`) and whether it exceeds chance
(:func:`~lightning_repsim.functional.permutation.permutation_test`).

**What the interval estimates.** For every Gram-based measure the population value is a normalised
Hilbert-Schmidt independence criterion,

.. math:: \rho = \frac{\mathrm{HSIC}(k, l)}{\sqrt{\mathrm{HSIC}(k, k)\,\mathrm{HSIC}(l, l)}},
          \qquad \text{linear kernels: } \rho = \frac{\lVert\Sigma_{xy}\rVert_F^2}
          {\lVert\Sigma_{x}\rVert_F\,\lVert\Sigma_{y}\rVert_F}

(:math:`\Sigma` the population covariances; uncentred RV and RV2 use second moments instead).
Linear CKA, debiased CKA and centred RV and RV2 are four estimators of the *same* linear-kernel
value, and biased and debiased RBF CKA two estimators of the same RBF value (with the population
median bandwidth). It lies in [0, 1], and so do ``low`` and ``high``.

**Method: a jackknife of unbiased HSIC estimates, in closed form.** Resampling examples with
replacement (the bootstrap) duplicates rows, which a kernel statistic reads as identical examples: a
percentile bootstrap of linear CKA covered the population value in 0-85 % of simulated draws (0 % near
0 and for wide layers). The jackknife leaves each example out once instead and never duplicates one.
Each layer's Gram matrix is U-centred (Székely & Rizzo 2014), which makes
``<U(K), U(L)> / (n (n - 3))`` the unbiased HSIC estimator of Song et al. (2012); for uncentred RV
and RV2 the raw features' Gram with its diagonal removed takes its place (the order-2 U-statistic
of the second moments). Left-out example i then changes each inner product by a row-wise term only:

.. math:: \langle U(K)_{-i}, U(L)_{-i}\rangle = \langle U(K), U(L)\rangle
          - \frac{2(n-2)}{n-3}\sum_j U(K)_{ij} U(L)_{ij}

(a U-centred matrix has zero row sums, so centring the n - 1 remaining examples again changes nothing
else; zero-diagonal Grams use the factor 2). All pairs of layers follow from one batched product of
the Grams' rows: no loop over resamples or pairs. The leave-one-out similarities are mapped to
Fisher's z = atanh(s), which makes the sampling distribution near 0 and near 1 closer to normal;
the interval is ``tanh(z_J ± q se)`` with ``z_J`` the bias-corrected jackknife estimate and ``q`` the
normal quantile of ``level``. The jackknife variance of a U-statistic counts its second-order
(degenerate) Hoeffding component twice (Efron & Stein 1981); that component, large near
independence and when features are many relative to examples, is estimated from the U-centred Grams
and the excess subtracted (never more than 3/4 of the jackknife variance). The biased estimators
(linear CKA, RV, biased RBF CKA) are not jackknifed themselves: their bias, of order
(effective dimension) / n, exceeds their standard error for wide layers, and an interval around them
misses the population value in most draws (simulated coverage 0-40 % at p = 50, n = 64).

**Assumptions and weak spots.** The examples are i.i.d. (a probe of consecutive frames or of
augmentations of one image is not); the layers are fixed functions of the example. Simulated
coverage of a 95 % interval, Gaussian data, p = 20 to 200, n = 64 to 1024, population similarity
0.05 to 0.99: 0.91 to 0.97 (``tests/functional/test_inference.py``, ``benchmarks/results/inference.md``).
It degrades at n below ~64, where the normal approximation is poor (0.91 at n = 64 when a few
directions dominate the layers), and under heavy-tailed features, whose HSIC variance needs finite
eighth moments. At an *exactly* zero population similarity (independent layers) the estimator is a
degenerate U-statistic with a skewed, non-normal distribution: the interval is then conservative at
the lower end (it holds 0 in 97-100 % of draws, partly because an interval falling entirely below 0
is reported as [0, 0]: no detectable similarity) but is not the right tool: test independence with
:func:`permutation_test`. The RBF bandwidth (sigma² x the median squared distance) is
estimated from the same examples; its leave-one-out change enters each leave-one-out similarity to
first order (the Bahadur representation of the median; without it the standard error is 5-8 % short).
The interval says nothing about variation over training seeds or probe selection beyond i.i.d.
sampling.

Memory: each side's n x n Grams in float64 (as :func:`similarity_matrix`'s Gram route), plus, for RBF,
one more n x n matrix per layer of ``xs`` (the kernels' derivatives in the bandwidth).

SVCCA and PWCCA have no interval: they keep a data-dependent number of SVD directions and their
canonical correlations are biased upward by roughly (kept directions) / n, so neither the
jackknife nor the bootstrap of them has a known coverage. :func:`permutation_test` supports them.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import torch

from lightning_repsim.errors import RepSimValueError
from lightning_repsim.functional._engine import (
    GramScratch,
    PreparedLayers,
    Representations,
    cosine,
    degenerate_layers,
    host_route,
)
from lightning_repsim.functional._measures import CCA_MEASURES, GRAM_MEASURES, GramSpec, gram_spec, resolve_options
from lightning_repsim.functional._validation import Layers, TensorLike, check_examples, warn_degenerate
from lightning_repsim.functional.gram import numpy_median

__all__ = [
    "IntervalMatrix",
    "SimilarityInterval",
    "interval_matrix",
    "similarity_interval",
]

#: Fewest examples for an interval: below this the jackknife's normal approximation is meaningless.
MIN_INTERVAL_EXAMPLES = 10

#: The measures :func:`interval_matrix` supports.
INTERVAL_MEASURES = GRAM_MEASURES

METHOD = "jackknife"

#: Leave-one-out similarities are kept this far inside (-1, 1) before atanh.
_Z_EDGE = 1e-15

#: Within this distance of |s| = 1 the second-order correction is left out (it would be a ratio of
#: two rounding errors; the plain jackknife variance is used, which is conservative).
_CORRECTION_EDGE = 1e-6

#: A leave-one-out self-similarity below this fraction of the full sample's is zero (rounding).
_LEFT_OUT_ZERO = 1e-12

#: ... and below this fraction of the layer's energy ((||X||_F²)², n² for RBF kernels): a healthy
#: layer's U-centred self-similarity is at least ~1e-16 / p² of it even with means 1e4 times the spread.
_ENERGY_ZERO = 1e-28

#: Half-width, in probability, of the quantiles that give the density of the distances at their median.
_DENSITY_WINDOW = 0.05

#: Entries of the (rows x layers x n) blocks processed at once.
_BLOCK_ENTRIES = 1 << 22


@dataclass(frozen=True)
class SimilarityInterval:
    """A confidence interval for the population similarity of two representations.

    Attributes:
        value: the measure's ordinary point estimate (what :func:`similarity_matrix` returns).
        low: lower end of the interval, in [0, 1].
        high: upper end of the interval, in [0, 1].
        level: the nominal coverage, e.g. 0.95.
        measure: the measure (``debiased_cka`` for ``linear_cka`` with ``debiased=True``).
        n: the number of examples.
        method: how the interval was computed (``"jackknife"``: see the module docstring).
        estimate: the centre of the interval, a bias-corrected estimate of the population similarity.
            ``value`` may lie outside ``[low, high]`` when the measure's own estimator is biased (linear
            CKA and RV with many features per example): the interval, not ``value``, targets the
            population similarity.
    """

    value: float
    low: float
    high: float
    level: float
    measure: str
    n: int
    method: str
    estimate: float


@dataclass(frozen=True)
class IntervalMatrix:
    """Confidence intervals for every pair of layers: ``value``, ``low``, ``high`` and ``estimate`` are
    (len(xs), len(ys)) float64 tensors on the inputs' device; see :class:`SimilarityInterval` for their
    meaning. ``names_x`` and ``names_y`` label the rows and columns."""

    value: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    estimate: torch.Tensor
    level: float
    measure: str
    n: int
    method: str
    names_x: tuple[str, ...]
    names_y: tuple[str, ...]


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


def _check_level(level: object) -> float:
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0.0 < float(level) < 1.0:
        raise RepSimValueError(
            f"level is the interval's coverage and must be a number strictly between 0 and 1, "
            f"e.g. level=0.95; got {level!r}."
        )
    return float(level)


def _check_seed(seed: object) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise RepSimValueError(f"seed must be an int >= 0 (or None for fresh randomness); got {seed!r}.")
    return int(seed)


def _interval_spec(measure: str, options: dict[str, object]) -> GramSpec:
    if measure in CCA_MEASURES:
        raise RepSimValueError(
            f"{measure} has no confidence interval: it keeps a data-dependent number of SVD directions and its "
            f"canonical correlations are biased upward by about (kept directions) / n, so no resampling method has a "
            f"known coverage for it. Intervals are available for {', '.join(INTERVAL_MEASURES)}; for {measure}, "
            f"permutation_test(x, y, measure={measure!r}) tells whether it exceeds chance."
        )
    return gram_spec(measure, **options)


# --------------------------------------------------------------------------------------------------
# Per-layer U-centred (or zero-diagonal) Grams and what the point estimate needs besides them
# --------------------------------------------------------------------------------------------------


@dataclass
class _Side:
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


def _u_statistic_base(spec: GramSpec) -> str:
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


def _side(
    reps: Representations,
    spec: GramSpec,
    device: torch.device,
    problems: dict[str, str],
    keep_derivatives: bool = False,
    against: torch.Tensor | None = None,
) -> _Side:
    prepared = reps.prepared(spec, device)
    n, count = prepared.n, len(prepared.names)
    base = _u_statistic_base(spec)
    opts: dict[str, Any] = {"dtype": torch.float64, "device": device}
    bases = torch.empty(count, n, n, **opts)
    add, diag = torch.zeros(n, count, **opts), torch.zeros(n, count, **opts)
    const = torch.zeros(count, **opts)
    rbf = spec.kernel == "rbf"
    side = _Side(list(prepared.names), bases, add, const, diag, prepared)
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


def _bandwidth_terms(
    side_x: _Side, side_y: _Side, symmetric: bool, sums: _PairSums
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


def _additive_products(x: _Side, y: _Side, n: int) -> torch.Tensor:
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
class _PairSums:
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


def _pair_sums(bx: torch.Tensor, by: torch.Tensor | None) -> _PairSums:
    """All of :class:`_PairSums` in one pass over blocks of rows (``by=None``: y is x).

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
    block = max(1, min(n, _BLOCK_ENTRIES // (n * (count_x + count_y))))
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
    return _PairSums(cross, rows, rows_x.sum(0), rows_x, rows_y.sum(0), rows_y, m22, m31, m13, fourth_x, fourth_y)


# --------------------------------------------------------------------------------------------------
# The jackknife
# --------------------------------------------------------------------------------------------------


def _leave_one_out(
    sums: _PairSums, n: int, base: str, bandwidth: tuple[torch.Tensor, ...] | None = None
) -> torch.Tensor:
    """(n, Lx, Ly) similarities with example i left out: ``<B_-i, C_-i> = <B, C> - 2 kappa rows_i``;
    for RBF kernels (``bandwidth``, see :func:`_bandwidth_terms`) plus the first-order effect of the
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


def _second_order_variance(sums: _PairSums, similarity: torch.Tensor, n: int) -> torch.Tensor:
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


def _jackknife(
    sums: _PairSums, n: int, base: str, level: float, bandwidth: tuple[torch.Tensor, ...] | None = None
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


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _as_representations(layers: Layers | Representations, name: str) -> Representations:
    return layers if isinstance(layers, Representations) else Representations(layers, max_cache_bytes=0, name=name)


def _interval_matrix(
    xs: Layers | Representations,
    ys: Layers | Representations | None,
    measure: str,
    level: float,
    options: dict[str, object],
) -> tuple[IntervalMatrix, dict[str, str], str]:
    level = _check_level(level)
    options = resolve_options(measure, options)
    spec = _interval_spec(measure, options)
    reps_x = _as_representations(xs, "xs")
    symmetric = ys is None or ys is xs
    reps_y = reps_x if ys is None or symmetric else _as_representations(ys, "ys")
    mats = reps_x.matrices + ([] if symmetric else reps_y.matrices)
    devices = {m.device for m in mats}
    if len(devices) > 1:
        raise RepSimValueError(
            f"all representations must be on one device; got {sorted(map(str, devices))}. "
            "Move them with .to(device) first."
        )
    device = devices.pop()
    names = reps_x.names + ([] if symmetric else reps_y.names)
    n = check_examples(
        dict(zip(names, (m.shape for m in mats))), MIN_INTERVAL_EXAMPLES, f"a {spec.measure} confidence interval"
    )

    problems: dict[str, str] = {}
    rbf = spec.kernel == "rbf"
    side_x = _side(reps_x, spec, device, problems, keep_derivatives=rbf)
    side_y = side_x if symmetric else _side(reps_y, spec, device, problems, against=side_x.bases if rbf else None)
    sums = _pair_sums(side_x.bases, None if symmetric else side_y.bases)
    base = _u_statistic_base(spec)
    bandwidth = _bandwidth_terms(side_x, side_y, symmetric, sums) if rbf else None
    estimate, low, high, _ = _jackknife(sums, n, base, level, bandwidth)

    # The measure's own point estimate from the same Grams: its transformed Gram is the base plus
    # additive terms off the diagonal and its own diagonal (see _side).
    def own_inner(a: _Side, b: _Side, base_products: torch.Tensor) -> torch.Tensor:
        return base_products + _additive_products(a, b, n) + a.diag.T @ b.diag

    cross = own_inner(side_x, side_y, sums.cross)
    if symmetric:
        self_x = self_y = cross.diagonal().clone()
    else:
        self_x = own_inner(side_x, side_x, torch.diag(sums.self_x)).diagonal()
        self_y = own_inner(side_y, side_y, torch.diag(sums.self_y)).diagonal()
    scale = spec.hsic_scale(n)
    for prepared in (side_x.prepared, side_y.prepared):
        for name, why in prepared.problems.items():
            problems.setdefault(name, why)

    kappa = (n - 2) / (n - 3) if base == "ucentre" else 1.0

    def dead(
        side: _Side, own_self: torch.Tensor, base_self: torch.Tensor, base_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        energy = torch.full_like(side.prepared.energy, float(n * n)) if spec.kernel == "rbf" else side.prepared.energy
        value_dead = degenerate_layers(side.names, own_self * scale, energy * scale, spec, problems)
        u_spec = GramSpec(
            spec.measure,
            spec.kernel,
            spec.center_features,
            "unbiased" if base == "ucentre" else "zero_diag",
            spec.sigma,
        )
        u_scale = u_spec.hsic_scale(n)
        interval_dead = degenerate_layers(side.names, base_self * u_scale, energy * u_scale, u_spec, problems)
        # The jackknife needs every leave-one-out self-similarity positive too, beyond rounding: each is a
        # difference of two sums of the full sample's size, and a layer whose variance sits in one or two
        # examples has an unbiased self-similarity of zero up to rounding.
        left_out = base_self[None, :] - 2.0 * kappa * base_rows
        zero = torch.maximum(_LEFT_OUT_ZERO * base_self.abs(), _ENERGY_ZERO * energy.to(base_self.device))
        lonely = ((left_out <= zero[None, :]).any(0) | (base_self <= zero)).cpu()
        for i, name in enumerate(side.names):
            if bool(lonely[i]) and not bool(interval_dead[i]):
                problems.setdefault(
                    name,
                    "its interval is NaN: its unbiased self-similarity, with or without one "
                    "example left out, is zero up to rounding (one or two examples carry all its "
                    "variance, or there are too few examples)",
                )
        return value_dead, value_dead | interval_dead | lonely

    dead_x, bad_x = dead(side_x, self_x, sums.self_x, sums.rows_x)
    dead_y, bad_y = (dead_x, bad_x) if symmetric else dead(side_y, self_y, sums.self_y, sums.rows_y)
    value = cosine(cross, self_x, self_y, dead_x, dead_y)
    for tensor in (estimate, low, high):
        tensor[bad_x.to(device)] = float("nan")
        tensor[:, bad_y.to(device)] = float("nan")
    result = IntervalMatrix(
        value, low, high, estimate, level, spec.measure, n, METHOD, tuple(side_x.names), tuple(side_y.names)
    )
    return result, problems, spec.measure


def interval_matrix(
    xs: Layers | Representations,
    ys: Layers | Representations | None = None,
    measure: str = "linear_cka",
    level: float = 0.95,
    seed: int | None = 0,
    *,
    warn: bool = True,
    **measure_options: object,
) -> IntervalMatrix:
    r"""Confidence intervals for the population similarity of every layer in ``xs`` with every layer in ``ys``.

    Rows are examples, the same n examples in the same order in every representation; ``ys=None``
    compares ``xs`` with itself. What is estimated, how, and where the method is weak: see
    :mod:`lightning_repsim.functional.inference`. In short: the population similarity over the
    distribution the probe's examples are drawn from (i.i.d.), by a closed-form jackknife of the
    unbiased HSIC estimates on Fisher's z scale, from each layer's n x n Gram matrix (U-centred; centred
    features for the linear measures), all pairs at once. ``value`` is the measure's own point
    estimate, exactly :func:`similarity_matrix`'s.

    Args:
        xs: a list of (n, p_i) tensors, a dict layer name -> tensor, or :class:`Representations`.
        ys: the same for the other side, or None.
        measure: ``linear_cka``, ``debiased_cka``, ``rbf_cka``, ``rv`` or ``rv2``.
        level: the coverage, strictly between 0 and 1.
        seed: unused by the jackknife, which is deterministic; accepted so that callers need not
            change if a randomised method is added.
        warn: issue the :class:`RepSimWarning` about degenerate layers.
        **measure_options: the measure's options (``debiased``, ``sigma``, ``center``).

    Returns:
        :class:`IntervalMatrix` with (len(xs), len(ys)) float64 tensors ``value``, ``low``, ``high``,
        ``estimate``. Degenerate layers (constant, NaN/Inf) give NaN rows/columns and one warning.

    Raises:
        RepSimValueError: a bad ``level``, fewer than 10 examples, an unknown measure or option,
            ``svcca`` or ``pwcca`` (no interval; see the message), or any input
            :func:`similarity_matrix` rejects.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(256, 20, dtype=torch.float64, generator=g)
        >>> layers = {"a": x, "b": x + torch.randn(256, 20, dtype=torch.float64, generator=g)}
        >>> r = interval_matrix(layers, measure="debiased_cka")
        >>> tuple(r.low.shape), bool(r.low[0, 1] < r.value[0, 1] < r.high[0, 1])
        ((2, 2), True)
    """
    _check_seed(seed)
    result, problems, label = _interval_matrix(xs, ys, measure, level, measure_options)
    if warn:
        warn_degenerate(problems, label)
    return result


def similarity_interval(
    x: TensorLike,
    y: TensorLike,
    measure: str = "linear_cka",
    level: float = 0.95,
    seed: int | None = 0,
    **measure_options: object,
) -> SimilarityInterval:
    r"""A confidence interval for the population similarity of two representations of the same examples.

    The one-pair case of :func:`interval_matrix` (see there, and the module docstring, for what is
    estimated, the method and its weak spots).

    Args:
        x: (n, p) features, rows are examples.
        y: (n, q) features of the same examples.
        measure: ``linear_cka``, ``debiased_cka``, ``rbf_cka``, ``rv`` or ``rv2``.
        level: the coverage, strictly between 0 and 1.
        seed: unused by the jackknife (deterministic).
        **measure_options: the measure's options.

    Returns:
        :class:`SimilarityInterval`; NaN ``value``, ``low`` and ``high`` with one :class:`RepSimWarning`
        for a constant side or NaN/Inf input.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(100, 50, dtype=torch.float64, generator=g)
        >>> y = x + torch.randn(100, 50, dtype=torch.float64, generator=g)  # population CKA = 0.5
        >>> r = similarity_interval(x, y, "linear_cka", level=0.95)
        >>> round(r.value, 2), round(r.low, 2), round(r.high, 2)  # biased CKA overshoots at p = n / 2
        (0.66, 0.46, 0.52)
    """
    _check_seed(seed)
    result, problems, label = _interval_matrix({"x": x}, {"y": y}, measure, level, measure_options)
    warn_degenerate(problems, label)
    return SimilarityInterval(
        float(result.value[0, 0]),
        float(result.low[0, 0]),
        float(result.high[0, 0]),
        result.level,
        result.measure,
        result.n,
        result.method,
        float(result.estimate[0, 0]),
    )
