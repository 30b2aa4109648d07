"""CKA: Gram matrices, centring, HSIC, linear / debiased / RBF CKA (Kornblith et al. 2019) and
minibatch CKA (Nguyen, Raghu & Kornblith 2021)."""

import numpy as np
import pytest
import torch
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

# ---------------------------------------------------------------------------------------------
# Gram matrices, centring, HSIC
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_gram_linear(shape):
    x, _ = shape_pair(shape)
    got = F.gram_linear(to_torch(x))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), R.gram_linear(x), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("sigma", [0.8, 0.3, 2.0])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_gram_rbf(shape, sigma):
    x, _ = shape_pair(shape)
    got = F.gram_rbf(to_torch(x), sigma=sigma)
    np.testing.assert_allclose(got.numpy(), R.gram_rbf(x, sigma), rtol=0, atol=1e-10)


def test_rbf_median_of_even_count_is_numpy_median():
    # Four points on a line: the n² = 16 squared distances are four zeros and 1, 4, 9, 16, 36,
    # 49 twice each. NumPy's median is (4 + 9) / 2 = 6.5; torch.median returns the lower middle
    # value, 4. The bandwidth must follow NumPy (Kornblith et al.'s notebook), zero diagonal
    # included in the n² entries.
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    d2 = torch.from_numpy(R.squared_distances(x))
    assert float(torch.median(d2.flatten())) == 4.0
    assert float(np.median(d2.numpy())) == 6.5
    sigma = 0.8
    with_torch_median = torch.exp(-d2 / (2 * sigma**2 * 4.0))
    got = F.gram_rbf(to_torch(x), sigma=sigma)
    np.testing.assert_allclose(got.numpy(), R.gram_rbf(x, sigma), rtol=0, atol=1e-12)
    assert float((got - with_torch_median).abs().max()) > 0.1

    y = np.array([[0.0], [2.0], [3.0], [4.0]])  # squared distances 4, 9, 16, 1, 4, 1 twice
    expected = R.rbf_cka(x, y, sigma)
    lower = R.cka(with_torch_median.numpy(), np.exp(-R.squared_distances(y) / (2 * sigma**2 * 4.0)))
    assert abs(expected - lower) > 1e-3  # the two median rules give different CKA here
    assert_close(F.rbf_cka(to_torch(x), to_torch(y), sigma=sigma), expected, what="rbf_cka median rule")


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_center_gram(shape, unbiased):
    x, _ = shape_pair(shape)
    k = R.gram_linear(x)
    got = F.center_gram(to_torch(k), unbiased=unbiased)
    expected = R.center_gram(k, unbiased=unbiased)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-9 * np.abs(k).max())


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_hsic(shape, kernel, unbiased):
    x, y = shape_pair(shape)
    gram = R.gram_linear if kernel == "linear" else R.gram_rbf
    k, l = gram(x), gram(y)
    expected = R.hsic_unbiased(k, l) if unbiased else R.hsic_biased(k, l)
    got = F.hsic(to_torch(k), to_torch(l), unbiased=unbiased)
    assert_scalar64(got)
    assert float(got) == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cka_on_grams(shape, kernel, debiased):
    x, y = shape_pair(shape)
    gram = R.gram_linear if kernel == "linear" else R.gram_rbf
    k, l = gram(x), gram(y)
    got = F.cka(to_torch(k), to_torch(l), debiased=debiased)
    assert_scalar64(got)
    assert_close(got, R.cka(k, l, debiased=debiased), what=f"cka({shape}, {kernel}, debiased={debiased})")


