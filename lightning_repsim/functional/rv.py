"""RV coefficient (Robert & Escoufier 1976) and the modified RV2 (Smilde et al. 2009)."""

from __future__ import annotations

import torch

from lightning_repsim.functional._validation import TensorLike
from lightning_repsim.functional.matrix import similarity_matrix


def rv(x: TensorLike, y: TensorLike, center: bool = True) -> torch.Tensor:
    r"""RV coefficient of Robert & Escoufier (1976).

    .. math:: \mathrm{RV} = \frac{\langle K, L\rangle_F}{\lVert K\rVert_F \lVert L\rVert_F},
              \quad K = XX^\top,\ L = YY^\top

    ``center=True`` column-centres X and Y first (then RV equals linear CKA); ``center=False`` uses
    them as given. hoggorm's ``RVcoeff`` does not centre by itself: ``rv(x, y, center=False)``
    equals hoggorm on the raw input, ``center=True`` equals hoggorm on column-centred input.
    Uncentred RV of unrelated data is far from 0 when p is large relative to n (Smilde et al.
    2009); prefer :func:`rv2` or debiased CKA there.

    Args:
        x: (n, p) features, rows are examples.
        y: (n, q) features of the same examples.
        center: subtract each column's mean first.

    Example:
        >>> import torch
        >>> x = torch.randn(30, 5, dtype=torch.float64)
        >>> round(float(rv(x, -4 * x + 7)), 6)
        1.0
    """
    return similarity_matrix({"x": x}, {"y": y}, "rv", center=center)[0, 0]


def rv2(x: TensorLike, y: TensorLike, center: bool = True) -> torch.Tensor:
    r"""Modified RV coefficient, RV2, of Smilde et al. (2009, Bioinformatics 25(3)).

    .. math:: \mathrm{RV2} = \frac{\langle K_0, L_0\rangle_F}{\lVert K_0\rVert_F \lVert L_0\rVert_F},
              \quad K_0 = XX^\top - \mathrm{diag}(XX^\top)

    Removing the diagonal removes the upward bias RV has when p is large relative to n. ``center``
    column-centres X and Y first (hoggorm's ``RV2coeff`` does not centre: ``center=False`` matches
    it on raw input, ``center=True`` on column-centred input). Computed as
    ``||XᵀY||² - Σᵢ ||xᵢ||² ||yᵢ||²`` in feature space when that is cheaper, and from the Gram
    matrices when p ≫ n, where that subtraction would cancel.

    Centred RV2 of independent data is still biased upward when p is of the order of n², because
    centring couples the off-diagonal entries; debiased CKA (:func:`linear_cka` with
    ``debiased=True``) has no such bias.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(50, 200, generator=g), torch.randn(50, 200, generator=g)
        >>> float(rv(x, y, center=False)) > 0.7, abs(float(rv2(x, y))) < 0.1
        (True, True)
    """
    return similarity_matrix({"x": x}, {"y": y}, "rv2", center=center)[0, 0]
