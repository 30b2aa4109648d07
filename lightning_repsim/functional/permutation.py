"""Permutation tests for representational similarity: the chance level of a measure, and a p-value.

Rows are examples. Under "the rows of y are unrelated to the rows of x", permuting the rows of y
leaves the distribution of any similarity unchanged, so the similarities of permuted copies are
draws from its null distribution for these very shapes: their mean is the measure's chance level
(far from 0 for biased CKA and RV when features are many relative to examples), and the share at
or above the observed value is a p-value. Every measure is supported, the CCA family included; the
Gram-based ones permute the rows and columns of y's Gram (or, in feature space, the rows of y)
without recomputing anything of x.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from lightning_repsim.errors import RepSimValueError
from lightning_repsim.functional._engine import Representations, degenerate_layers, transformed_gram
from lightning_repsim.functional._jackknife import BLOCK_ENTRIES
from lightning_repsim.functional._prepared import PreparedLayers
from lightning_repsim.functional._validation import TensorLike, as_matrix, check_examples, warn_degenerate
from lightning_repsim.functional.intervals import _check_seed
from lightning_repsim.measures import CCA_MEASURES, GramSpec, gram_spec, resolve_options

__all__ = ["PermutationTest", "permutation_test"]


@dataclass(frozen=True)
class PermutationTest:
    """A one-sided permutation test of "the rows of y are unrelated to the rows of x".

    Attributes:
        value: the observed similarity (what :func:`similarity_matrix` returns).
        p_value: ``(k + 1) / (n_permutations + 1)`` with k the number of permutations whose similarity
            is at least ``value``; never 0, and uniform on its grid when x and y are independent.
        null_mean: the mean similarity over the permutations: the chance level of the measure for
            these shapes (far from 0 for biased CKA and RV when features are many relative to examples).
        n_permutations: the number of permutations drawn.
        measure: the measure.
        n: the number of examples.
    """

    value: float
    p_value: float
    null_mean: float
    n_permutations: int
    measure: str
    n: int


def _check_permutations(n_permutations: object) -> int:
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, numbers.Integral) or n_permutations < 1:
        raise RepSimValueError(
            f"n_permutations must be an int >= 1 (999 or more for a p-value near 0.001); got {n_permutations!r}."
        )
    return int(n_permutations)


# --------------------------------------------------------------------------------------------------
# Permutation test
# --------------------------------------------------------------------------------------------------


def _permutations(n: int, count: int, seed: int | None, device: torch.device) -> torch.Tensor:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return torch.argsort(torch.rand(count, n, generator=generator), dim=1).to(device)


def _gram_null(
    x: PreparedLayers, y: PreparedLayers, spec: GramSpec, perms: torch.Tensor, problems: dict[str, str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(observed inner product, permuted ones, self_x, self_y) of the transformed Grams. Every transform
    commutes with permuting the examples, so ``T(L)`` permuted is ``P T(L) Pᵀ``."""
    gram_x, problem_x = transformed_gram(x, 0, spec)
    gram_y, problem_y = transformed_gram(y, 0, spec)
    for name, problem in ((x.names[0], problem_x), (y.names[0], problem_y)):
        if problem:
            problems.setdefault(name, problem)
    n = gram_x.shape[0]
    observed = (gram_x * gram_y).sum()
    null = torch.empty(perms.shape[0], dtype=torch.float64, device=gram_x.device)
    block = max(1, BLOCK_ENTRIES // (n * n))
    for start in range(0, perms.shape[0], block):
        idx = perms[start : start + block]
        permuted = gram_y[idx[:, :, None], idx[:, None, :]]
        null[start : start + block] = (permuted * gram_x).sum((1, 2))
    return observed, null, gram_x.square().sum(), gram_y.square().sum()


def _feature_null(
    x: PreparedLayers, y: PreparedLayers, spec: GramSpec, perms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same for linear kernels from the features: ``||Xᵀ P Y||²`` and the diagonal corrections of
    the engine's feature route, with y's rows and their squared norms permuted."""
    fx, fy = x.feature(0).to(torch.float64), y.feature(0).to(torch.float64)
    norms_x, norms_y = x.row_norms[0], y.row_norms[0]
    n = fx.shape[0]

    def transformed(squared_cross: torch.Tensor, diagonal: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
        if spec.transform == "zero_diag":
            return squared_cross - diagonal
        if spec.transform == "unbiased":
            return squared_cross - n / (n - 2) * diagonal + sums / ((n - 1) * (n - 2))
        return squared_cross

    def inner(a: torch.Tensor, b: torch.Tensor, na: torch.Tensor, nb: torch.Tensor) -> torch.Tensor:
        return transformed((a.T @ b).square().sum(), na @ nb, na.sum() * nb.sum())

    observed = inner(fx, fy, norms_x, norms_y)
    null = torch.empty(perms.shape[0], dtype=torch.float64, device=fx.device)
    block = max(1, BLOCK_ENTRIES // (n * max(fx.shape[1], fy.shape[1])))
    sums = norms_x.sum() * norms_y.sum()
    for start in range(0, perms.shape[0], block):
        idx = perms[start : start + block]
        products = torch.matmul(fx.T, fy[idx]).square().sum((1, 2))
        null[start : start + block] = transformed(products, norms_y[idx] @ norms_x, sums)
    return observed, null, inner(fx, fx, norms_x, norms_x), inner(fy, fy, norms_y, norms_y)


def _cca_null(
    x: torch.Tensor, y: torch.Tensor, measure: str, options: dict[str, object], perms: torch.Tensor
) -> tuple[float, torch.Tensor, dict[str, str]]:
    """SVCCA / PWCCA of x with y's rows permuted, from each side's SVD taken once: permuting y's rows
    permutes its orthonormal basis' rows, so each permutation costs one small (kx x ky) SVD."""
    from lightning_repsim.functional.cca import _basis, _validate_keep, cca_matrix

    n = x.shape[0]
    value, problems = cca_matrix(["x"], [x], (["y"], [y]), n, measure, **options)
    null = torch.full((perms.shape[0],), float("nan"), dtype=torch.float64, device=x.device)
    if problems:
        return float(value[0, 0]), null, problems
    keep = _validate_keep(options["keep"]) if measure == "svcca" else None
    bx, by = _basis(x, keep), _basis(y.to(x.device), keep)
    kx, ky = bx.basis.shape[1], by.basis.shape[1]
    weights_x = bx.basis.T @ bx.centred  # (kx, p): the x side's variates against its neurons
    weights_y = by.basis.T @ by.centred  # unchanged by permuting y's rows
    block = max(1, BLOCK_ENTRIES // (n * ky + kx * ky))
    for start in range(0, perms.shape[0], block):
        blocks = bx.basis.T @ by.basis[perms[start : start + block]]  # (b, kx, ky)
        if measure == "svcca":
            null[start : start + block] = torch.linalg.svdvals(blocks).clamp(0.0, 1.0).mean(1)
            continue
        a, rho, vh = torch.linalg.svd(blocks, full_matrices=False)
        rho = rho.clamp(0.0, 1.0)
        if kx <= ky:
            weights = (a.transpose(1, 2) @ weights_x).abs().sum(2)
        else:
            weights = (vh @ weights_y).abs().sum(2)
        null[start : start + block] = (weights * rho).sum(1) / weights.sum(1)
    return float(value[0, 0]), null, problems


def permutation_test(
    x: TensorLike,
    y: TensorLike,
    measure: str = "linear_cka",
    n_permutations: int = 1000,
    seed: int | None = 0,
    **measure_options: object,
) -> PermutationTest:
    r"""Permutation test of "the examples' rows of y are unrelated to those of x" for one similarity.

    The rows of y are permuted ``n_permutations`` times (x is left as it is), which breaks any pairing
    of x's examples with y's while keeping each side's own structure; the measure on each permuted pair
    is its distribution under that null hypothesis. One-sided (larger similarity is evidence against
    it): ``p_value = (k + 1) / (n_permutations + 1)``, k the permuted values at least the observed one
    (with a relative tolerance of 1e-12 for rounding), so it is never 0 and is exact for
    exchangeable (i.i.d.) examples. ``null_mean`` is the measure's chance level for these shapes.

    Every transform of the Gram-based measures commutes with permuting examples, so each side's
    transformed Gram (or, for linear kernels with p q < n, its features) is formed once and only the
    cross term is recomputed per permutation; SVCCA and PWCCA take each side's SVD once.

    Args:
        x: (n, p) features, rows are examples.
        y: (n, q) features of the same examples.
        measure: any of :data:`~lightning_repsim.functional.MEASURES`.
        n_permutations: how many permutations (>= 1); the smallest attainable p-value is
            1 / (n_permutations + 1).
        seed: seed of the permutations (an int >= 0), or None for fresh randomness.
        **measure_options: the measure's options (``debiased``, ``sigma``, ``center``, ``keep``).

    Returns:
        :class:`PermutationTest`; NaN value, p-value and null mean with one :class:`RepSimWarning` for
        a degenerate side.

    Raises:
        RepSimValueError: ``n_permutations`` < 1 or not an int, a bad seed, an unknown measure or option,
            or inputs :func:`similarity_matrix` rejects.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(100, 30, dtype=torch.float64, generator=g)
        >>> unrelated = torch.randn(100, 30, dtype=torch.float64, generator=g)
        >>> t = permutation_test(x, unrelated, "linear_cka", n_permutations=199)
        >>> round(t.null_mean, 1), t.p_value > 0.05  # chance level of biased CKA at p = 30, n = 100
        (0.2, True)
        >>> permutation_test(x, x[:, :10], n_permutations=199).p_value  # the smallest possible
        0.005
    """
    options = resolve_options(measure, measure_options)
    count = _check_permutations(n_permutations)
    seed = _check_seed(seed)
    x, y = as_matrix(x, "x").detach(), as_matrix(y, "y").detach()  # a test of significance, not a loss
    if x.device != y.device:
        raise RepSimValueError(
            f"x and y must be on one device; got {x.device} and {y.device}. Move them with .to(device) first."
        )
    device = x.device
    if measure in CCA_MEASURES:
        n = check_examples({"x": x.shape, "y": y.shape}, 2, measure)
        perms = _permutations(n, count, seed, device)
        value, null, problems = _cca_null(x, y, measure, options, perms)
        label = measure
        observed, compared = torch.tensor(value, dtype=torch.float64), null
        norm = torch.tensor(1.0, dtype=torch.float64)
    else:
        spec = gram_spec(measure, **options)
        n = check_examples({"x": x.shape, "y": y.shape}, spec.min_examples, spec.measure.replace("_", " "))
        perms = _permutations(n, count, seed, device)
        problems = {}
        px = Representations({"x": x}, max_cache_bytes=0).prepared(spec, device)
        py = Representations({"y": y}, max_cache_bytes=0).prepared(spec, device)
        if spec.kernel == "linear" and x.shape[1] * y.shape[1] < n:
            observed, compared, self_x, self_y = _feature_null(px, py, spec, perms)
        else:
            observed, compared, self_x, self_y = _gram_null(px, py, spec, perms, problems)
        for prepared in (px, py):
            problems.update((k, v) for k, v in prepared.problems.items() if k not in problems)
        scale = spec.hsic_scale(n)
        dead = [
            bool(
                degenerate_layers(
                    p.names,
                    s.reshape(1) * scale,
                    (torch.full_like(p.energy, float(n * n)) if spec.kernel == "rbf" else p.energy) * scale,
                    spec,
                    problems,
                )[0]
            )
            for p, s in ((px, self_x), (py, self_y))
        ]
        norm = torch.sqrt(self_x.clamp_min(0) * self_y.clamp_min(0))
        if any(dead):
            observed = observed * float("nan")
        label = spec.measure
    warn_degenerate(problems, label)
    observed = observed.to(torch.float64).cpu()
    compared = compared.to(torch.float64).cpu()
    norm = norm.to(torch.float64).cpu()
    value = float(observed / norm)
    if not math.isfinite(value):
        return PermutationTest(float("nan"), float("nan"), float("nan"), count, label, n)
    tolerance = 1e-12 * float(norm) * max(1.0, abs(value))
    exceed = int((compared >= observed - tolerance).sum())
    return PermutationTest(value, (exceed + 1) / (count + 1), float((compared / norm).mean()), count, label, n)
