"""Input handling shared by every measure: shapes, sample sizes, dtypes and degenerate input."""

import math
import warnings

import numpy as np
import pytest
import torch

from lightning_repsim import functional as F
from lightning_repsim.errors import RepSimValueError, RepSimWarning
from tests import reference as R
from tests.helpers import (
    assert_nan_with_one_warning,
    assert_scalar64,
    call_recording,
    correlated_pair,
    randn,
    to_torch,
)

#: name -> (package function, reference function, options), every measure on features.
MEASURES = {
    "linear_cka": (F.linear_cka, R.linear_cka, {}),
    "debiased_cka": (F.linear_cka, R.linear_cka, {"debiased": True}),
    "rbf_cka": (F.rbf_cka, R.rbf_cka, {}),
    "debiased_rbf_cka": (F.rbf_cka, R.rbf_cka, {"debiased": True}),
    "minibatch_cka": (F.minibatch_cka, R.minibatch_cka, {"batch_size": 16}),
    "rv": (F.rv, R.rv, {}),
    "rv_uncentred": (F.rv, R.rv, {"center": False}),
    "rv2": (F.rv2, R.rv2, {}),
    "rv2_uncentred": (F.rv2, R.rv2, {"center": False}),
    "svcca": (F.svcca, R.svcca, {"keep": 6}),
    "pwcca": (F.pwcca, R.pwcca, {}),
}
NAMES = sorted(MEASURES)
#: The measures that centre (all but the uncentred RV variants).
CENTRED = [n for n in NAMES if not n.endswith("_uncentred")]
#: Measures that need n >= 4 (the unbiased HSIC estimator).
UNBIASED = ["debiased_cka", "debiased_rbf_cka", "minibatch_cka"]


def _call(name, x, y):
    fn, _, options = MEASURES[name]
    return fn(x, y, **options)


def _pair(n=64, p=12, q=10, seed=0):
    return correlated_pair(np.random.default_rng(seed), n, p, q, noise=0.7)


# ---------------------------------------------------------------------------------------------
# Shapes and sample sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_different_n_names_both_shapes(name):
    x, y = randn(10, 3), randn(11, 4)
    with pytest.raises(RepSimValueError, match=r"10,\s*3") as info:
        _call(name, x, y)
    assert "11, 4" in str(info.value).replace(",  ", ", "), str(info.value)


#: The message must show how to make the input 2-D: "reshape ..." or, for 1-D, "[:, None]".
RESHAPE_HINT = r"reshape|\[:, None\]"


@pytest.mark.parametrize("bad", [(20,), (20, 3, 2), (20, 3, 2, 2)], ids=["1d", "3d", "4d"])
@pytest.mark.parametrize("side", ["x", "y"])
@pytest.mark.parametrize("name", NAMES)
def test_not_2d_says_how_to_reshape(name, side, bad):
    good, wrong = randn(20, 3), randn(*bad)
    args = (wrong, good) if side == "x" else (good, wrong)
    with pytest.raises(RepSimValueError, match=RESHAPE_HINT) as info:
        _call(name, *args)
    assert str(tuple(bad)).replace(",)", ")") in str(info.value).replace(",)", ")")  # names the shape
    assert info.match(rf"\b{side}\b")  # names the offending side


@pytest.mark.parametrize("name", NAMES)
def test_fewer_than_two_examples(name):
    x, y = randn(1, 3), randn(1, 2)
    needed = 4 if name in UNBIASED else 2
    with pytest.raises(RepSimValueError, match=rf"(at least|>=) ?{needed}"):
        _call(name, x, y)


@pytest.mark.parametrize("name", UNBIASED)
def test_unbiased_estimator_needs_four_examples(name):
    x, y = randn(3, 3), randn(3, 2)
    with pytest.raises(RepSimValueError, match=r"(at least|>=) ?4"):
        _call(name, x, y)


