"""RV (Robert & Escoufier 1976) and modified RV / RV2 (Smilde et al. 2009)."""

import hoggorm as ho
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_repsim import functional as F
from tests import reference as R
from tests.helpers import (
    HYPOTHESIS,
    SHAPES,
    assert_close,
    assert_scalar64,
    correlated_pair,
    shape_pair,
    to_torch,
)

MEASURES = {"rv": (F.rv, R.rv), "rv2": (F.rv2, R.rv2)}


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("measure", sorted(MEASURES))
def test_matches_reference(measure, shape, center):
    fn, ref = MEASURES[measure]
    x, y = shape_pair(shape)
    got = fn(to_torch(x), to_torch(y), center=center)
    assert_scalar64(got)
    assert_close(got, ref(x, y, center=center), what=f"{measure}({shape}, center={center})")


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_matches_hoggorm(shape):
    # hoggorm.RVcoeff / RV2coeff take a list of arrays and return the matrix of pairwise
    # coefficients; they never centre, so center=False compares with raw input and
    # center=True with column-centred input.
    x, y = shape_pair(shape)
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    tx, ty = to_torch(x), to_torch(y)
    assert_close(F.rv(tx, ty, center=False), ho.RVcoeff([x, y])[0, 1], what="rv raw")
    assert_close(F.rv(tx, ty, center=True), ho.RVcoeff([xc, yc])[0, 1], what="rv centred")
    assert_close(F.rv2(tx, ty, center=False), ho.RV2coeff([x, y])[0, 1], what="rv2 raw")
    assert_close(F.rv2(tx, ty, center=True), ho.RV2coeff([xc, yc])[0, 1], what="rv2 centred")


def test_smilde_high_dimensional_bias():
    # Smilde et al. 2009: for independent X, Y with p >> n, XXᵀ is dominated by its diagonal
    # (about p on it, about sqrt(p) off it), so RV ~ p / (p + n - 1) = 0.80 although X and Y
    # share nothing. RV2 drops the diagonal and is near 0; so is debiased CKA. Values for this
    # seed from the reference: RV raw 0.804, centred 0.806; RV2 raw 0.0006, centred 0.075
    # (centring leaves off-diagonal means of about -p/(n-1) on both sides, a small positive
    # bias of about p/(n-1)²); debiased CKA -0.005.
    rng = np.random.default_rng(2009)
    x, y = to_torch(rng.standard_normal((50, 200))), to_torch(rng.standard_normal((50, 200)))
    for center in (False, True):
        assert 0.7 < float(F.rv(x, y, center=center)) < 0.9
        assert abs(float(F.rv2(x, y, center=center))) < 0.1
    assert abs(float(F.linear_cka(x, y, debiased=True))) < 0.1
    assert float(F.linear_cka(x, y)) > 0.7  # the biased estimator shares RV's bias


@pytest.mark.parametrize("measure", sorted(MEASURES))
def test_symmetric(measure):
    fn, _ = MEASURES[measure]
    x, y = map(to_torch, correlated_pair(np.random.default_rng(5), 30, 7, 4))
    for center in (True, False):
        assert float(fn(x, y, center=center)) == pytest.approx(float(fn(y, x, center=center)), abs=1e-12)


@HYPOTHESIS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(6, 30),
    p=st.integers(1, 12),
    scale=st.floats(0.01, 100.0),
    shift=st.floats(-100.0, 100.0),
)
def test_invariances(seed, n, p, scale, shift):
    rng = np.random.default_rng(seed)
    x, y = correlated_pair(rng, n, p, max(1, p // 2))
    q, _ = np.linalg.qr(rng.standard_normal((p, p)))
    perm = rng.permutation(n)
    tx, ty = to_torch(x), to_torch(y)
    for name, (fn, _) in MEASURES.items():
        # An orthogonal map and isotropic scaling of the same data: exactly 1, centred or not.
        for center in (True, False):
            assert_close(fn(tx, to_torch(scale * x @ q), center=center), 1.0, atol=1e-9, what=name)
        base = float(fn(tx, ty))
        # Translating the neurons changes nothing once columns are centred.
        offset = shift * rng.standard_normal((1, y.shape[1]))
        assert_close(fn(tx, to_torch(y + offset)), base, atol=1e-8, what=f"{name} translation")
        # The same permutation of the examples on both sides changes nothing, centred or not.
        for center in (True, False):
            assert_close(
                fn(tx[perm], ty[perm], center=center), float(fn(tx, ty, center=center)), atol=1e-10, what=f"{name} perm"
            )
