"""Canonical correlations, SVCCA (Raghu et al. 2017) and PWCCA (Morcos, Raghu & Bengio 2018)."""

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
    assert_nan_with_one_warning,
    assert_scalar64,
    correlated_pair,
    shape_pair,
    to_torch,
)

KEEPS = [0.99, 0.5, 3, 100]


def cca_is_degenerate(dims_x: int, dims_y: int, n: int) -> bool:
    """The package's rule: CCA on dims_x + dims_y >= n - 1 centred directions is over-fitted."""
    return dims_x + dims_y >= n - 1


# ---------------------------------------------------------------------------------------------
# Against the reference, on every shape
# ---------------------------------------------------------------------------------------------


DETERMINED_SHAPES = ["n>p", "rank_deficient", "constant_columns"]  # n<p, p>>n: NaN tests below


@pytest.mark.parametrize("shape", DETERMINED_SHAPES)
def test_canonical_correlations(shape):
    x, y = shape_pair(shape)
    assert not cca_is_degenerate(R.centred_rank(x), R.centred_rank(y), x.shape[0])
    got = F.canonical_correlations(to_torch(x), to_torch(y))
    expected = R.cca_corrs(x, y)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("rank", [3, 12])
def test_wide_rank_deficient_layer(rank):
    """p > n takes the QR-then-SVD path: its rank and basis must match the reference's full SVD."""
    rng = np.random.default_rng(rank)
    latent = rng.standard_normal((60, rank))
    x = latent @ rng.standard_normal((rank, 500)) + 7.0  # wide, rank `rank` after centring
    y = np.tanh(latent[:, :2] @ rng.standard_normal((2, 4))) + 0.1 * rng.standard_normal((60, 4))
    assert R.centred_rank(x) == rank
    got = F.canonical_correlations(to_torch(x), to_torch(y))
    assert got.shape == (min(rank, 4),)
    np.testing.assert_allclose(got.numpy(), R.cca_corrs(x, y), rtol=0, atol=1e-10)
    assert_close(F.svcca(to_torch(x), to_torch(y), keep=2), R.svcca(x, y, keep=2), what="svcca wide")
    assert_close(F.pwcca(to_torch(x), to_torch(y)), R.pwcca(x, y), what="pwcca wide first")


@pytest.mark.parametrize("seed", range(3))
def test_canonical_correlations_classical_formula(seed):
    # Well-conditioned, full rank, n >> p: Hotelling's eigenproblem Σxx⁻¹ Σxy Σyy⁻¹ Σyx.
    x, y = correlated_pair(np.random.default_rng(seed), 400, 6, 4)
    got = F.canonical_correlations(to_torch(x), to_torch(y))
    np.testing.assert_allclose(got.numpy(), R.cca_corrs_classical(x, y), rtol=0, atol=1e-10)


@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_svcca_matches_reference(shape, keep):
    x, y = shape_pair(shape)
    n = x.shape[0]
    tx, ty = to_torch(x), to_torch(y)
    if cca_is_degenerate(R.svcca_dims(x, keep), R.svcca_dims(y, keep), n):
        assert_nan_with_one_warning(F.svcca, tx, ty, keep=keep)
        return
    got = F.svcca(tx, ty, keep=keep)
    assert_scalar64(got)
    assert_close(got, R.svcca(x, y, keep=keep), what=f"svcca({shape}, keep={keep})")


def test_svcca_shapes_cover_finite_cases():
    # Guard for the test above: p >> n and n < p still give finite SVCCA with a small int keep.
    for shape in ("n<p", "p>>n"):
        x, y = shape_pair(shape)
        assert not cca_is_degenerate(R.svcca_dims(x, 3), R.svcca_dims(y, 3), x.shape[0])


def test_svcca_default_keep_is_0_99():
    x, y = shape_pair("n>p")
    assert_close(F.svcca(to_torch(x), to_torch(y)), R.svcca(x, y, keep=0.99))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_pwcca_matches_reference(shape):
    x, y = shape_pair(shape)
    n = x.shape[0]
    tx, ty = to_torch(x), to_torch(y)
    for a, b, ta, tb in ((x, y, tx, ty), (y, x, ty, tx)):
        if cca_is_degenerate(R.centred_rank(a), R.centred_rank(b), n):
            assert_nan_with_one_warning(F.pwcca, ta, tb)
            continue
        got = F.pwcca(ta, tb)
        assert_scalar64(got)
        assert_close(got, R.pwcca(a, b), what=f"pwcca({shape})")


# ---------------------------------------------------------------------------------------------
# Degenerate CCA
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, finite", [(10, False), (11, False), (12, True)])
def test_rank_rule_boundary(n, finite):
    # Ranks 5 + 5 = 10 against n - 1: NaN for n <= 11, a number for n = 12.
    x, y = correlated_pair(np.random.default_rng(8), n, 5, 5)
    tx, ty = to_torch(x), to_torch(y)
    for fn, ref, kwargs in ((F.pwcca, R.pwcca, {}), (F.svcca, R.svcca, {"keep": 5})):
        if finite:
            assert_close(fn(tx, ty, **kwargs), ref(x, y, **kwargs), what=fn.__name__)
        else:
            assert_nan_with_one_warning(fn, tx, ty, **kwargs)