def test_three_examples_are_computed_for_biased_measures_but_warned_about():
    x, y = _pair(n=3, p=2, q=2)
    tx, ty = to_torch(x), to_torch(y)
    with pytest.warns(RepSimWarning, match=r"n = 3 examples is trivially"):
        np.testing.assert_allclose(float(F.linear_cka(tx, ty)), R.linear_cka(x, y), atol=1e-10)
    with pytest.warns(RepSimWarning, match=r"rv2 from n = 3"):
        np.testing.assert_allclose(float(F.rv2(tx, ty)), R.rv2(x, y), atol=1e-10)


def test_minibatch_smaller_than_four_is_rejected():
    # A block of fewer than 4 rows is dropped, so batch_size < 4 would drop every block.
    x, y = map(to_torch, _pair(n=20))
    with pytest.raises(RepSimValueError, match="batch_size"):
        F.minibatch_cka(x, y, batch_size=3)


def test_gram_functions_validate():
    k = F.gram_linear(randn(6, 3))
    l = F.gram_linear(randn(7, 3))
    with pytest.raises(RepSimValueError, match=r"\(6, 6\).*\(7, 7\)"):
        F.cka(k, l)
    with pytest.raises(RepSimValueError, match=r"\(6, 6\).*\(7, 7\)"):
        F.hsic(k, l)
    with pytest.raises(RepSimValueError, match=RESHAPE_HINT):
        F.gram_linear(randn(6))
    with pytest.raises(RepSimValueError, match=RESHAPE_HINT):
        F.gram_rbf(randn(6, 3, 2))
    small = F.gram_linear(randn(3, 2))
    with pytest.raises(RepSimValueError, match="4"):
        F.center_gram(small, unbiased=True)
    with pytest.raises(RepSimValueError, match="4"):
        F.hsic(small, small, unbiased=True)
    with pytest.raises(RepSimValueError, match="4"):
        F.cka(small, small, debiased=True)


# ---------------------------------------------------------------------------------------------
# Degenerate input: NaN and one warning, never an exception
# ---------------------------------------------------------------------------------------------


def _constant(n, p):
    return torch.full((n, p), 3.0, dtype=torch.float64)


def _with_nan(n, p):
    t = randn(n, p, seed=1)
    t[5, 1] = float("nan")
    return t


def _with_inf(n, p):
    t = randn(n, p, seed=1)
    t[2, 0] = float("inf")
    return t


DEGENERATE = {"constant": _constant, "nan": _with_nan, "inf": _with_inf}


@pytest.mark.parametrize("kind", sorted(DEGENERATE))
@pytest.mark.parametrize("side", ["x", "y"])
@pytest.mark.parametrize("name", CENTRED)
def test_degenerate_side_gives_nan_and_one_warning(name, side, kind):
    healthy = randn(40, 4)
    bad = DEGENERATE[kind](40, 3)
    args = (bad, healthy) if side == "x" else (healthy, bad)
    fn, _, options = MEASURES[name]
    assert_nan_with_one_warning(fn, *args, names=(side,), **options)


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("name", ["rv_uncentred", "rv2_uncentred"])
def test_non_finite_uncentred_gives_nan(name, kind):
    healthy = randn(40, 4)
    fn, _, options = MEASURES[name]
    assert_nan_with_one_warning(fn, DEGENERATE[kind](40, 3), healthy, names=("x",), **options)


@pytest.mark.parametrize("offset", [1e3, 1e6])
@pytest.mark.parametrize("name", CENTRED)
def test_large_offset_is_not_degenerate(name, offset):
    # A layer with a large common offset (an un-normalised layer, a dominant bias) is not
    # constant: centred measures ignore translations, and float64 centring of x + 1e6 with unit
    # spread keeps about 10 digits (the reference and the RBF/CCA measures agree to ~1e-12).
    x, y = _pair()
    base = float(_call(name, to_torch(x), to_torch(y)))
    result, messages = call_recording(_call, name, to_torch(x + offset), to_torch(y))
    assert messages == [], messages
    assert abs(float(result) - base) <= 1e-9, (float(result), base)


