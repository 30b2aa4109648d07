"""Independent float64 NumPy references for the similarity measures, written from the papers.

Nothing here is copied from a library: each function transcribes the formula of the paper it
cites, as plainly as possible, with no attention to speed. Rows are examples (n), columns are
neurons (p), as everywhere in lightning_repsim. Inputs are converted to float64 first.

These functions know nothing of the package's degenerate-input policy (NaN plus a warning):
they return whatever the formula gives, and the tests decide what the package must do.
"""

from __future__ import annotations

import numpy as np


def _as64(a) -> np.ndarray:
    """Return ``a`` as a float64 NumPy array (torch tensors included)."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def center_columns(x) -> np.ndarray:
    """Subtract each column's mean over the examples (rows)."""
    x = _as64(x)
    return x - x.mean(axis=0, keepdims=True)


def centering_matrix(n: int) -> np.ndarray:
    """H = I - 11ᵀ/n, the centering matrix (Kornblith et al. 2019, eq. 3)."""
    return np.eye(n) - np.ones((n, n)) / n


# --------------------------------------------------------------------------------------
# Gram matrices
# --------------------------------------------------------------------------------------


def gram_linear(x) -> np.ndarray:
    """Linear kernel K = X Xᵀ between examples (Kornblith et al. 2019, sec. 3)."""
    x = _as64(x)
    return x @ x.T


def squared_distances(x) -> np.ndarray:
    """d²_ij = ||x_i - x_j||², formed from explicit differences (no norm expansion)."""
    x = _as64(x)
    diff = x[:, None, :] - x[None, :, :]
    return np.einsum("ijk,ijk->ij", diff, diff)


def gram_rbf(x, threshold: float = 0.8) -> np.ndarray:
    """RBF kernel exp(-d²/(2 threshold² median(d²))), median over all n² entries (Kornblith et al. 2019)."""
    d2 = squared_distances(x)
    # np.median over the n² entries, zero diagonal included; for an even count it is the mean
    # of the two middle values.
    m = np.median(d2)
    return np.exp(-d2 / (2.0 * threshold**2 * m))


# --------------------------------------------------------------------------------------
# Centering and HSIC
# --------------------------------------------------------------------------------------


def center_gram(k, unbiased: bool = False) -> np.ndarray:
    """Biased H K H, or the U-centering of Székely & Rizzo 2014 / Song et al. 2012 (unbiased=True)."""
    k = _as64(k)
    n = k.shape[0]
    if not unbiased:
        h = centering_matrix(n)
        return h @ k @ h
    kt = k.copy()
    np.fill_diagonal(kt, 0.0)
    row = kt.sum(axis=1)
    col = kt.sum(axis=0)
    total = kt.sum()
    u = kt - row[:, None] / (n - 2) - col[None, :] / (n - 2) + total / ((n - 1) * (n - 2))
    np.fill_diagonal(u, 0.0)
    return u