def test_rank_rule_counts_centred_rank():
    # Constant columns add nothing after centring: ranks 3 + 3 < 19 - 1 although p + q = 16.
    rng = np.random.default_rng(9)
    x, y = correlated_pair(rng, 19, 3, 3)
    x = np.hstack([x, np.ones((19, 5))])
    y = np.hstack([y, np.full((19, 5), 2.0)])
    got = F.pwcca(to_torch(x), to_torch(y))
    assert_close(got, R.pwcca(x, y))


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


def test_svcca_symmetric():
    x, y = map(to_torch, correlated_pair(np.random.default_rng(10), 60, 7, 4))
    for keep in KEEPS:
        assert float(F.svcca(x, y, keep=keep)) == pytest.approx(float(F.svcca(y, x, keep=keep)), abs=1e-12)


def test_pwcca_asymmetric_when_ranks_tie():
    # With equal ranks PWCCA weights the canonical correlations by x's neurons (the first
    # argument), so swapping the arguments swaps the weights and, in general, the value.
    # With unequal ranks both orders weight by the smaller-rank side and agree.
    x, y = correlated_pair(np.random.default_rng(4), 80, 5, 5)
    tx, ty = to_torch(x), to_torch(y)
    xy, yx = float(F.pwcca(tx, ty)), float(F.pwcca(ty, tx))
    assert_close(xy, R.pwcca(x, y))
    assert_close(yx, R.pwcca(y, x))
    assert abs(xy - yx) > 1e-3, (xy, yx)
    x, y = correlated_pair(np.random.default_rng(4), 80, 8, 5)
    tx, ty = to_torch(x), to_torch(y)
    assert float(F.pwcca(tx, ty)) == pytest.approx(float(F.pwcca(ty, tx)), abs=1e-12)


def _invertible(rng, p):
    """A random invertible map with singular values between 0.5 and 4."""
    u = np.linalg.qr(rng.standard_normal((p, p)))[0]
    v = np.linalg.qr(rng.standard_normal((p, p)))[0]
    return u @ np.diag(rng.uniform(0.5, 4.0, size=p)) @ v


@HYPOTHESIS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(16, 40),
    p=st.integers(1, 6),
    scale=st.floats(0.01, 100.0),
    shift=st.floats(-100.0, 100.0),
)
def test_invariances(seed, n, p, scale, shift):
    # n >= 16 and p, q <= 6 keep every CCA here determined (rank x + rank y <= 12 < n - 1).
    rng = np.random.default_rng(seed)
    x, y = correlated_pair(rng, n, p, max(1, p // 2))
    tx, ty = to_torch(x), to_torch(y)
    q, _ = np.linalg.qr(rng.standard_normal((p, p)))
    measures = {
        "svcca": lambda a, b: F.svcca(a, b),
        "svcca_int": lambda a, b: F.svcca(a, b, keep=2),
        "pwcca": F.pwcca,
        "pwcca_yx": lambda a, b: F.pwcca(b, a),
    }
    perm = rng.permutation(n)
    offset = shift * rng.standard_normal((1, y.shape[1]))
    for name, fn in measures.items():
        # x against an orthogonal map of x, isotropically scaled: 1.
        assert_close(fn(tx, to_torch(scale * x @ q)), 1.0, atol=1e-9, what=f"{name} orthogonal")
        base = float(fn(tx, ty))
        # Translation: both sides are centred.
        assert_close(fn(tx, to_torch(y + offset)), base, atol=1e-8, what=f"{name} translation")
        # The same permutation of the examples on both sides.
        assert_close(fn(tx[perm], ty[perm]), base, atol=1e-9, what=f"{name} permutation")
    # Any invertible linear map keeps the column space: with every direction kept, 1.
    y_lin = to_torch(x @ _invertible(rng, p))
    assert_close(F.svcca(tx, y_lin, keep=p), 1.0, atol=1e-9, what="svcca invertible")
    assert_close(F.pwcca(tx, y_lin), 1.0, atol=1e-9, what="pwcca invertible")
    assert_close(F.pwcca(y_lin, tx), 1.0, atol=1e-9, what="pwcca invertible, swapped")


def test_invertible_map_cca_one_linear_cka_not():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((60, 5))
    y = x @ (np.linalg.qr(rng.standard_normal((5, 5)))[0] @ np.diag([1.0, 2.0, 4.0, 8.0, 16.0]))
    tx, ty = to_torch(x), to_torch(y)
    assert_close(F.svcca(tx, ty, keep=5), 1.0, atol=1e-9)
    assert_close(F.pwcca(tx, ty), 1.0, atol=1e-9)
    assert float(F.linear_cka(tx, ty)) < 0.9