# ---------------------------------------------------------------------------------------------
# Linear, debiased and RBF CKA on features
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_linear_cka_matches_reference(shape, debiased):
    x, y = shape_pair(shape)
    got = F.linear_cka(to_torch(x), to_torch(y), debiased=debiased)
    assert_scalar64(got)
    assert_close(got, R.linear_cka(x, y, debiased=debiased), what=f"linear_cka({shape}, debiased={debiased})")


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_linear_cka_notebook_identities(shape, debiased):
    # Kornblith et al.'s notebook: CKA on Gram matrices equals the feature-space formula.
    x, y = shape_pair(shape)
    tx, ty = to_torch(x), to_torch(y)
    on_features = F.linear_cka(tx, ty, debiased=debiased)
    on_grams = F.cka(F.gram_linear(tx), F.gram_linear(ty), debiased=debiased)
    assert_close(on_features, float(on_grams), what="features vs grams")
    assert_close(on_features, R.feature_linear_cka(x, y, debiased=debiased), what="feature-space reference")


@pytest.mark.parametrize("n", [4, 5, 6])
def test_unbiased_estimators_at_smallest_n(n):
    # n = 4 is the smallest sample the unbiased HSIC (divided by n(n-3)) accepts.
    x, y = correlated_pair(np.random.default_rng(n), n, 3, 2, noise=0.5)
    tx, ty = to_torch(x), to_torch(y)
    k, l = R.gram_linear(x), R.gram_linear(y)
    assert float(F.hsic(to_torch(k), to_torch(l), unbiased=True)) == pytest.approx(R.hsic_unbiased(k, l), rel=1e-10)
    np.testing.assert_allclose(F.center_gram(to_torch(k), unbiased=True).numpy(), R.center_gram(k, True), atol=1e-12)
    assert_close(F.linear_cka(tx, ty, debiased=True), R.linear_cka(x, y, debiased=True))
    assert_close(F.rbf_cka(tx, ty, debiased=True), R.rbf_cka(x, y, debiased=True))
    assert_close(F.minibatch_cka(tx, ty, batch_size=n), R.minibatch_cka(x, y, n))


@pytest.mark.parametrize("sigma", [0.8, 0.5])
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_rbf_cka_matches_reference(shape, debiased, sigma):
    x, y = shape_pair(shape)
    got = F.rbf_cka(to_torch(x), to_torch(y), sigma=sigma, debiased=debiased)
    assert_scalar64(got)
    expected = R.rbf_cka(x, y, sigma=sigma, debiased=debiased)
    assert_close(got, expected, what=f"rbf_cka({shape}, sigma={sigma}, debiased={debiased})")


def test_rbf_cka_default_sigma_is_0_8():
    x, y = shape_pair("n>p")
    assert_close(F.rbf_cka(to_torch(x), to_torch(y)), R.rbf_cka(x, y, sigma=0.8))


# ---------------------------------------------------------------------------------------------
# Minibatch CKA
# ---------------------------------------------------------------------------------------------


# Dropping a short tail may come with a RepSimWarning; what is checked here is the value.
DROPPED_TAIL_OK = pytest.mark.filterwarnings("ignore::lightning_repsim.errors.RepSimWarning")


@DROPPED_TAIL_OK
@pytest.mark.parametrize("batch_size", [4, 5, 7, 8, 16, 1000])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_minibatch_cka_matches_reference(shape, batch_size):
    # n is 12, 20, 40 or 60: these batch sizes give tails of 0 to 4 rows; a tail of fewer
    # than 4 rows is dropped, a tail of 4 or more counts.
    x, y = shape_pair(shape)
    got = F.minibatch_cka(to_torch(x), to_torch(y), batch_size=batch_size)
    assert_scalar64(got)
    assert_close(got, R.minibatch_cka(x, y, batch_size), what=f"minibatch_cka({shape}, {batch_size})")


