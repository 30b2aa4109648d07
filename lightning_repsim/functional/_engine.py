"""The Gram engine: every pair of layers at once, for all Gram-based measures (private).

Linear CKA, debiased CKA, RBF CKA, RV and RV2 are all the cosine similarity of two transformed
Gram matrices, ``<T(K), T(L)>_F / (||T(K)||_F ||T(L)||_F)``:

============  ====================  ===========================================
measure       features              T (the Gram transform)
============  ====================  ===========================================
linear_cka    column-centred        none (K = Xc Xcᵀ is already centred)
debiased_cka  column-centred        U-centring (unbiased HSIC, Song et al. 2012)
rbf_cka       as given              H K H, or U-centring when ``debiased``
rv            centred if ``center``  none
rv2           centred if ``center``  diagonal removed (Smilde et al. 2009)
============  ====================  ===========================================

So each layer is turned into its statistics once and all pairs follow from one or a few GEMMs.
Two equivalent routes, picked by flop count: the n x n Grams (``V Vᵀ`` over flattened transformed
Grams), or, when features are narrower than the probe, feature space, where
``<Xc Xcᵀ, Yc Ycᵀ> = ||Xcᵀ Yc||²`` and the diagonal corrections need only the rows' squared norms.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lightning_repsim.errors import RepSimValueError
from lightning_repsim.functional._prepared import (
    GramBudget,
    GramScratch,
    PreparedLayers,
    host_route,
    prepare_layers,
    quiet,
    squared_cross_norms,
)
from lightning_repsim.functional._validation import (
    Layers,
    gemm_dtype,
    is_negligible,
    named_layers,
    no_autocast,
    product_nt,
    self_product,
)
from lightning_repsim.functional.gram import center_gram, numpy_median, rbf_from_distances
from lightning_repsim.measures import GramSpec

#: Default budget of :class:`Representations` for cached n x n Grams (256 MiB: 128 layers at n = 512).
DEFAULT_CACHE_BYTES = 256 << 20


class Representations:
    r"""The layers of one network on one probe, with what the measures derive from them kept for reuse.

    :func:`similarity_matrix` accepts it wherever it accepts a list or dict of layers. Every call on
    the same object then shares the prepared (centred) features, their feature-space norms
    and the untransformed n x n Grams (linear CKA, debiased CKA, RV and RV2 with centring all start
    from the same centred Gram; RBF CKA from the same distances). Use it when one set of layers meets
    several measures, or is a fixed reference compared again and again.

    Args:
        layers: a list of (n, p_i) tensors or a dict name -> tensor, rows are examples.
        max_cache_bytes: memory for the cached n x n float64 Grams; layers past it are recomputed
            on every call (``0`` caches no Gram, only the prepared features).
        name: how unnamed layers are labelled in messages (``name[i]``).

    Example:
        >>> import torch
        >>> from lightning_repsim.functional import Representations, similarity_matrix
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(64, 300, generator=g)
        >>> reference = Representations({"a": x, "b": torch.tanh(x)})
        >>> current = Representations({"a": x + 0.1 * torch.randn(64, 300, generator=g)})
        >>> cka = similarity_matrix(current, reference, "linear_cka")
        >>> rv2 = similarity_matrix(current, reference, "rv2")  # reuses both sides' Grams
        >>> tuple(cka.shape), bool(cka[0, 0] > 0.9)
        ((1, 2), True)
    """

    def __init__(self, layers: Layers, max_cache_bytes: int = DEFAULT_CACHE_BYTES, name: str = "layers") -> None:
        self.names, self.matrices = named_layers(layers, name)
        self.max_cache_bytes = int(max_cache_bytes)
        self._budget = GramBudget(self.max_cache_bytes)
        self._prepared: dict[tuple[bool, torch.device, torch.dtype], PreparedLayers] = {}

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"Representations({len(self)} layers, n={self.matrices[0].shape[0]})"

    def prepared(
        self, spec: GramSpec, device: torch.device, product_dtype: torch.dtype | str | None = None
    ) -> PreparedLayers:
        """The layers prepared for ``spec`` (centred or not) on ``device`` with products in
        ``product_dtype`` (see :func:`similarity_matrix`), computed on first use."""
        device = torch.device(device)
        key = (spec.center_features, device, gemm_dtype(device, product_dtype))
        if key not in self._prepared:
            prepared = prepare_layers(self.names, self.matrices, spec, device, key[2])
            prepared.budget = self._budget
            self._prepared[key] = prepared
        return self._prepared[key]


def _apply_transform(
    cross: torch.Tensor, rows_x: torch.Tensor, rows_y: torch.Tensor, n: int, transform: str, outer: bool
) -> torch.Tensor:
    """Feature-space form of ``<T(K), T(L)>`` given ``||Xᵀ Y||²`` and the rows' squared norms."""
    if transform in ("none", "center"):
        return cross
    if outer:
        diagonal_products = rows_x @ rows_y.T
        sums = torch.outer(rows_x.sum(1), rows_y.sum(1))
    else:
        diagonal_products = (rows_x * rows_y).sum(1)
        sums = rows_x.sum(1) * rows_y.sum(1)
    if transform == "zero_diag":
        return cross - diagonal_products
    # Unbiased HSIC of centred features (Kornblith et al. 2019, notebook), times n(n-3).
    return cross - n / (n - 2) * diagonal_products + sums / ((n - 1) * (n - 2))


