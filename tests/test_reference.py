"""The float64 references checked against each other and against hoggorm, before they judge the package."""

import hoggorm as ho
import numpy as np
import pytest

from tests import reference as R
from tests.helpers import SHAPES, correlated_pair, shape_pair


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_rv_matches_hoggorm(shape):
    # hoggorm's RVcoeff / RV2coeff take a list of arrays, return the matrix of pairwise
    # coefficients and do not centre: so raw input = center=False, centred input = center=True.
    x, y = shape_pair(shape)
    xc, yc = R.center_columns(x), R.center_columns(y)
    assert R.rv(x, y, center=False) == pytest.approx(ho.RVcoeff([x, y])[0, 1], abs=1e-12)
    assert R.rv(x, y, center=True) == pytest.approx(ho.RVcoeff([xc, yc])[0, 1], abs=1e-12)
    assert R.rv2(x, y, center=False) == pytest.approx(ho.RV2coeff([x, y])[0, 1], abs=1e-12)
    assert R.rv2(x, y, center=True) == pytest.approx(ho.RV2coeff([xc, yc])[0, 1], abs=1e-12)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_hsic_estimators_match_centred_gram_inner_products(shape):
    # Biased: tr(KHLH) = <HKH, HLH>_F. Unbiased: Song et al.'s eq. (5) equals the U-centred
    # inner product divided by n(n-3) (Székely & Rizzo 2014, Prop. 1).
    x, y = shape_pair(shape)
    k, l = R.gram_linear(x), R.gram_linear(y)
    n = k.shape[0]
    ub = np.sum(R.center_gram(k) * R.center_gram(l)) / (n - 1) ** 2
    uu = np.sum(R.center_gram(k, unbiased=True) * R.center_gram(l, unbiased=True)) / (n * (n - 3))
    assert R.hsic_biased(k, l) == pytest.approx(ub, rel=1e-10)
    assert R.hsic_unbiased(k, l) == pytest.approx(uu, rel=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_linear_cka_gram_and_feature_space_agree(shape, debiased):
    x, y = shape_pair(shape)
    assert R.linear_cka(x, y, debiased) == pytest.approx(R.feature_linear_cka(x, y, debiased), abs=1e-12)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_biased_linear_cka_is_centred_rv(shape):
    # With H K H = (HX)(HX)ᵀ, biased linear CKA and the centred RV coefficient coincide.
    x, y = shape_pair(shape)
    assert R.linear_cka(x, y) == pytest.approx(R.rv(x, y, center=True), abs=1e-12)


def test_u_centering_kills_symmetric_offsets():
    # K_ij + a_i + a_j + c (what translating the features does to a linear Gram) has the same
    # U-centring; this is why the unbiased HSIC, and minibatch CKA, ignore translations.
    rng = np.random.default_rng(1)
    k = R.gram_linear(rng.standard_normal((9, 4)))
    a = rng.standard_normal(9)
    shifted = k + a[:, None] + a[None, :] + 3.0
    np.testing.assert_allclose(R.center_gram(shifted, True), R.center_gram(k, True), atol=1e-12)
    np.testing.assert_allclose(R.center_gram(k, True).sum(axis=0), 0.0, atol=1e-12)


def test_rbf_median_is_numpy_median_of_all_entries():
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    # 16 entries: four zeros and the pairs 1, 4, 9, 16, 36, 49 twice; middle two 4 and 9.
    assert np.median(R.squared_distances(x)) == 6.5
    np.testing.assert_allclose(R.gram_rbf(x, 1.0), np.exp(-R.squared_distances(x) / 13.0))


def test_minibatch_with_one_block_is_debiased_cka():
    x, y = correlated_pair(np.random.default_rng(2), 30, 6, 4)
    assert R.minibatch_cka(x, y, 30) == pytest.approx(R.linear_cka(x, y, debiased=True), abs=1e-12)
    assert R.minibatch_cka(x, y, 100) == pytest.approx(R.linear_cka(x, y, debiased=True), abs=1e-12)
    # 30 = 13 + 13 + 4: the tail of 4 counts; 30 = 14 + 14 + 2: the tail of 2 is dropped.
    assert R.minibatch_cka(x, y, 14) == pytest.approx(R.minibatch_cka(x[:28], y[:28], 14), abs=1e-15)
    assert R.minibatch_cka(x, y, 13) != pytest.approx(R.minibatch_cka(x[:26], y[:26], 13), abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_cca_principal_angles_match_classical_eigenproblem(seed):
    x, y = correlated_pair(np.random.default_rng(seed), 500, 6, 4)
    np.testing.assert_allclose(R.cca_corrs(x, y), R.cca_corrs_classical(x, y), atol=1e-10)


def test_cca_counts_min_rank_correlations():
    x, y = shape_pair("rank_deficient")
    assert R.centred_rank(x) == 3 and R.centred_rank(y) == 3
    assert R.cca_corrs(x, y).shape == (3,)
    x, y = shape_pair("constant_columns")
    assert R.centred_rank(x) == 6 and R.centred_rank(y) == 5
    assert R.cca_corrs(x, y).shape == (5,)


def test_svcca_dims():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((100, 5)) * np.array([10.0, 5.0, 1.0, 0.1, 0.01])
    assert R.svcca_dims(x, 0.5) == 1
    assert R.svcca_dims(x, 0.99) == 2  # (100 + 25) / 126.01 of the variance
    assert R.svcca_dims(x, 0.999) == 3
    assert R.svcca_dims(x, 2) == 2
    assert R.svcca_dims(x, 50) == 5
    # SVCCA keeping every direction is the mean of all canonical correlations.
    _, y = correlated_pair(rng, 100, 5, 3)
    assert R.svcca(x, y, keep=5) == pytest.approx(np.mean(R.cca_corrs(x, y)), abs=1e-12)


def test_pwcca_uses_smaller_rank_side_and_is_asymmetric_on_ties():
    x, y = correlated_pair(np.random.default_rng(4), 80, 8, 5)
    assert R.pwcca(x, y) == pytest.approx(R.pwcca(y, x), abs=1e-12)  # both weight by y
    x, y = correlated_pair(np.random.default_rng(4), 80, 5, 5)
    assert abs(R.pwcca(x, y) - R.pwcca(y, x)) > 1e-3
    # Equal weights would give the plain mean; PWCCA lies within the correlations' range.
    rho = R.cca_corrs(x, y)
    assert rho.min() <= R.pwcca(x, y) <= rho.max()
