"""Gram matrices, their centring, and HSIC estimators on them.

Rows are examples: a Gram matrix is n x n with ``K[i, j] = k(x_i, x_j)``.
"""

from __future__ import annotations

import warnings

import torch

from lightning_repsim.errors import RepSimValueError, RepSimWarning
from lightning_repsim.functional._validation import TensorLike, as_matrix, gemm_dtype, self_product


def gram_linear(x: TensorLike) -> torch.Tensor:
    r"""Linear-kernel Gram matrix of the examples, :math:`K = X X^\top` (X as given, not centred).

    Args:
        x: features, shape (n, p), rows are examples.

    Returns:
        float64 tensor (n, n) on ``x``'s device.

    Example:
        >>> import torch
        >>> gram_linear(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        tensor([[1., 1.],
                [1., 2.]], dtype=torch.float64)
    """
    x = as_matrix(x, "x")
    return self_product(x.to(gemm_dtype(x.device))).to(torch.float64)


def squared_distances(x: torch.Tensor, product_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pairwise squared Euclidean distances between rows, float64, exact zeros on the diagonal; the
    products in ``product_dtype`` (default: the device's, see ``gemm_dtype``)."""
    x = x.to(torch.float64)
    centred = x - x.mean(0, keepdim=True)  # distances are translation invariant; centring avoids cancellation
    dot = self_product(centred.to(gemm_dtype(x.device, product_dtype))).to(torch.float64)
    norms = dot.diagonal()
    distances = (norms[:, None] + norms[None, :] - 2.0 * dot).clamp_min_(0.0)
    distances.fill_diagonal_(0.0)
    return distances


def numpy_median(values: torch.Tensor) -> torch.Tensor:
    """Median with NumPy's rule: the mean of the two middle values when the count is even.

    ``torch.median`` returns the lower middle value instead, which changes the RBF bandwidth.
    """
    flat = values.reshape(-1)
    count = flat.numel()
    upper = flat.kthvalue(count // 2 + 1).values
    if count % 2:
        return upper
    return (flat.kthvalue(count // 2).values + upper) / 2


def rbf_from_distances(distances: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian kernel exp(-d² / (2 sigma² median(d²))), the median over all n² entries."""
    median = numpy_median(distances)
    return torch.exp(-distances / (2.0 * sigma**2 * median))


def gram_rbf(x: TensorLike, sigma: float = 0.8) -> torch.Tensor:
    r"""RBF-kernel Gram matrix with the median heuristic of Kornblith et al. (2019).

    .. math:: K_{ij} = \exp\left(-\frac{\lVert x_i - x_j\rVert^2}{2\sigma^2 m}\right)

    where :math:`m` is the median of the full n x n matrix of squared distances, its zero diagonal
    included, taken with NumPy's rule (mean of the two middle values for an even count). This is
    the notebook's ``gram_rbf(x, threshold=sigma)``.

    Args:
        x: features, shape (n, p), rows are examples.
        sigma: bandwidth as a fraction of the median distance.

    Example:
        >>> import torch
        >>> K = gram_rbf(torch.tensor([[0.0], [1.0], [3.0]]), sigma=1.0)
        >>> K.diagonal().tolist()
        [1.0, 1.0, 1.0]
    """
    if not sigma > 0:
        raise RepSimValueError(f"sigma must be positive; got sigma = {sigma}.")
    distances = squared_distances(as_matrix(x, "x"))
    if not float(numpy_median(distances)) > 0:
        warnings.warn(
            "gram_rbf: the median squared distance is 0 (most examples identical), so the bandwidth is 0 "
            "and the kernel is NaN.",
            RepSimWarning,
            stacklevel=2,
        )
    return rbf_from_distances(distances, sigma)


def center_gram(gram: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    r"""Centre a Gram matrix.

    ``unbiased=False``: :math:`HKH` with :math:`H = I - \frac{1}{n}\mathbf{1}\mathbf{1}^\top`, the
    Gram matrix of column-centred features. ``unbiased=True``: the U-centring of Székely & Rizzo
    (2014): the diagonal is zeroed, then
    :math:`\tilde K_{ij} - \frac{r_i + r_j}{n-2} + \frac{\sum r}{(n-1)(n-2)}` off the diagonal
    (:math:`r` the row sums), so that :math:`\langle U(K), U(L)\rangle / (n(n-3))` is the unbiased
    HSIC estimator of Song et al. (2012).

    Example:
        >>> import torch
        >>> K = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> center_gram(K)
        tensor([[ 0.5000, -0.5000],
                [-0.5000,  0.5000]], dtype=torch.float64)
    """
    gram = _square(gram)
    n = gram.shape[0]
    if unbiased:
        if n < 4:
            raise RepSimValueError(f"unbiased centring needs n >= 4 examples; got a {n} x {n} Gram matrix.")
        gram = gram.clone()
        gram.fill_diagonal_(0.0)
        sums = gram.sum(0)
        centred = gram - (sums[:, None] + sums[None, :]) / (n - 2) + sums.sum() / ((n - 1) * (n - 2))
        centred.fill_diagonal_(0.0)
        return centred
    row_means = gram.mean(0)
    return gram - row_means[:, None] - row_means[None, :] + row_means.mean()


def hsic(gram_x: torch.Tensor, gram_y: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    r"""Hilbert-Schmidt independence criterion of two Gram matrices over the same n examples.

    Biased (Gretton et al. 2005): :math:`\mathrm{tr}(KHLH) / (n-1)^2`. Unbiased (Song et al.
    2012, n >= 4), with :math:`\tilde K, \tilde L` the Grams with zeroed diagonals:

    .. math:: \frac{1}{n(n-3)}\left[\mathrm{tr}(\tilde K \tilde L)
              + \frac{\mathbf{1}^\top\tilde K\mathbf{1}\,\mathbf{1}^\top\tilde L\mathbf{1}}{(n-1)(n-2)}
              - \frac{2}{n-2}\mathbf{1}^\top\tilde K\tilde L\mathbf{1}\right]

    Example:
        >>> import torch
        >>> x = torch.randn(10, 3, dtype=torch.float64)
        >>> K = gram_linear(x)
        >>> bool(hsic(K, K) > 0)
        True
    """
    gram_x, gram_y = _square(gram_x), _square(gram_y)
    if gram_x.shape != gram_y.shape:
        raise RepSimValueError(
            "Gram matrices must describe the same examples; got shapes "
            f"{tuple(gram_x.shape)} and {tuple(gram_y.shape)}."
        )
    n = gram_x.shape[0]
    if unbiased:
        return (center_gram(gram_x, True) * center_gram(gram_y, True)).sum() / (n * (n - 3))
    return (center_gram(gram_x) * center_gram(gram_y)).sum() / (n - 1) ** 2


def _square(gram: torch.Tensor) -> torch.Tensor:
    if not isinstance(gram, torch.Tensor) or gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        shape = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
        raise RepSimValueError(f"expected a square n x n Gram matrix; got {shape}. Build one with gram_linear(x).")
    if gram.shape[0] < 2:
        raise RepSimValueError(f"a Gram matrix needs at least 2 examples; got {tuple(gram.shape)}.")
    return gram.to(torch.float64)
