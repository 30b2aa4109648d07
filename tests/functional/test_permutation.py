"""The permutation test (``lightning_repsim.functional.permutation``): under independence its p-values
are uniform (rejection rate at 5 % within a binomial band), they are never 0, and its null mean is the
measure's chance level."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_repsim import functional as F
from lightning_repsim.functional import permutation as P
from lightning_repsim.measures import gram_spec
from tests.functional.test_intervals import CASES, _pair, one_thread  # noqa: F401  (the fixture applies here too)
from tests.helpers import call_recording, to_torch

# ---------------------------------------------------------------------------------------------------
# The permutation test
# ---------------------------------------------------------------------------------------------------


def _independent(g: np.random.Generator, n: int, p: int, q: int):
    return to_torch(g.standard_normal((n, p))), to_torch(g.standard_normal((n, q)) ** 3)  # y skewed


@pytest.mark.parametrize(
    "measure, options, draws, n, p, q",
    [
        ("linear_cka", {}, 400, 30, 4, 5),  # feature route (p q < n)
        ("debiased_cka", {}, 200, 24, 40, 6),  # Gram route
        ("rbf_cka", {}, 200, 24, 3, 3),
        ("svcca", {"keep": 3}, 200, 30, 5, 5),
    ],
)
def test_p_values_are_uniform_under_independence(measure, options, draws, n, p, q):
    g = np.random.default_rng(7)
    ps = np.array(
        [F.permutation_test(*_independent(g, n, p, q), measure, 99, seed=i, **options).p_value for i in range(draws)]
    )
    assert ps.min() >= 0.01
    # Exactly P(p <= 0.05) = 0.05 with 99 permutations; binomial sd sqrt(.05 .95 / draws) (0.011 at 400).
    sd = math.sqrt(0.05 * 0.95 / draws)
    assert abs((ps <= 0.05).mean() - 0.05) < 3 * sd, (ps <= 0.05).mean()
    assert abs((ps <= 0.5).mean() - 0.5) < 3 * math.sqrt(0.25 / draws), (ps <= 0.5).mean()


@pytest.mark.parametrize("measure, options", CASES + [("svcca", {}), ("pwcca", {})])
def test_permutation_test_value_and_power(measure, options):
    x, y = _pair(n=60, p=6, q=4)
    t = F.permutation_test(x, y, measure, 199, **options)
    assert t.value == pytest.approx(float(F.similarity_matrix([x], [y], measure, **options)[0, 0]), abs=1e-12)
    assert t.p_value == 1 / 200  # never 0: (0 + 1) / (199 + 1)
    assert t.n_permutations == 199 and t.n == 60 and t.null_mean < t.value


def test_permutation_routes_and_cca_shortcut_agree_with_recomputation():
    x, y = _pair(n=40, p=3, q=4, shift=1.0)
    perms = P._permutations(40, 12, 3, x.device)
    for measure, options in [
        ("linear_cka", {}),
        ("debiased_cka", {}),
        ("rv2", {}),
        ("rv", {"center": False}),
        ("rv2", {"center": False}),
    ]:
        spec = gram_spec(measure, **options)
        px = F.Representations([x]).prepared(spec, x.device)
        py = F.Representations([y]).prepared(spec, x.device)
        features = P._feature_null(px, py, spec, perms)
        grams = P._gram_null(px, py, spec, perms, {})
        for a, b in zip(features, grams):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-11, atol=0)
        expected = [float(F.similarity_matrix([x], [y[perm]], measure, **options)[0, 0]) for perm in perms]
        np.testing.assert_allclose((grams[1] / torch.sqrt(grams[2] * grams[3])).numpy(), expected, atol=1e-12)
    for measure, options in [("svcca", {"keep": 2}), ("pwcca", {}), ("svcca", {"keep": 0.9})]:
        for wide in (False, True):
            a, b = (x, y) if not wide else (y, x)
            _, null, _ = P._cca_null(a, b, measure, {"keep": 0.99, **options} if measure == "svcca" else options, perms)
            expected = [float(F.similarity_matrix([a], [b[perm]], measure, **options)[0, 0]) for perm in perms]
            np.testing.assert_allclose(null.numpy(), expected, atol=1e-12)


def test_null_mean_is_the_chance_level():
    g = np.random.default_rng(11)
    x, y = _independent(g, 50, 30, 20)
    t = F.permutation_test(x, y, "linear_cka", 500)
    fresh = np.mean([float(F.linear_cka(x, _independent(g, 50, 30, 20)[1])) for _ in range(300)])
    assert t.null_mean > 0.2 and abs(t.null_mean - fresh) < 0.02  # biased CKA's chance level at p ~ n
    debiased = F.permutation_test(x, y, "debiased_cka", 500)
    assert abs(debiased.null_mean) < 0.01


def test_permutation_seed_and_degenerate_input():
    x, y = _pair(n=40, p=30, q=30)
    noise = to_torch(np.random.default_rng(1).standard_normal((40, 30)))
    a, b = F.permutation_test(x, noise, seed=5), F.permutation_test(x, noise, seed=5)
    assert a == b and F.permutation_test(x, noise, seed=6).null_mean != a.null_mean
    t, messages = call_recording(lambda: F.permutation_test(x, torch.ones(40, 2, dtype=torch.float64)))
    assert math.isnan(t.value) and math.isnan(t.p_value) and math.isnan(t.null_mean) and len(messages) == 1


def test_ties_count_as_exceeding():
    # y = x = one example apart from the rest: a permuted y gives exactly the observed value (1) whenever
    # the permutation keeps that example in place, and one other value otherwise. The ties count.
    x = torch.zeros(20, 1, dtype=torch.float64)
    x[0] = 1.0
    t = F.permutation_test(x, x.clone(), "linear_cka", 199, seed=0)
    ties = int((P._permutations(20, 199, 0, x.device)[:, 0] == 0).sum())
    assert ties > 0 and t.value == pytest.approx(1.0) and t.p_value == (ties + 1) / 200