@pytest.mark.parametrize("measure", sorted(F.MEASURES))
def test_large_offset_is_not_degenerate_in_similarity_matrix(measure):
    x, y = _pair()
    shifted = F.similarity_matrix([to_torch(x + 1e6)], [to_torch(y)], measure=measure)
    plain = F.similarity_matrix([to_torch(x)], [to_torch(y)], measure=measure)
    assert abs(float(shifted[0, 0]) - float(plain[0, 0])) <= 1e-9, (float(shifted[0, 0]), float(plain[0, 0]))


def test_zero_gram_gives_nan():
    k = F.gram_linear(randn(10, 3))
    zero = torch.zeros(10, 10, dtype=torch.float64)
    for debiased in (False, True):
        assert_nan_with_one_warning(F.cka, k, zero, debiased=debiased)


def test_warns_with_repsim_warning_class():
    with pytest.warns(RepSimWarning, match=r"\by\b"):
        F.linear_cka(randn(10, 3), _constant(10, 2))


# ---------------------------------------------------------------------------------------------
# Dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_input_is_upcast(name, dtype):
    x, y = _pair()
    _, ref, options = MEASURES[name]
    hx, hy = to_torch(x).to(dtype), to_torch(y).to(dtype)
    got = _call(name, hx, hy)
    assert_scalar64(got)
    value = float(got)
    assert math.isfinite(value)
    # The answer of the float64 data, to the input's quantisation ...
    expected = ref(x, y, **options)
    assert abs(value - expected) <= 1e-2 * abs(expected), (value, expected)
    # ... and nothing more: the quantised data in float64 give the same number.
    quantised = ref(hx.double().numpy(), hy.double().numpy(), **options)
    assert abs(value - quantised) <= 1e-6, (value, quantised)


@pytest.mark.parametrize("name", NAMES)
def test_float32_input_matches_float64(name):
    x, y = _pair()
    _, ref, options = MEASURES[name]
    fx, fy = to_torch(x).float(), to_torch(y).float()
    got = _call(name, fx, fy)
    assert_scalar64(got)
    assert abs(float(got) - ref(fx.double().numpy(), fy.double().numpy(), **options)) <= 1e-6
    assert abs(float(got) - ref(x, y, **options)) <= 1e-6


def test_mixed_dtypes():
    x, y = _pair()
    got = F.linear_cka(to_torch(x).float(), to_torch(y).to(torch.bfloat16))
    assert_scalar64(got)
    expected = R.linear_cka(to_torch(x).float().double().numpy(), to_torch(y).to(torch.bfloat16).double().numpy())
    assert abs(float(got) - expected) <= 1e-6


@pytest.mark.parametrize(
    "measure, options",
    [("linear_cka", {}), ("rbf_cka", {}), ("rv", {}), ("rv2", {}), ("rv2", {"center": False})],
)
def test_two_examples_give_a_trivial_one_and_a_warning(measure, options):
    # n = 2: every centred Gram is a multiple of [[1, -1], [-1, 1]], so unrelated layers look identical.
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 7, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    with pytest.warns(RepSimWarning, match=r"from n = 2 examples is trivially \(close to\) 1.*at least 4"):
        value = F.similarity_matrix([x], [y], measure, **options)
    assert abs(float(value)) == pytest.approx(1.0, abs=1e-12)
    with pytest.warns(RepSimWarning, match="n = 2 examples"):
        getattr(F, measure)(x, y, **options)


def test_gram_level_cka_warns_below_four_examples_and_four_are_quiet():
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.warns(RepSimWarning, match="CKA from n = 3"):
        F.cka(F.gram_linear(x), F.gram_linear(x**2))
    x4, y4 = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.linear_cka(x4, y4)
        F.similarity_matrix([x4, y4], measure="debiased_cka")
        F.cka(F.gram_linear(x4), F.gram_linear(y4))
