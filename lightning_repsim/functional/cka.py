"""Centered kernel alignment (Kornblith et al. 2019) and its minibatch estimator (Nguyen et al. 2021)."""

from __future__ import annotations

import warnings

import torch

from lightning_repsim.errors import RepSimValueError, RepSimWarning
from lightning_repsim.functional._autograd import gram_terms
from lightning_repsim.functional._engine import cosine, degenerate_layers, hsic_matrices
from lightning_repsim.functional._prepared import prepare_layers
from lightning_repsim.functional._validation import (
    MIN_MEANINGFUL_EXAMPLES,
    TensorLike,
    as_matrix,
    check_examples,
    few_examples_message,
    needs_grad,
    warn_degenerate,
)
from lightning_repsim.functional.gram import hsic
from lightning_repsim.functional.matrix import similarity_matrix
from lightning_repsim.measures import gram_spec


def cka(gram_x: torch.Tensor, gram_y: torch.Tensor, debiased: bool = False) -> torch.Tensor:
    r"""CKA of two Gram matrices over the same n examples.

    .. math:: \mathrm{CKA}(K, L) = \frac{\mathrm{HSIC}(K, L)}{\sqrt{\mathrm{HSIC}(K, K)\,\mathrm{HSIC}(L, L)}}

    with the biased HSIC estimator (Gretton et al. 2005; Grams centred as HKH) or, with
    ``debiased=True``, the unbiased one of Song et al. (2012) (n >= 4).

    Example:
        >>> import torch
        >>> from lightning_repsim.functional import gram_linear
        >>> x = torch.randn(20, 4, dtype=torch.float64)
        >>> round(float(cka(gram_linear(x), gram_linear(3 * x))), 6)
        1.0
    """
    xy, xx, yy = hsic(gram_x, gram_y, debiased), hsic(gram_x, gram_x, debiased), hsic(gram_y, gram_y, debiased)
    if not debiased and gram_x.shape[0] < MIN_MEANINGFUL_EXAMPLES:
        warnings.warn(few_examples_message("CKA", gram_x.shape[0]), RepSimWarning, stacklevel=2)
    if not (float(xx) > 0 and float(yy) > 0):
        warnings.warn(
            f"CKA is NaN: HSIC(K, K) = {float(xx):.3g} and HSIC(L, L) = {float(yy):.3g} must be positive "
            "(a constant representation?).",
            RepSimWarning,
            stacklevel=2,
        )
        return torch.tensor(float("nan"), dtype=torch.float64, device=xy.device)
    return xy / torch.sqrt(xx * yy)


def linear_cka(x: TensorLike, y: TensorLike, debiased: bool = False) -> torch.Tensor:
    r"""Linear CKA of Kornblith et al. (2019).

    Columns are centred; :math:`\mathrm{CKA} = \lVert X_c^\top Y_c\rVert_F^2 /
    (\lVert X_c^\top X_c\rVert_F \lVert Y_c^\top Y_c\rVert_F)`. With ``debiased=True`` the HSIC
    terms use the unbiased estimator of Song et al. (2012) (n >= 4), which removes the upward bias
    of biased CKA when features are many relative to examples. Equals the notebook's
    ``feature_space_linear_cka(x, y, debiased)`` and ``cka(gram_linear(x), gram_linear(y), debiased)``.

    Args:
        x: (n, p) features, rows are examples.
        y: (n, q) features of the same examples.
        debiased: use the unbiased HSIC estimator.

    Returns:
        0-d float64 tensor; NaN with one :class:`RepSimWarning` for a constant side or NaN/Inf input.

    Gradients flow to an input that requires grad, so ``1 - linear_cka(student, teacher)`` is a
    loss term (see the README's "CKA as a loss term").

    Example:
        >>> import torch
        >>> x = torch.randn(100, 10, dtype=torch.float64)
        >>> q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
        >>> round(float(linear_cka(x, 2 * x @ q + 5)), 6)
        1.0
    """
    return similarity_matrix({"x": x}, {"y": y}, "linear_cka", debiased=debiased)[0, 0]


