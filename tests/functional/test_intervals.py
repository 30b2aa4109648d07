"""Confidence intervals (``lightning_repsim.functional.intervals``).

Three kinds of checks:

* closed forms against brute force: the leave-one-out inner products against the measure recomputed
  on the n - 1 remaining examples, the second-order variance term against the explicit n x n kernel,
  the point estimate against ``similarity_matrix``;
* coverage by simulation: over repeated draws from models whose population similarity is known in
  closed form (linear kernels: ||Σxy||² / (||Σx|| ||Σy||); RBF kernels on Gaussian data: Gaussian
  integrals, with the median bandwidth from the chi-square median), the 95 % interval covers it in
  90-99 % of draws, and its standard error matches the spread of its centre over draws. With 300 draws
  a method of exact 95 % coverage falls below 0.90 with probability 4e-5 and above 0.99 with
  probability 8e-4 (binomial sd 0.0126); one of true coverage 0.93 fails the lower bound 2 % of the
  time. Negative controls run the same harness on a percentile bootstrap and on a jackknife of the
  biased estimator, which must fail it;

CI runs every supported measure at n = 64 and 256 (the file takes about 30 s on two shared cores). The long grid
(n = 64 ... 1024, more draws and levels) runs with ``REPSIM_SLOW=1`` (several minutes); its table is in
``benchmarks/results/inference.md`` (``python benchmarks/bench_inference.py``).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pytest
import torch

from lightning_repsim import functional as F
from lightning_repsim.errors import RepSimValueError
from lightning_repsim.functional import _jackknife as J
from lightning_repsim.measures import gram_spec
from tests import reference as R
from tests.helpers import call_recording, to_torch

try:  # installed with scikit-learn (the test extra); only makes the simulations faster
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

SLOW = pytest.mark.skipif(not os.environ.get("REPSIM_SLOW"), reason="long coverage grid: set REPSIM_SLOW=1")

#: Target population similarities of the coverage models: near 0, in the middle, near 1.
LEVELS = (0.05, 0.5, 0.95)

#: Acceptance band of the simulated coverage of a 95 % interval (see the module docstring).
BAND = (0.90, 0.99)

#: Draws per coverage cell in CI.
DRAWS = 300


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of small products: one thread each (torch's and NumPy's BLAS) is 3-5x faster on a
    shared 2-core machine, where waking a pool per product costs more than the product."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if threadpool_limits is None:
            yield
        else:
            with threadpool_limits(1):
                yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# Models with a known population similarity
# ---------------------------------------------------------------------------------------------------


def _bisect(f: Callable[[float], float], target: float, low: float, high: float, decreasing: bool) -> float:
    for _ in range(100):
        mid = (low + high) / 2
        above = f(mid) > target
        low, high = (mid, high) if above == decreasing else (low, mid)
    return (low + high) / 2


def linear_population(cov_x: np.ndarray, a: np.ndarray, noise: float, mean_x=None, mean_y=None) -> float:
    """Population linear CKA (= debiased CKA = centred RV, RV2) of x ~ (mean_x, cov_x) and y = x a + noise e
    (+ mean_y); with means given, the uncentred RV's value from second moments instead of covariances."""
    q = a.shape[1]
    if mean_x is None:
        cross, sx, sy = cov_x @ a, cov_x, a.T @ cov_x @ a + noise**2 * np.eye(q)
    else:
        sx = cov_x + np.outer(mean_x, mean_x)
        cross = sx @ a + np.outer(mean_x, mean_y)
        sy = (
            a.T @ sx @ a
            + noise**2 * np.eye(q)
            + a.T @ np.outer(mean_x, mean_y)
            + np.outer(mean_y, mean_x) @ a
            + np.outer(mean_y, mean_y)
        )
    return float(np.linalg.norm(cross) ** 2 / (np.linalg.norm(sx) * np.linalg.norm(sy)))


@functools.cache
def chi2_median(p: int) -> float:
    """Median of the chi-square distribution with p degrees of freedom (CDF = P(p/2, t/2))."""
    cdf = lambda t: float(
        torch.special.gammainc(torch.tensor(p / 2, dtype=torch.float64), torch.tensor(t / 2, dtype=torch.float64))
    )
    return _bisect(cdf, 0.5, 0.0, 10.0 * p + 10.0, decreasing=False)