def transformed_gram(layers: PreparedLayers, i: int, spec: GramSpec) -> tuple[torch.Tensor, str | None]:
    """Layer i's transformed n x n Gram in float64, and a reason if it is degenerate."""
    gram, cached = layers.gram(i, spec.kernel)
    if spec.kernel == "rbf":
        if float(numpy_median(gram)) <= 0:
            return torch.zeros_like(gram), "its examples are (nearly all) identical: the RBF median distance is 0"
        gram = rbf_from_distances(gram, spec.sigma)
        cached = False
    if spec.transform == "center":
        gram = center_gram(gram)
    elif spec.transform == "unbiased":
        gram = center_gram(gram, unbiased=True)
    elif spec.transform == "zero_diag":
        gram = gram.clone() if cached else gram
        gram.fill_diagonal_(0.0)
    return gram, None


def _feature_space_is_cheaper(n: int, widths_x: list[int], widths_y: list[int], symmetric: bool) -> bool:
    features = n * sum(widths_x) * sum(widths_y) / (2 if symmetric else 1)
    grams = n * n * (sum(widths_x) + (0 if symmetric else sum(widths_y)) + len(widths_x) * len(widths_y))
    return features <= grams


def hsic_matrices(
    x: PreparedLayers, y: PreparedLayers | None, spec: GramSpec, n: int, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, str]]:
    """HSIC-scale inner products for all pairs: ``(cross (Lx, Ly), self_x (Lx,), self_y (Ly,), problems)``.

    ``y=None`` means y is x. The scale is the estimator's own (1/(n-1)² biased, 1/(n(n-3)) unbiased,
    1 for RV/RV2), so sums over probe batches of different sizes stay meaningful.
    """
    symmetric = y is None
    y = x if y is None else y
    problems: dict[str, str] = {}  # RBF's degenerate layers; NaN/Inf inputs are in x.problems, y.problems
    if method == "auto":
        method = (
            "gram"
            if spec.kernel == "rbf"
            else ("features" if _feature_space_is_cheaper(n, x.widths, y.widths, symmetric) else "gram")
        )
    if method == "features":
        if spec.kernel == "rbf":
            raise RepSimValueError("rbf_cka has no feature-space form; use method='gram' or 'auto'.")
        cross = squared_cross_norms(x.features, y.features, symmetric)
        cross = _apply_transform(cross, x.row_norms, y.row_norms, n, spec.transform, outer=True)
        if symmetric:
            self_x = self_y = cross.diagonal().clone()
        else:
            self_x = _self_terms(x, spec, n)
            self_y = _self_terms(y, spec, n)
    elif method == "gram" and host_route(x.device):
        cross, self_x, self_y = _gram_route_cpu(x, None if symmetric else y, spec, n, problems)
    elif method == "gram":
        vectors_x = _gram_vectors(x, spec, problems)
        vectors_y = vectors_x if symmetric else _gram_vectors(y, spec, problems)
        cross = self_product(vectors_x) if symmetric else vectors_x @ vectors_y.T
        self_x = vectors_x.square().sum(1)
        self_y = self_x if symmetric else vectors_y.square().sum(1)
    else:
        raise RepSimValueError(f"method must be 'auto', 'features' or 'gram'; got {method!r}.")
    scale = spec.hsic_scale(n)
    found = {**x.problems, **y.problems}
    found.update((name, why) for name, why in problems.items() if name not in found)
    return cross * scale, self_x * scale, self_y * scale, found