def hsic_biased(k, l) -> np.ndarray:
    """Biased HSIC tr(K H L H)/(n-1)² (Gretton et al. 2005; Kornblith et al. 2019, eq. 3)."""
    k, l = _as64(k), _as64(l)
    n = k.shape[0]
    h = centering_matrix(n)
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def hsic_unbiased(k, l) -> float:
    """Unbiased HSIC of Song et al. 2012, eq. (5), on the zero-diagonal K̃ and L̃."""
    kt, lt = _as64(k).copy(), _as64(l).copy()
    n = kt.shape[0]
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    term1 = np.trace(kt @ lt)
    term2 = (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return (term1 + term2 - term3) / (n * (n - 3))


def cka(k, l, debiased: bool = False) -> float:
    """CKA = HSIC(K,L)/sqrt(HSIC(K,K) HSIC(L,L)) (Kornblith et al. 2019, eq. 4)."""
    hsic = hsic_unbiased if debiased else hsic_biased
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def linear_cka(x, y, debiased: bool = False) -> float:
    """Linear CKA on Gram matrices X Xᵀ and Y Yᵀ (Kornblith et al. 2019).

    The Grams are formed from uncentred features, as the formula reads; for data whose mean is
    large against its spread (|mean|/std >~ 1e3) use :func:`feature_linear_cka`, which centres first.
    """
    return cka(gram_linear(x), gram_linear(y), debiased=debiased)


def feature_linear_cka(x, y, debiased: bool = False) -> float:
    """Linear CKA in feature space, ||YᵀX||²_F/(||XᵀX||_F ||YᵀY||_F), centred X, Y (Kornblith et al. 2019).

    The debiased form expands Song et al.'s eq. (5) for K = XXᵀ with centred X, where
    1ᵀK̃1 = -||X||²_F, K̃1 = -k (k_i = ||x_i||²) and tr(K̃L̃) = ||YᵀX||²_F - kᵀl, giving
    ||YᵀX||²_F - n/(n-2) kᵀl + ||X||²_F ||Y||²_F/((n-1)(n-2)) up to the factor 1/(n(n-3)).
    """
    x, y = center_columns(x), center_columns(y)
    n = x.shape[0]

    def dot(a, b):
        cross = np.sum((b.T @ a) ** 2)
        if not debiased:
            return cross
        ra, rb = np.sum(a**2, axis=1), np.sum(b**2, axis=1)
        return cross - n / (n - 2) * (ra @ rb) + np.sum(a**2) * np.sum(b**2) / ((n - 1) * (n - 2))

    return dot(x, y) / np.sqrt(dot(x, x) * dot(y, y))


def rbf_cka(x, y, sigma: float = 0.8, debiased: bool = False) -> float:
    """RBF CKA with the median-distance bandwidth (Kornblith et al. 2019, sec. 3)."""
    return cka(gram_rbf(x, sigma), gram_rbf(y, sigma), debiased=debiased)


def minibatch_cka(x, y, batch_size: int) -> float:
    """Minibatch CKA: per-block unbiased HSIC summed over blocks (Nguyen, Raghu & Kornblith 2021, eq. 3)."""
    x, y = _as64(x), _as64(y)
    n = x.shape[0]
    kl = kk = ll = 0.0
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        if xb.shape[0] < 4:  # the unbiased estimator needs n >= 4; a short tail is dropped
            continue
        k, l = gram_linear(xb), gram_linear(yb)
        kl += hsic_unbiased(k, l)
        kk += hsic_unbiased(k, k)
        ll += hsic_unbiased(l, l)
    return kl / np.sqrt(kk * ll)


# --------------------------------------------------------------------------------------
# RV coefficients
# --------------------------------------------------------------------------------------


def rv(x, y, center: bool = True) -> float:
    """RV coefficient tr(KL)/sqrt(tr(KK) tr(LL)), K = XXᵀ (Robert & Escoufier 1976)."""
    if center:
        x, y = center_columns(x), center_columns(y)
    k, l = gram_linear(x), gram_linear(y)
    return np.trace(k @ l) / np.sqrt(np.trace(k @ k) * np.trace(l @ l))


def rv2(x, y, center: bool = True) -> float:
    """Modified RV: RV of XXᵀ - diag(XXᵀ) and YYᵀ - diag(YYᵀ) (Smilde et al. 2009, eq. 5)."""
    if center:
        x, y = center_columns(x), center_columns(y)
    k, l = gram_linear(x), gram_linear(y)
    k0 = k - np.diag(np.diag(k))
    l0 = l - np.diag(np.diag(l))
    return np.sum(k0 * l0) / (np.linalg.norm(k0) * np.linalg.norm(l0))


# --------------------------------------------------------------------------------------
# Canonical correlations, SVCCA, PWCCA
# --------------------------------------------------------------------------------------


def numerical_rank(s: np.ndarray, shape: tuple) -> int:
    """Count of singular values above max(n, p) * eps * s_max (the numpy.linalg.matrix_rank rule)."""
    if s.size == 0 or s[0] == 0.0:
        return 0
    tol = max(shape) * np.finfo(np.float64).eps * s[0]
    return int(np.sum(s > tol))


def orthonormal_basis(x) -> np.ndarray:
    """Orthonormal basis (n, rank) of the centred column space of ``x`` via the SVD."""
    xc = center_columns(x)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    return u[:, : numerical_rank(s, xc.shape)]


def centred_rank(x) -> int:
    """Numerical rank of the column-centred ``x``."""
    return orthonormal_basis(x).shape[1]


def cca_corrs(x, y) -> np.ndarray:
    """Canonical correlations as cosines of principal angles, svd(Qxᵀ Qy) (Björck & Golub 1973)."""
    qx, qy = orthonormal_basis(x), orthonormal_basis(y)
    rho = np.linalg.svd(qx.T @ qy, compute_uv=False)
    return np.clip(rho, 0.0, 1.0)


def cca_corrs_classical(x, y) -> np.ndarray:
    """Canonical correlations² as eigenvalues of Σxx⁻¹ Σxy Σyy⁻¹ Σyx (Hotelling 1936); full rank only."""
    xc, yc = center_columns(x), center_columns(y)
    sxx, syy, sxy = xc.T @ xc, yc.T @ yc, xc.T @ yc
    m = np.linalg.solve(sxx, sxy) @ np.linalg.solve(syy, sxy.T)
    ev = np.sort(np.real(np.linalg.eigvals(m)))[::-1][: min(x.shape[1], y.shape[1])]
    return np.sqrt(np.clip(ev, 0.0, None))


def svcca_dims(x, keep) -> int:
    """Directions SVCCA keeps: smallest k reaching ``keep`` of the variance (float) or min(keep, rank) (int)."""
    xc = center_columns(x)
    s = np.linalg.svd(xc, compute_uv=False)
    rank = numerical_rank(s, xc.shape)
    if isinstance(keep, (int, np.integer)) and not isinstance(keep, bool):
        return min(int(keep), rank)
    energy = np.cumsum(s**2) / np.sum(s**2)
    reached = np.nonzero(energy >= keep)[0]
    k = int(reached[0]) + 1 if reached.size else s.size
    return min(k, rank)


def svcca(x, y, keep=0.99) -> float:
    """SVCCA: mean canonical correlation of the top singular directions (Raghu et al. 2017)."""
    xc, yc = center_columns(x), center_columns(y)
    ux = np.linalg.svd(xc, full_matrices=False)[0][:, : svcca_dims(x, keep)]
    uy = np.linalg.svd(yc, full_matrices=False)[0][:, : svcca_dims(y, keep)]
    # The reduced data U_k S_k are centred and span U_k, so U_k is their orthonormal basis.
    rho = np.clip(np.linalg.svd(ux.T @ uy, compute_uv=False), 0.0, 1.0)
    return float(np.mean(rho))


def pwcca(x, y) -> float:
    """PWCCA: canonical correlations weighted by their share of the smaller-rank side (Morcos et al. 2018)."""
    xc, yc = center_columns(x), center_columns(y)
    qx, qy = orthonormal_basis(x), orthonormal_basis(y)
    a, rho, bt = np.linalg.svd(qx.T @ qy, full_matrices=False)
    rho = np.clip(rho, 0.0, 1.0)
    if qx.shape[1] <= qy.shape[1]:
        h, side = qx @ a, xc  # canonical variates of x, orthonormal n-vectors
    else:
        h, side = qy @ bt.T, yc
    alpha = np.sum(np.abs(h.T @ side), axis=1)
    alpha = alpha / np.sum(alpha)
    return float(np.sum(alpha * rho))