def rbf_population(p: int, c: float, sigma: float = 0.8) -> float:
    """Population RBF CKA of x ~ N(0, I_p) and y = c x + sqrt(1 - c²) e (also N(0, I_p)).

    Kernel exp(-||d||² / (2 sigma² m)) with m the median of ||x - x'||² = 2 chi²_p. For z ~ N(0, C),
    E exp(-zᵀz / (2h)) = det(I + C / h)^(-1/2), and HSIC(k, l) = E[k l] - 2 E[k(x, x') l(y, y'')] + E k E l.
    """
    h = sigma**2 * 2.0 * chi2_median(p)
    eye = np.eye(p)
    expect = lambda cov: float(np.exp(-0.5 * np.linalg.slogdet(np.eye(len(cov)) + cov / h)[1]))
    mean_k = (1.0 + 2.0 / h) ** (-p / 2)

    def hsic(cross: np.ndarray) -> float:
        pair = np.block([[2 * eye, 2 * cross], [2 * cross.T, 2 * eye]])  # (x - x', y - y')
        triple = np.block([[2 * eye, cross], [cross.T, 2 * eye]])  # (x - x', y - y'')
        return expect(pair) - 2.0 * expect(triple) + mean_k**2

    return hsic(c * eye) / hsic(eye)


@dataclass
class Model:
    """One x and one y per target level, drawn together; ``population[k]`` is y_k's similarity to x."""

    name: str
    draw: Callable[[np.random.Generator, int], tuple[torch.Tensor, list[torch.Tensor]]]
    population: tuple[float, ...]


def linear_model(p: int = 20, spectrum: str = "decay", levels=LEVELS, uncentred: bool = False, seed: int = 0) -> Model:
    """x ~ N(mean, diag(lam)), y_k = x Q + s_k e (+ mean), Q orthogonal, s_k solved for each level.

    ``spectrum``: ``decay`` (lam_j = 1/j, a few dominant directions), ``iso`` (lam = 1, effective
    dimension p: where biased estimators are far off). ``uncentred``: non-zero means, and the levels
    are those of the uncentred RV (second moments).
    """
    rng = np.random.default_rng(seed)
    lam = 1.0 / np.arange(1, p + 1) if spectrum == "decay" else np.ones(p)
    q_mat = np.linalg.qr(rng.standard_normal((p, p)))[0]
    mean_x = rng.standard_normal(p) * 0.5 if uncentred else None
    mean_y = rng.standard_normal(p) * 0.5 if uncentred else None
    pop = lambda s: linear_population(np.diag(lam), q_mat, s, mean_x, mean_y)
    noise = [_bisect(pop, level, 0.0, 1e4, decreasing=True) for level in levels]

    def draw(g: np.random.Generator, n: int):
        x = g.standard_normal((n, p)) * np.sqrt(lam) + (0.0 if mean_x is None else mean_x)
        base = x @ q_mat + (0.0 if mean_y is None else mean_y)
        return to_torch(x), [to_torch(base + s * g.standard_normal((n, p))) for s in noise]

    return Model(f"linear {spectrum} p={p}{' uncentred' if uncentred else ''}", draw, tuple(pop(s) for s in noise))


def rbf_model(p: int = 10, levels=LEVELS, sigma: float = 0.8) -> Model:
    coefficients = [
        _bisect(lambda c: rbf_population(p, c, sigma), level, 0.0, 1.0, decreasing=False) for level in levels
    ]

    def draw(g: np.random.Generator, n: int):
        x = g.standard_normal((n, p))
        return to_torch(x), [to_torch(c * x + math.sqrt(1 - c * c) * g.standard_normal((n, p))) for c in coefficients]

    return Model(f"rbf iso p={p}", draw, tuple(rbf_population(p, c, sigma) for c in coefficients))