def _self_terms(layers: PreparedLayers, spec: GramSpec, n: int) -> torch.Tensor:
    return _apply_transform(layers.self_cross(), layers.row_norms, layers.row_norms, n, spec.transform, outer=False)


def _gram_vectors(layers: PreparedLayers, spec: GramSpec, problems: dict[str, str]) -> torch.Tensor:
    """Each layer's transformed Gram, flattened into one row of a preallocated (L, n²) matrix."""
    n = layers.n
    rows = torch.empty(len(layers.names), n * n, dtype=torch.float64, device=layers.device)
    for i, name in enumerate(layers.names):
        gram, problem = transformed_gram(layers, i, spec)
        if problem and name not in problems:
            problems[name] = problem
        rows[i] = gram.reshape(-1)
        del gram
    return rows


def _gram_route_cpu(
    x: PreparedLayers, y: PreparedLayers | None, spec: GramSpec, n: int, problems: dict[str, str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Gram route on CPU, all in NumPy (SYRK for every Gram and for the L x L product).

    For linear kernels nothing n x n is centred: the diagonal of each Gram is zeroed in place and the
    U-centring enters through Song et al.'s eq. (5),
    ``<U(K), U(L)> = <K~, L~> + (1'K~1)(1'L~1)/((n-1)(n-2)) - 2/(n-2) (K~1)'(L~1)``,
    an identity for any symmetric K and L, so only the row sums of each zero-diagonal Gram are needed.
    """
    with quiet():
        return _gram_route_cpu_inner(x, y, spec, n, problems)


def _gram_route_cpu_inner(
    x: PreparedLayers, y: PreparedLayers | None, spec: GramSpec, n: int, problems: dict[str, str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vectors_x, sums_x, self_x = _gram_rows_cpu(x, spec, problems, want_self=y is not None)
    if y is None:
        cross = self_product(torch.from_numpy(vectors_x)).numpy()
        sums_y = sums_x
    else:
        vectors_y, sums_y, self_y = _gram_rows_cpu(y, spec, problems, want_self=True)
        cross = product_nt(vectors_x, vectors_y)
        del vectors_y
    del vectors_x
    if sums_x is not None:
        assert sums_y is not None  # the same spec gives both sides row sums
        total_x, total_y = sums_x.sum(1), sums_y.sum(1)
        cross += np.outer(total_x, total_y) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (sums_x @ sums_y.T)
        if y is not None:
            self_x += total_x**2 / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * np.einsum("ij,ij->i", sums_x, sums_x)
            self_y += total_y**2 / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * np.einsum("ij,ij->i", sums_y, sums_y)
    if y is None:
        self_x = self_y = cross.diagonal().copy()
    return torch.from_numpy(cross), torch.from_numpy(self_x), torch.from_numpy(self_y)


def _gram_rows_cpu(
    layers: PreparedLayers, spec: GramSpec, problems: dict[str, str], want_self: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(L, n²) float64 rows, each a layer's Gram written in place by SYRK (diagonal zeroed for RV2 and
    debiased CKA), transformed in full for RBF; (L, n) row sums of the zero-diagonal linear Grams when
    the transform is the U-centring (else None); each row's squared norm when ``want_self``."""
    n = layers.n
    count = len(layers.names)
    rows = np.empty((count, n * n))
    scratch = GramScratch.for_layers(layers) if spec.kernel == "linear" else None
    linear = spec.kernel == "linear"
    sums = np.empty((count, n)) if linear and spec.transform == "unbiased" else None
    squares = np.empty(count) if want_self else None
    for i, name in enumerate(layers.names):
        gram = rows[i].reshape(n, n)
        if linear:
            layers.gram(i, "linear", out=torch.from_numpy(gram), scratch=scratch)
            if spec.transform in ("zero_diag", "unbiased"):
                np.fill_diagonal(gram, 0.0)
            if sums is not None:
                np.sum(gram, axis=1, out=sums[i])
            # "none" (and "center", which linear kernels never use): the centred Gram as it is.
        else:
            transformed, problem = transformed_gram(layers, i, spec)
            if problem and name not in problems:
                problems[name] = problem
            gram[...] = transformed.numpy()
            del transformed
        if squares is not None:
            squares[i] = np.einsum("i,i->", rows[i], rows[i])  # not BLAS ddot, which wakes its pool
    return rows, sums, squares


def degenerate_layers(
    names: list[str], self_terms: torch.Tensor, scales: torch.Tensor, spec: GramSpec, problems: dict[str, str]
) -> torch.Tensor:
    """Mask of layers whose self-similarity is zero (or, for unbiased estimates, not positive)."""
    mask = torch.zeros(len(names), dtype=torch.bool)
    for i, name in enumerate(names):
        value, scale = float(self_terms[i].detach()), float(scales[i].detach())
        if name in problems:
            mask[i] = True
        elif not (math.isfinite(value) and math.isfinite(scale)):
            problems[name] = "its magnitude overflows float64 (entries beyond ~1e75); rescale it"
            mask[i] = True
        elif spec.transform == "unbiased" and value <= 0 and not is_negligible(abs(value), scale):
            problems[name] = "its debiased self-similarity estimate is not positive (too few examples?)"
            mask[i] = True
        elif is_negligible(value, scale):
            problems[name] = (
                "it has zero variance (a constant or dead layer)"
                if spec.center_features or spec.kernel == "rbf"
                else "its Gram matrix is zero"
            )
            mask[i] = True
    return mask


def cosine(
    cross: torch.Tensor, self_x: torch.Tensor, self_y: torch.Tensor, dead_x: torch.Tensor, dead_y: torch.Tensor
) -> torch.Tensor:
    """``cross / sqrt(self_x self_y)`` with NaN rows and columns for degenerate layers."""
    denominator = torch.sqrt(torch.outer(self_x.clamp_min(0), self_y.clamp_min(0)))
    result = cross / denominator
    result[dead_x.to(result.device)] = float("nan")
    result[:, dead_y.to(result.device)] = float("nan")
    return result


def gram_similarity(
    reps_x: Representations,
    reps_y: Representations | None,
    spec: GramSpec,
    n: int,
    device: torch.device,
    method: str = "auto",
    product_dtype: torch.dtype | str | None = None,
) -> tuple[torch.Tensor, dict[str, str]]:
    """All pairs of a Gram-based measure: ``(matrix (Lx, Ly) float64, degenerate layers -> why)``.

    ``reps_y=None`` compares ``reps_x`` with itself (one triangle). Degenerate layers give NaN rows
    and columns; the caller decides whether to warn.
    """
    prepared_x = reps_x.prepared(spec, device, product_dtype)
    prepared_y = None if reps_y is None else reps_y.prepared(spec, device, product_dtype)
    with no_autocast(device):  # the products in the dtype chosen, not a surrounding step's bf16
        cross, self_x, self_y, problems = hsic_matrices(prepared_x, prepared_y, spec, n, method)
    scale = spec.hsic_scale(n)
    dead_x = degenerate_layers(prepared_x.names, self_x, _energy_scale(prepared_x, spec, n) * scale, spec, problems)
    dead_y = (
        dead_x
        if prepared_y is None
        else degenerate_layers(prepared_y.names, self_y, _energy_scale(prepared_y, spec, n) * scale, spec, problems)
    )
    return cosine(cross, self_x, self_y, dead_x, dead_y), problems


def _energy_scale(layers: PreparedLayers, spec: GramSpec, n: int) -> torch.Tensor:
    if spec.kernel == "rbf":
        return torch.full_like(layers.energy, float(n * n))  # kernel entries lie in [0, 1]
    return layers.energy