@DROPPED_TAIL_OK
def test_minibatch_cka_tail_rule():
    x, y = correlated_pair(np.random.default_rng(3), 30, 6, 4)
    tx, ty = to_torch(x), to_torch(y)
    # 30 = 14 + 14 + 2: the 2-row tail is dropped.
    assert_close(F.minibatch_cka(tx, ty, batch_size=14), R.minibatch_cka(x[:28], y[:28], 14))
    # 30 = 13 + 13 + 4: the 4-row tail counts, so dropping it changes the value.
    got = F.minibatch_cka(tx, ty, batch_size=13)
    assert_close(got, R.minibatch_cka(x, y, 13))
    assert abs(float(got) - R.minibatch_cka(x[:26], y[:26], 13)) > 1e-6
    # One block holding every example: debiased linear CKA.
    assert_close(F.minibatch_cka(tx, ty, batch_size=30), float(F.linear_cka(tx, ty, debiased=True)))


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

SYMMETRIC = {
    "linear_cka": lambda x, y: F.linear_cka(x, y),
    "debiased_cka": lambda x, y: F.linear_cka(x, y, debiased=True),
    "rbf_cka": lambda x, y: F.rbf_cka(x, y),
    "debiased_rbf_cka": lambda x, y: F.rbf_cka(x, y, debiased=True),
    "minibatch_cka": lambda x, y: F.minibatch_cka(x, y, batch_size=8),
}


@pytest.mark.parametrize("measure", sorted(SYMMETRIC))
def test_symmetric(measure):
    x, y = map(to_torch, correlated_pair(np.random.default_rng(6), 30, 7, 4))
    fn = SYMMETRIC[measure]
    assert float(fn(x, y)) == pytest.approx(float(fn(y, x)), abs=1e-12)


@DROPPED_TAIL_OK
@HYPOTHESIS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(8, 32),
    p=st.integers(1, 10),
    scale=st.floats(0.01, 100.0),
    shift=st.floats(-100.0, 100.0),
)
def test_invariances(seed, n, p, scale, shift):
    rng = np.random.default_rng(seed)
    x, y = correlated_pair(rng, n, p, max(1, p // 2))
    q, _ = np.linalg.qr(rng.standard_normal((p, p)))
    tx, ty = to_torch(x), to_torch(y)
    for name, fn in SYMMETRIC.items():
        base = float(fn(tx, ty))
        # x against an orthogonal map of x, isotropically scaled: CKA is exactly 1.
        assert_close(fn(tx, to_torch(scale * x @ q)), 1.0, atol=1e-9, what=f"{name} orthogonal")
        # Translation: every CKA centres (biased: H K H; unbiased: U-centring; RBF: distances).
        offset = shift * rng.standard_normal((1, y.shape[1]))
        assert_close(fn(tx, to_torch(y + offset)), base, atol=1e-8, what=f"{name} translation")
    # The same permutation of the examples on both sides: unchanged. Minibatch CKA depends on
    # which examples share a block, so it gets a permutation within blocks and of whole blocks.
    perm = rng.permutation(n)
    for name, fn in SYMMETRIC.items():
        if name == "minibatch_cka":
            continue
        assert_close(fn(tx[perm], ty[perm]), float(fn(tx, ty)), atol=1e-10, what=f"{name} permutation")
    m = (n // 8) * 8
    blocks = rng.permutation(n // 8)
    block_perm = np.concatenate([8 * b + rng.permutation(8) for b in blocks] + [np.arange(m, n)])
    fn = SYMMETRIC["minibatch_cka"]
    assert_close(fn(tx[block_perm], ty[block_perm]), float(fn(tx, ty)), atol=1e-10, what="minibatch permutation")


def test_linear_cka_below_one_for_anisotropic_invertible_map():
    # An invertible but non-orthogonal map keeps the column space (CCA-based measures give 1)
    # but not the Gram matrix, so linear CKA falls below 1.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((60, 5))
    a = np.linalg.qr(rng.standard_normal((5, 5)))[0] @ np.diag([1.0, 2.0, 4.0, 8.0, 16.0])
    y = x @ a
    got = F.linear_cka(to_torch(x), to_torch(y))
    expected = R.linear_cka(x, y)
    assert expected < 0.9
    assert_close(got, expected)