#: measure -> (options, model): every supported measure in CI, each on a model that exercises it.
COVERAGE_CASES = {
    "linear_cka": ({}, lambda: linear_model(50, "iso")),  # biased CKA's own bias is ~10 se here
    "debiased_cka": ({}, lambda: linear_model(20, "decay")),
    "rbf_cka": ({}, lambda: rbf_model(10)),
    "rv": ({"center": False}, lambda: linear_model(20, "decay", uncentred=True)),
    "rv2": ({}, lambda: linear_model(20, "decay", seed=1)),
}

_MODELS: dict[str, Model] = {}


def _model(measure: str) -> Model:
    if measure not in _MODELS:
        _MODELS[measure] = COVERAGE_CASES[measure][1]()
    return _MODELS[measure]


# ---------------------------------------------------------------------------------------------------
# The coverage harness
# ---------------------------------------------------------------------------------------------------

Interval = Callable[[torch.Tensor, list[torch.Tensor]], tuple[np.ndarray, np.ndarray]]


def library_interval(measure: str, level: float = 0.95, **options) -> Interval:
    def interval(x, ys):
        r = F.interval_matrix([x], ys, measure, level=level, **options)
        return r.low[0].numpy(), r.high[0].numpy()

    return interval


@dataclass
class Coverage:
    covered: np.ndarray  # per level, the fraction of draws whose interval holds the population value
    se_ratio: np.ndarray  # per level, mean standard error (Fisher z) / sd of the interval's centre

    def __str__(self) -> str:
        return " ".join(f"{c:.3f}" for c in self.covered)


def coverage(
    model: Model, interval: Interval, n: int, draws: int = DRAWS, seed: int = 0, level: float = 0.95
) -> Coverage:
    """Simulated coverage per population level, and the calibration of the standard error.

    The standard error is read off the interval, ``(atanh(high) - atanh(low)) / (2 q)``, its centre as
    the midpoint on that scale; only for intervals strictly inside (0, 1) (NaN otherwise).
    """
    rng = np.random.default_rng(seed)
    population = np.array(model.population)
    hits = np.zeros(len(population))
    centres, errors = [], []
    q = NormalDist().inv_cdf(0.5 + level / 2)
    for _ in range(draws):
        x, ys = model.draw(rng, n)
        low, high = interval(x, ys)
        hits += (low <= population) & (population <= high)
        inside = (low > 0) & (high < 1)
        zl, zh = np.arctanh(np.where(inside, low, 0.5)), np.arctanh(np.where(inside, high, 0.5))
        centres.append(np.where(inside, (zl + zh) / 2, np.nan))
        errors.append(np.where(inside, (zh - zl) / (2 * q), np.nan))
    centres, errors = np.array(centres), np.array(errors)
    enough = np.isfinite(centres).sum(0) >= 2
    ratio = np.full(len(population), np.nan)
    ratio[enough] = np.nanmean(errors[:, enough], 0) / np.nanstd(centres[:, enough], 0)
    return Coverage(hits / draws, ratio)


# ---------------------------------------------------------------------------------------------------
# Coverage of every supported measure (CI)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [64, 256])
@pytest.mark.parametrize("measure", sorted(COVERAGE_CASES))
def test_coverage(measure, n):
    options, _ = COVERAGE_CASES[measure]
    model = _model(measure)
    result = coverage(model, library_interval(measure, **options), n, seed=n)
    low, high = BAND
    assert ((result.covered >= low) & (result.covered <= high)).all(), (
        f"{measure} on {model.name}, n = {n}: coverage {result} at population {model.population}, outside {BAND}"
    )
    # The standard error matches the spread over draws (~4 % sampling error in 300 draws). Near 0 the
    # centre's distribution is skewed and the intervals may touch 0: only the other two levels.
    ratio = result.se_ratio[1:]
    assert ((ratio > 0.85) & (ratio < 1.15)).all(), f"{measure}, n = {n}: se / sd = {ratio}"


