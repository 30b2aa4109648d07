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
0.05 to 0.99: 0.91 to 0.97 (``tests/functional/test_intervals.py``, ``benchmarks/results/inference.md``).
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

import torch

from lightning_repsim.errors import RepSimValueError
from lightning_repsim.functional._engine import (
    Representations,
    cosine,
    degenerate_layers,
)
from lightning_repsim.functional._jackknife import (
    Side,
    additive_products,
    bandwidth_terms,
    jackknife,
    make_side,
    pair_sums,
    u_statistic_base,
)
from lightning_repsim.functional._validation import Layers, TensorLike, check_examples, warn_degenerate
from lightning_repsim.measures import CCA_MEASURES, GRAM_MEASURES, GramSpec, gram_spec, resolve_options

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

#: A leave-one-out self-similarity below this fraction of the full sample's is zero (rounding).
_LEFT_OUT_ZERO = 1e-12

#: ... and below this fraction of the layer's energy ((||X||_F²)², n² for RBF kernels): a healthy
#: layer's U-centred self-similarity is at least ~1e-16 / p² of it even with means 1e4 times the spread.
_ENERGY_ZERO = 1e-28


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
    side_x = make_side(reps_x, spec, device, problems, keep_derivatives=rbf)
    side_y = side_x if symmetric else make_side(reps_y, spec, device, problems, against=side_x.bases if rbf else None)
    sums = pair_sums(side_x.bases, None if symmetric else side_y.bases)
    base = u_statistic_base(spec)
    bandwidth = bandwidth_terms(side_x, side_y, symmetric, sums) if rbf else None
    estimate, low, high, _ = jackknife(sums, n, base, level, bandwidth)

    # The measure's own point estimate from the same Grams: its transformed Gram is the base plus
    # additive terms off the diagonal and its own diagonal (see make_side).
    def own_inner(a: Side, b: Side, base_products: torch.Tensor) -> torch.Tensor:
        return base_products + additive_products(a, b, n) + a.diag.T @ b.diag

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
        side: Side, own_self: torch.Tensor, base_self: torch.Tensor, base_rows: torch.Tensor
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