def rbf_cka(x: TensorLike, y: TensorLike, sigma: float = 0.8, debiased: bool = False) -> torch.Tensor:
    r"""CKA with Gaussian kernels (Kornblith et al. 2019).

    Bandwidth² = sigma² × the median of the full n x n squared-distance matrix (zero diagonal
    included, NumPy's median rule), exactly as the notebook's ``gram_rbf(x, threshold=sigma)``;
    see :func:`gram_rbf`. Grams are centred as HKH, or U-centred with ``debiased=True``.

    Example:
        >>> import torch
        >>> x = torch.randn(60, 5, dtype=torch.float64)
        >>> round(float(rbf_cka(x, x + 1.0)), 6)
        1.0
    """
    return similarity_matrix({"x": x}, {"y": y}, "rbf_cka", sigma=sigma, debiased=debiased)[0, 0]


def minibatch_cka(x: TensorLike, y: TensorLike, batch_size: int) -> torch.Tensor:
    r"""Minibatch CKA of Nguyen, Raghu & Kornblith (2021).

    Over consecutive blocks of ``batch_size`` rows, the unbiased HSIC of each block (normalised
    within its block) is summed, then

    .. math:: \mathrm{CKA} = \frac{\sum_b \mathrm{HSIC}_1(K_b, L_b)}
              {\sqrt{\sum_b \mathrm{HSIC}_1(K_b, K_b)\,\sum_b \mathrm{HSIC}_1(L_b, L_b)}}

    A final block of fewer than 4 rows cannot give an unbiased estimate and is dropped with a
    warning. Memory depends on ``batch_size``, not on n.

    Example:
        >>> import torch
        >>> x = torch.randn(512, 16, dtype=torch.float64)
        >>> round(float(minibatch_cka(x, x @ torch.randn(16, 16, dtype=torch.float64), 128)), 2) < 1.0
        True
    """
    x, y = as_matrix(x, "x"), as_matrix(y, "y")
    n = check_examples({"x": x.shape, "y": y.shape}, 4, "minibatch CKA (unbiased HSIC)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 4:
        raise RepSimValueError(
            f"batch_size must be an int >= 4 (the unbiased HSIC needs 4 examples); got {batch_size!r}."
        )
    spec = gram_spec("debiased_cka")
    differentiable = needs_grad(x, y)  # then in plain float64 torch, as similarity_matrix does
    totals = None
    problems: dict[str, str] = {}
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if stop - start < 4:
            warnings.warn(
                f"minibatch_cka dropped the last {stop - start} example(s): a block needs >= 4 for the "
                f"unbiased HSIC (n = {n}, batch_size = {batch_size}).",
                RepSimWarning,
                stacklevel=2,
            )
            break
        scale = spec.hsic_scale(stop - start)
        if differentiable:
            vectors, energy = gram_terms(["x", "y"], [x[start:stop], y[start:stop].to(x.device)], spec, problems)
            products = vectors @ vectors.T * scale
            terms = torch.stack([products[0, 1], products[0, 0], products[1, 1], energy[0] * scale, energy[1] * scale])
        else:
            block_x = prepare_layers(["x"], [x[start:stop]], spec, x.device)
            block_y = prepare_layers(["y"], [y[start:stop].to(x.device)], spec, x.device)
            cross, self_x, self_y, block_problems = hsic_matrices(block_x, block_y, spec, stop - start)
            problems.update(block_problems)
            terms = torch.stack(
                [cross[0, 0], self_x[0], self_y[0], block_x.energy[0] * scale, block_y.energy[0] * scale]
            )
        totals = terms if totals is None else totals + terms
    assert totals is not None  # n >= 4 gives at least one block of 4 rows
    dead_x = degenerate_layers(["x"], totals[1:2], totals[3:4], spec, problems)
    dead_y = degenerate_layers(["y"], totals[2:3], totals[4:5], spec, problems)
    warn_degenerate(problems, "minibatch_cka")
    return cosine(totals[0:1, None], totals[1:2], totals[2:3], dead_x, dead_y)[0, 0]