def test_population_oracles():
    # The closed forms the coverage tests rest on, against large-sample estimates.
    model = linear_model(20, "decay", levels=(0.5,))
    x, (y,) = model.draw(np.random.default_rng(5), 20000)
    assert abs(float(F.linear_cka(x, y)) - model.population[0]) < 0.01
    model = linear_model(20, "decay", levels=(0.5,), uncentred=True)
    x, (y,) = model.draw(np.random.default_rng(6), 20000)
    assert abs(float(F.rv(x, y, center=False)) - model.population[0]) < 0.01
    assert abs(chi2_median(2) - 2 * math.log(2)) < 1e-9  # chi²_2 is exponential with mean 2
    model = rbf_model(10, levels=(0.5,))
    estimates = [
        float(F.rbf_cka(*(lambda d: (d[0], d[1][0]))(model.draw(np.random.default_rng(s), 1500)), debiased=True))
        for s in range(3)
    ]
    assert abs(np.mean(estimates) - model.population[0]) < 0.02, (estimates, model.population)


# ---------------------------------------------------------------------------------------------------
# Negative controls: the harness fails methods known to be wrong
# ---------------------------------------------------------------------------------------------------


def percentile_bootstrap(resamples: int = 200, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap of linear CKA: examples resampled with replacement, CKA recomputed on each
    resample (as weighted covariances: duplicated rows count twice)."""
    rng = np.random.default_rng(seed)

    def cka(weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        mean_x, mean_y = weights @ x / n, weights @ y / n

        def cov(a, ma, b, mb):
            weighted = (a[None, :, :] * weights[:, :, None]).transpose(0, 2, 1)  # (B, p, n)
            return weighted @ b / n - ma[:, :, None] * mb[:, None, :]

        c = cov(x, mean_x, y, mean_y)
        return (c**2).sum((1, 2)) / np.sqrt(
            (cov(x, mean_x, x, mean_x) ** 2).sum((1, 2)) * (cov(y, mean_y, y, mean_y) ** 2).sum((1, 2))
        )

    def interval(x, ys):
        n = x.shape[0]
        weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)]).astype(float)
        values = np.stack([cka(weights, x.numpy(), y.numpy()) for y in ys])
        tail = (1 - level) / 2
        return np.quantile(values, tail, axis=1), np.quantile(values, 1 - tail, axis=1)

    return interval


def biased_loo(x: torch.Tensor, y: torch.Tensor) -> tuple[float, np.ndarray]:
    """Linear CKA and its n leave-one-out values, the biased (V-statistic, HKH-centred) estimator.

    With K the Gram of the n centred rows, leaving row i out recentres the others by x_i / (n - 1):
    ``K_-i[j, k] = K_jk + c (K_ij + K_ik) + c² K_ii`` (c = 1/(n-1)). Summing over j, k != i with
    K's zero row sums gives ``<K_-i, L_-i> = <K, L> - 2 d sum_j K_ij L_ij + d² K_ii L_ii``, d = n/(n-1).
    """
    n = x.shape[0]
    xc, yc = x - x.mean(0), y - y.mean(0)
    k, l = (xc @ xc.T).numpy(), (yc @ yc.T).numpy()
    d = n / (n - 1)

    def loo(a, b):
        return (a * b).sum(), (a * b).sum() - 2 * d * (a * b).sum(1) + d * d * np.diag(a) * np.diag(b)

    (c, cl), (s, sl), (t, tl) = loo(k, l), loo(k, k), loo(l, l)
    return c / math.sqrt(s * t), cl / np.sqrt(sl * tl)


def biased_jackknife(level: float = 0.95) -> Interval:
    """The same jackknife as the library's (Fisher z, bias-corrected, normal) but of biased linear CKA."""
    q = NormalDist().inv_cdf(0.5 + level / 2)

    def interval(x, ys):
        n = x.shape[0]
        lows, highs = [], []
        for y in ys:
            value, left = biased_loo(x, y)
            z, zl = math.atanh(value), np.arctanh(left)
            se = math.sqrt((n - 1) / n * ((zl - zl.mean()) ** 2).sum())
            centre = n * z - (n - 1) * zl.mean()
            lows.append(math.tanh(centre - q * se))
            highs.append(math.tanh(centre + q * se))
        return np.array(lows), np.array(highs)

    return interval


def test_percentile_bootstrap_fails_the_coverage_test():
    result = coverage(linear_model(20, "decay"), percentile_bootstrap(), 256, draws=100)
    assert result.covered.min() < BAND[0], result  # measured: 0.0 near 0, ~0.5 in the middle


def test_jackknife_of_the_biased_estimator_fails_the_coverage_test():
    result = coverage(_model("linear_cka"), biased_jackknife(), 64, draws=100)
    assert result.covered.max() < BAND[0], result  # its bias is many standard errors at p = 50, n = 64


def test_uncorrected_jackknife_variance_fails_the_calibration_test(monkeypatch):
    # Without the second-order correction the jackknife over-estimates the variance where the
    # degenerate part of the U-statistic matters (effective dimension 50 at n = 64).
    monkeypatch.setattr(J, "_second_order_variance", lambda sums, s, n: torch.zeros_like(s))
    result = coverage(_model("linear_cka"), library_interval("linear_cka"), 64, draws=150)
    assert result.se_ratio[1] > 1.15, result.se_ratio


@SLOW
@pytest.mark.parametrize("n", [64, 128, 256, 512, 1024])
@pytest.mark.parametrize("measure", sorted(COVERAGE_CASES))
def test_coverage_long_grid(measure, n):
    options, _ = COVERAGE_CASES[measure]
    model = _model(measure)
    result = coverage(model, library_interval(measure, **options), n, draws=400, seed=1000 + n)
    assert ((result.covered >= BAND[0]) & (result.covered <= BAND[1])).all(), (measure, n, str(result))


# ---------------------------------------------------------------------------------------------------
# Closed forms against brute force
# ---------------------------------------------------------------------------------------------------


def _pair(n=30, p=6, q=5, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p)) + shift
    y = x @ rng.standard_normal((p, q)) + rng.standard_normal((n, q)) + shift
    return to_torch(x), to_torch(y)


def _sums(x, y, measure, **options):
    spec = gram_spec(measure, **options)
    problems = {}
    sx = J.make_side(F.Representations([x]), spec, x.device, problems)
    sy = J.make_side(F.Representations([y]), spec, x.device, problems)
    return J.pair_sums(sx.bases, sy.bases), J.u_statistic_base(spec), spec


@pytest.mark.parametrize(
    "measure, options, brute",
    [
        # The U-statistic each interval jackknifes, recomputed on the n - 1 remaining examples.
        ("linear_cka", {}, lambda x, y: F.linear_cka(x, y, debiased=True)),
        ("rv", {}, lambda x, y: F.linear_cka(x, y, debiased=True)),
        ("rv2", {"center": False}, lambda x, y: F.rv2(x, y, center=False)),
        ("rv", {"center": False}, lambda x, y: F.rv2(x, y, center=False)),
    ],
)
def test_leave_one_out_equals_recomputation(measure, options, brute):
    x, y = _pair(shift=2.0)
    sums, base, _ = _sums(x, y, measure, **options)
    left = J._leave_one_out(sums, x.shape[0], base)[:, 0, 0].numpy()
    keep = lambda i: torch.cat([torch.arange(i), torch.arange(i + 1, x.shape[0])])
    expected = [float(brute(x[keep(i)], y[keep(i)])) for i in range(x.shape[0])]
    np.testing.assert_allclose(left, expected, rtol=0, atol=1e-12)


def test_leave_one_out_rbf_equals_recomputation_at_fixed_bandwidth():
    # The jackknife holds the bandwidth (sigma² x the full sample's median distance) fixed.
    x, y = _pair()
    sums, base, _ = _sums(x, y, "rbf_cka", sigma=0.6)
    left = J._leave_one_out(sums, x.shape[0], base)[:, 0, 0].numpy()
    kx, ky = R.gram_rbf(x.numpy(), 0.6), R.gram_rbf(y.numpy(), 0.6)
    for i in range(x.shape[0]):
        keep = np.delete(np.arange(x.shape[0]), i)
        expected = R.cka(kx[np.ix_(keep, keep)], ky[np.ix_(keep, keep)], debiased=True)
        assert abs(left[i] - expected) < 1e-12


@pytest.mark.parametrize("symmetric", [False, True])
def test_rbf_leave_one_out_follows_the_re_estimated_bandwidth(symmetric):
    # Recomputed on n - 1 examples, RBF CKA also re-estimates its bandwidth (the median distance). The
    # first-order bandwidth term must account for most of that change.
    rng = np.random.default_rng(3)
    n = 80
    x = to_torch(rng.standard_normal((n, 6)))
    y = 0.9 * x + 0.45 * to_torch(rng.standard_normal((n, 6)))
    spec, problems = gram_spec("rbf_cka"), {}
    if symmetric:
        sx = sy = J.make_side(F.Representations([x, y]), spec, x.device, problems, keep_derivatives=True)
        sums = J.pair_sums(sx.bases, None)
    else:
        sx = J.make_side(F.Representations([x]), spec, x.device, problems, keep_derivatives=True)
        sy = J.make_side(F.Representations([y]), spec, x.device, problems, against=sx.bases)
        sums = J.pair_sums(sx.bases, sy.bases)
    bandwidth = J.bandwidth_terms(sx, sy, symmetric, sums)
    fixed = J._leave_one_out(sums, n, "ucentre")[:, 0, -1].numpy()
    moving = J._leave_one_out(sums, n, "ucentre", bandwidth)[:, 0, -1].numpy()
    brute = np.array(
        [
            float(F.rbf_cka(x[np.delete(np.arange(n), i)], y[np.delete(np.arange(n), i)], debiased=True))
            for i in range(n)
        ]
    )
    assert np.abs(moving - brute).max() < 0.3 * np.abs(fixed - brute).max()  # measured: 0.15
    assert np.abs(moving - brute).max() < 0.1 * brute.std() * math.sqrt(n)


def test_biased_leave_one_out_formula_equals_recomputation():
    # The derivation behind the negative control above (centring depends on all rows).
    x, y = _pair(p=40, q=30)
    value, left = biased_loo(x, y)
    assert abs(value - float(F.linear_cka(x, y))) < 1e-12
    for i in range(x.shape[0]):
        keep = np.delete(np.arange(x.shape[0]), i)
        assert abs(left[i] - float(F.linear_cka(x[keep], y[keep]))) < 1e-12


@pytest.mark.parametrize("measure, options", [("debiased_cka", {}), ("rbf_cka", {}), ("rv2", {"center": False})])
def test_second_order_term_equals_explicit_kernel(measure, options):
    x, y = _pair(n=25)
    n = x.shape[0]
    sums, base, spec = _sums(x, y, measure, **options)
    got = float(J._second_order_variance(sums, sums.cross / torch.sqrt(torch.outer(sums.self_x, sums.self_y)), n))
    problems = {}
    b = J.make_side(F.Representations([x]), spec, x.device, problems).bases[0].numpy()
    c = J.make_side(F.Representations([y]), spec, x.device, problems).bases[0].numpy()
    cross, sxx, syy = (b * c).sum(), (b * b).sum(), (c * c).sum()
    s = cross / math.sqrt(sxx * syy)
    g = s * n * (n - 1) * (b * c / cross - b * b / (2 * sxx) - c * c / (2 * syy))
    u = R.center_gram(g, unbiased=True)
    expected = 2 * (u * u).sum() / (n * (n - 3)) / (n * (n - 1))
    assert got == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------------------------------------
# The point estimate, shapes, and properties of the intervals
# ---------------------------------------------------------------------------------------------------

CASES = [
    ("linear_cka", {}),
    ("linear_cka", {"debiased": True}),
    ("debiased_cka", {}),
    ("rbf_cka", {}),
    ("rbf_cka", {"sigma": 0.5, "debiased": True}),
    ("rv", {}),
    ("rv", {"center": False}),
    ("rv2", {}),
    ("rv2", {"center": False}),
]


def _layers(n=40, widths=(3, 8, 60), seed=0, shift=1.5):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, 4))
    out = []
    for p in widths:
        h = np.tanh(h @ rng.standard_normal((h.shape[1], p))) + 0.3 * rng.standard_normal((n, p)) + shift
        out.append(to_torch(h))
    return out


@pytest.mark.parametrize("measure, options", CASES)
def test_value_is_similarity_matrix(measure, options):
    xs, ys = _layers(), _layers(seed=1, widths=(5, 70))
    r = F.interval_matrix(xs, ys, measure, **options)
    np.testing.assert_allclose(
        r.value.numpy(), F.similarity_matrix(xs, ys, measure, **options).numpy(), rtol=0, atol=1e-12
    )
    sym = F.interval_matrix(xs, None, measure, **options)
    np.testing.assert_allclose(
        sym.value.numpy(), F.similarity_matrix(xs, None, measure, **options).numpy(), rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(sym.low.numpy(), sym.low.numpy().T, atol=1e-12)
    for result in (r, sym):
        assert result.value.dtype == result.low.dtype == result.high.dtype == torch.float64
        assert bool(
            (
                (0 <= result.low)
                & (result.low <= result.estimate)
                & (result.estimate <= result.high)
                & (result.high <= 1)
            ).all()
        )


@pytest.mark.parametrize("measure, options", CASES)
def test_matrix_equals_pairwise_intervals(measure, options):
    xs, ys = _layers(), _layers(seed=1, widths=(5, 70))
    r = F.interval_matrix({"a": xs[0], "b": xs[2]}, ys, measure, **options)
    one = F.similarity_interval(xs[2], ys[1], measure, **options)
    assert r.names_x == ("a", "b") and r.names_y == ("ys[0]", "ys[1]")
    got = (float(r.value[1, 1]), float(r.low[1, 1]), float(r.high[1, 1]), float(r.estimate[1, 1]))
    assert got == pytest.approx((one.value, one.low, one.high, one.estimate), abs=1e-12)
    assert (one.level, one.n, one.method) == (0.95, 40, "jackknife")
    assert one.measure == ("debiased_cka" if options.get("debiased") and measure == "linear_cka" else measure)


def test_measures_with_one_population_value_share_the_interval():
    # Linear CKA, debiased CKA, centred RV and RV2 estimate the same population value.
    xs, ys = _layers(), _layers(seed=1, widths=(5, 70))
    reps = F.Representations(xs)
    results = [F.interval_matrix(reps, ys, m) for m in ("linear_cka", "debiased_cka", "rv", "rv2")]
    for r in results[1:]:
        np.testing.assert_allclose(r.low.numpy(), results[0].low.numpy(), atol=1e-12)
        np.testing.assert_allclose(r.high.numpy(), results[0].high.numpy(), atol=1e-12)
    assert not np.allclose(results[0].value.numpy(), results[1].value.numpy())


def test_level_widens_the_interval_and_identical_layers_give_one():
    x, y = _pair(n=80)
    narrow, wide = F.similarity_interval(x, y, level=0.5), F.similarity_interval(x, y, level=0.99)
    assert wide.low < narrow.low < narrow.high < wide.high
    same = F.similarity_interval(x, 3 * x + 1)
    assert same.value == pytest.approx(1.0) and same.low > 1 - 1e-9 and same.high == pytest.approx(1.0)


def test_interval_shrinks_like_one_over_root_n():
    model = linear_model(20, "decay", levels=(0.5,))
    widths = {}
    for n in (100, 1600):
        x, (y,) = model.draw(np.random.default_rng(n), n)
        r = F.similarity_interval(x, y)
        widths[n] = r.high - r.low
    assert 2.5 < widths[100] / widths[1600] < 6.5  # sqrt(16) = 4


@pytest.mark.parametrize("measure, options", [("linear_cka", {}), ("rbf_cka", {}), ("rv", {"center": False})])
def test_accelerator_route_on_cpu_gives_the_same_intervals(monkeypatch, measure, options):
    # Off the host, Grams come from PreparedLayers.gram without out= buffers; force that path on CPU.
    xs, ys = _layers(), _layers(seed=1, widths=(5, 70))
    host = F.interval_matrix(xs, ys, measure, **options)
    monkeypatch.setattr(J, "host_route", lambda device: False)
    other = F.interval_matrix(xs, ys, measure, **options)
    for a, b in ((host.value, other.value), (host.low, other.low), (host.high, other.high)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-12)


def test_representations_cache_is_used_and_left_intact():
    xs = _layers()
    reps = F.Representations(xs)
    before = F.similarity_matrix(reps, measure="rbf_cka")
    r = F.interval_matrix(reps, measure="rbf_cka")
    np.testing.assert_allclose(r.value.numpy(), before.numpy(), atol=1e-12)
    np.testing.assert_allclose(F.similarity_matrix(reps, measure="rbf_cka").numpy(), before.numpy(), atol=0)
    np.testing.assert_allclose(
        F.similarity_matrix(reps, measure="rv2").numpy(), F.similarity_matrix(xs, measure="rv2").numpy(), atol=1e-12
    )


def test_degenerate_layers_give_nan_and_one_warning():
    xs = _layers()
    dead = torch.full((40, 7), 3.0, dtype=torch.float64)
    broken = xs[1].clone()
    broken[3, 2] = float("nan")
    (r,), messages = call_recording(
        lambda: (F.interval_matrix({"ok": xs[0], "dead": dead, "broken": broken}, [xs[2]], "linear_cka"),)
    )
    assert (
        len(messages) == 1 and "dead: it has zero variance" in messages[0] and "broken: it contains NaN" in messages[0]
    )
    for field in (r.value, r.low, r.high, r.estimate):
        assert bool(torch.isnan(field[1:]).all()) and bool(torch.isfinite(field[0]).all())
    one, messages = call_recording(lambda: F.similarity_interval(dead, xs[0]))
    assert len(messages) == 1 and math.isnan(one.value) and math.isnan(one.low) and math.isnan(one.high)


def test_one_dominant_example_gives_nan_interval_not_a_wrong_one():
    x, y = _pair(n=20)
    lonely = torch.zeros(20, 3, dtype=torch.float64)
    lonely[0] = torch.tensor([5.0, -1.0, 2.0])  # all of the layer's variance in one example
    r, messages = call_recording(lambda: F.similarity_interval(lonely, y, "debiased_cka"))
    assert math.isfinite(r.value) and math.isnan(r.low) and math.isnan(r.high)
    assert len(messages) == 1 and "one or two examples carry all its variance" in messages[0]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, y: F.similarity_interval(x, y, level=1.0), "level .* strictly between 0 and 1"),
        (lambda x, y: F.similarity_interval(x, y, level=0), "level"),
        (lambda x, y: F.similarity_interval(x, y, level=float("nan")), "level"),
        (lambda x, y: F.similarity_interval(x, y, level=True), "level"),
        (lambda x, y: F.interval_matrix([x], [y], level="0.95"), "level"),
        (lambda x, y: F.similarity_interval(x[:9], y[:9]), "at least 10 examples"),
        (lambda x, y: F.similarity_interval(x, y[:20]), "same number of examples"),
        (lambda x, y: F.similarity_interval(x, y, "cosine"), "unknown measure 'cosine'"),
        (lambda x, y: F.similarity_interval(x, y, "rv", sigma=1.0), "rv takes center; got unexpected option"),
        (lambda x, y: F.similarity_interval(x, y, "svcca"), "svcca has no confidence interval.*permutation_test"),
        (lambda x, y: F.interval_matrix([x], [y], "pwcca"), "pwcca has no confidence interval"),
        (lambda x, y: F.similarity_interval(x, y, "rbf_cka", sigma=0.0), "sigma > 0"),
        (lambda x, y: F.similarity_interval(x, y, seed=-1), "seed"),
        (lambda x, y: F.permutation_test(x, y, n_permutations=0), "n_permutations must be an int >= 1"),
        (lambda x, y: F.permutation_test(x, y, n_permutations=9.5), "n_permutations"),
        (lambda x, y: F.permutation_test(x, y, n_permutations=True), "n_permutations"),
        (lambda x, y: F.permutation_test(x, y, "linear_cka", 10, seed=1.5), "seed must be an int"),
        (lambda x, y: F.permutation_test(x, y, "cka"), "unknown measure 'cka'"),
        (lambda x, y: F.permutation_test(x, y, "svcca", keep=2.0), "keep"),
        (lambda x, y: F.permutation_test(x, y[:, 0]), "y must be 2-D"),
    ],
)
def test_errors(call, match):
    x, y = _pair()
    with pytest.raises(RepSimValueError, match=match):
        call(x, y)
