"""Every pair of layers at once: the engine behind all Gram-based measures.

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
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import torch

from lightning_repsim.errors import RepSimValueError
from lightning_repsim.functional import cca as _cca
from lightning_repsim.functional._validation import (
    Layers,
    check_examples,
    exact_float32,
    self_product,
    finite_or_zero,
    gemm_dtype,
    is_negligible,
    named_layers,
    warn_degenerate,
)
from lightning_repsim.functional.gram import center_gram, rbf_from_distances, squared_distances, numpy_median

GRAM_MEASURES = ("linear_cka", "debiased_cka", "rbf_cka", "rv", "rv2")
MEASURES = GRAM_MEASURES + _cca.CCA_MEASURES

#: Options each measure accepts, with their defaults.
MEASURE_OPTIONS: dict[str, dict[str, object]] = {
    "linear_cka": {"debiased": False},
    "debiased_cka": {},
    "rbf_cka": {"sigma": 0.8, "debiased": False},
    "rv": {"center": True},
    "rv2": {"center": True},
    "svcca": {"keep": 0.99},
    "pwcca": {},
}


@dataclass(frozen=True)
class GramSpec:
    """How one Gram-based measure turns features into a transformed Gram matrix."""

    measure: str
    kernel: str  # "linear" | "rbf"
    center_features: bool
    transform: str  # "none" | "center" | "unbiased" | "zero_diag"
    sigma: float = 0.8

    @property
    def min_examples(self) -> int:
        return 4 if self.transform == "unbiased" else 2

    def hsic_scale(self, n: int) -> float:
        """Factor turning our inner products into the HSIC estimator's own normalisation."""
        if self.transform == "unbiased":
            return 1.0 / (n * (n - 3))
        if self.transform == "center" or (self.kernel == "linear" and self.center_features):
            return 1.0 / (n - 1) ** 2
        return 1.0


def resolve_options(measure: str, options: Mapping[str, object]) -> dict[str, object]:
    """Validate a measure name and its options; return the options with defaults filled in."""
    if measure not in MEASURE_OPTIONS:
        raise RepSimValueError(f"unknown measure {measure!r}; choose one of {', '.join(MEASURES)}.")
    allowed = MEASURE_OPTIONS[measure]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) if allowed else "no options"
        raise RepSimValueError(f"{measure} takes {takes}; got unexpected option(s) {', '.join(unknown)}.")
    return {**allowed, **options}


def gram_spec(measure: str, **options: object) -> GramSpec:
    """The :class:`GramSpec` of a Gram-based measure (``linear_cka`` with ``debiased=True`` included)."""
    opts = resolve_options(measure, options)
    if measure == "linear_cka":
        return GramSpec("debiased_cka" if opts["debiased"] else "linear_cka", "linear", True,
                        "unbiased" if opts["debiased"] else "none")
    if measure == "debiased_cka":
        return GramSpec(measure, "linear", True, "unbiased")
    if measure == "rbf_cka":
        sigma = float(opts["sigma"])  # type: ignore[arg-type]
        if not sigma > 0:
            raise RepSimValueError(f"rbf_cka needs sigma > 0; got sigma = {sigma}.")
        # Distances ignore translation, so centring first only removes cancellation.
        return GramSpec(measure, "rbf", True, "unbiased" if opts["debiased"] else "center", sigma)
    if measure in ("rv", "rv2"):
        return GramSpec(measure, "linear", bool(opts["center"]), "zero_diag" if measure == "rv2" else "none")
    raise RepSimValueError(f"{measure} is not a Gram-based measure; use similarity_matrix for it.")


@dataclass
class GramBudget:
    """Bytes of untransformed Grams that may still be cached (shared by a Representations' variants)."""

    bytes_left: int = 0


@dataclass
class PreparedLayers:
    """Per-layer statistics, computed once and shared by every pair."""

    names: list[str]
    features: list[torch.Tensor]  # (n, p_i) in the GEMM dtype, centred when the spec says so
    row_norms: torch.Tensor  # (L, n) float64 squared norms of those rows
    energy: torch.Tensor  # (L,) float64 (||X||_F²)² of the raw input, the scale for "is it zero?"
    problems: dict[str, str]
    budget: GramBudget = field(default_factory=GramBudget)  # Grams kept for later calls, within this
    _grams: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    _self_cross: Optional[torch.Tensor] = None

    def gram(self, i: int, kernel: str) -> tuple[torch.Tensor, bool]:
        """Layer i's untransformed n x n float64 Gram (squared distances for ``rbf``), and whether it is
        cached (then the caller must not modify it in place)."""
        cached = self._grams.get((kernel, i))
        if cached is not None:
            return cached, True
        feature = self.features[i]
        gram = squared_distances(feature) if kernel == "rbf" else self_product(feature).to(torch.float64)
        size = gram.numel() * gram.element_size()
        if size <= self.budget.bytes_left:
            self._grams[(kernel, i)] = gram
            self.budget.bytes_left -= size
            return gram, True
        return gram, False

    def self_cross(self) -> torch.Tensor:
        """``||X_iᵀ X_i||_F²`` for every layer (feature space), computed once."""
        if self._self_cross is None:
            self._self_cross = torch.stack([_squared_cross_norms([f], [f], True)[0, 0] for f in self.features])
        return self._self_cross


def prepare_layers(names: list[str], mats: list[torch.Tensor], spec: GramSpec, device: torch.device) -> PreparedLayers:
    dtype = gemm_dtype(device)
    features, norms, energy, problems = [], [], [], {}
    for name, mat in zip(names, mats):
        x, bad = finite_or_zero(mat.to(device=device, dtype=torch.float64))
        if bad:
            problems[name] = "it contains NaN or Inf"
        energy.append(torch.linalg.vector_norm(x) ** 4)
        if spec.center_features:
            x = x - x.mean(0, keepdim=True)
        norms.append(torch.linalg.vector_norm(x, dim=1) ** 2)
        features.append(x.to(dtype))
    return PreparedLayers(names, features, torch.stack(norms), torch.stack(energy), problems)


#: Default budget of :class:`Representations` for cached n x n Grams (256 MiB: 128 layers at n = 512).
DEFAULT_CACHE_BYTES = 256 << 20


class Representations:
    r"""The layers of one network on one probe, with what the measures derive from them kept for reuse.

    :func:`similarity_matrix` accepts it wherever it accepts a list or dict of layers. Every call on
    the same object then shares the float64 copies, the centred features, their feature-space norms
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
        self._prepared: dict[tuple[bool, torch.device], PreparedLayers] = {}

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"Representations({len(self)} layers, n={self.matrices[0].shape[0]})"

    def prepared(self, spec: GramSpec, device: torch.device) -> PreparedLayers:
        """The layers prepared for ``spec`` (centred or not) on ``device``, computed on first use."""
        key = (spec.center_features, torch.device(device))
        if key not in self._prepared:
            prepared = prepare_layers(self.names, self.matrices, spec, device)
            prepared.budget = self._budget
            self._prepared[key] = prepared
        return self._prepared[key]


def _squared_cross_norms(xs: list[torch.Tensor], ys: list[torch.Tensor], symmetric: bool) -> torch.Tensor:
    """``out[i, j] = ||xs[i]ᵀ ys[j]||_F²`` from one GEMM per x-layer against all y-layers.

    With ``symmetric`` (ys is xs) only the upper triangle is multiplied and mirrored.
    """
    device = xs[0].device
    stacked_y = torch.cat(ys, dim=1)
    sizes = torch.tensor([y.shape[1] for y in ys], device=device)
    owner = torch.repeat_interleave(torch.arange(len(ys), device=device), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    out = torch.zeros(len(xs), len(ys), dtype=torch.float64, device=device)
    with exact_float32():
        for i, x in enumerate(xs):
            first = int(starts[i]) if symmetric else 0
            column_sums = (x.T @ stacked_y[:, first:]).to(torch.float64).square().sum(0)
            out[i].index_add_(0, owner[first:], column_sums)
    if symmetric:
        out = out.triu() + out.triu(1).T
    return out


def _apply_transform(cross: torch.Tensor, rows_x: torch.Tensor, rows_y: torch.Tensor, n: int, transform: str,
                     outer: bool) -> torch.Tensor:
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


def transformed_gram(layers: PreparedLayers, i: int, spec: GramSpec) -> tuple[torch.Tensor, Optional[str]]:
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
    x: PreparedLayers, y: Optional[PreparedLayers], spec: GramSpec, n: int, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, str]]:
    """HSIC-scale inner products for all pairs: ``(cross (Lx, Ly), self_x (Lx,), self_y (Ly,), problems)``.

    ``y=None`` means y is x. The scale is the estimator's own (1/(n-1)² biased, 1/(n(n-3)) unbiased,
    1 for RV/RV2), so sums over probe batches of different sizes stay meaningful.
    """
    symmetric = y is None
    y = x if y is None else y
    problems = {**x.problems, **y.problems}
    if method == "auto":
        method = "gram" if spec.kernel == "rbf" else (
            "features" if _feature_space_is_cheaper(
                n, [f.shape[1] for f in x.features], [f.shape[1] for f in y.features], symmetric) else "gram")
    if method == "features":
        if spec.kernel == "rbf":
            raise RepSimValueError("rbf_cka has no feature-space form; use method='gram' or 'auto'.")
        cross = _squared_cross_norms(x.features, y.features, symmetric)
        cross = _apply_transform(cross, x.row_norms, y.row_norms, n, spec.transform, outer=True)
        if symmetric:
            self_x = self_y = cross.diagonal().clone()
        else:
            self_x = _self_terms(x, spec, n)
            self_y = _self_terms(y, spec, n)
    elif method == "gram":
        vectors_x = _gram_vectors(x, spec, problems)
        vectors_y = vectors_x if symmetric else _gram_vectors(y, spec, problems)
        cross = self_product(vectors_x) if symmetric else vectors_x @ vectors_y.T
        self_x = vectors_x.square().sum(1)
        self_y = self_x if symmetric else vectors_y.square().sum(1)
    else:
        raise RepSimValueError(f"method must be 'auto', 'features' or 'gram'; got {method!r}.")
    scale = spec.hsic_scale(n)
    return cross * scale, self_x * scale, self_y * scale, problems


def _self_terms(layers: PreparedLayers, spec: GramSpec, n: int) -> torch.Tensor:
    return _apply_transform(layers.self_cross(), layers.row_norms, layers.row_norms, n, spec.transform, outer=False)


def _gram_vectors(layers: PreparedLayers, spec: GramSpec, problems: dict[str, str]) -> torch.Tensor:
    """Each layer's transformed Gram, flattened into one row of a preallocated (L, n²) matrix."""
    n = layers.row_norms.shape[1]
    rows = torch.empty(len(layers.names), n * n, dtype=torch.float64, device=layers.row_norms.device)
    for i, name in enumerate(layers.names):
        gram, problem = transformed_gram(layers, i, spec)
        if problem and name not in problems:
            problems[name] = problem
        rows[i] = gram.reshape(-1)
        del gram
    return rows


def degenerate_layers(names: list[str], self_terms: torch.Tensor, scales: torch.Tensor, spec: GramSpec,
                      problems: dict[str, str]) -> torch.Tensor:
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
            problems[name] = ("it has zero variance (a constant or dead layer)" if spec.center_features
                              or spec.kernel == "rbf" else "its Gram matrix is zero")
            mask[i] = True
    return mask


def cosine(cross: torch.Tensor, self_x: torch.Tensor, self_y: torch.Tensor, dead_x: torch.Tensor,
           dead_y: torch.Tensor) -> torch.Tensor:
    """``cross / sqrt(self_x self_y)`` with NaN rows and columns for degenerate layers."""
    denominator = torch.sqrt(torch.outer(self_x.clamp_min(0), self_y.clamp_min(0)))
    result = cross / denominator
    result[dead_x.to(result.device)] = float("nan")
    result[:, dead_y.to(result.device)] = float("nan")
    return result


def similarity_matrix(
    xs: Union[Layers, "Representations"], ys: Union[Layers, "Representations", None] = None, measure: str = "linear_cka", *, method: str = "auto", warn: bool = True,
    **options: object,
) -> torch.Tensor:
    r"""Similarity of every layer in ``xs`` with every layer in ``ys``: a (len(xs), len(ys)) tensor.

    Rows are examples in every representation, and all of them describe the same n examples in the
    same order. ``ys=None`` compares ``xs`` with itself and computes one triangle only.

    Args:
        xs: a list of (n, p_i) tensors, a dict layer name -> tensor (names appear in warnings), or
            :class:`Representations` to reuse its prepared statistics across calls.
        ys: the same for the other side, or None.
        measure: ``linear_cka``, ``debiased_cka``, ``rbf_cka``, ``rv``, ``rv2``, ``svcca`` or ``pwcca``.
        method: ``auto`` (by flop count), ``features`` or ``gram``: the route for the Gram-based measures.
            Both give the same numbers; the option exists for benchmarks and tests.
        warn: issue the :class:`RepSimWarning` about degenerate layers (``False`` for callers that
            report them themselves; the NaN cells are the same).
        **options: the measure's options (``debiased``, ``sigma``, ``center``, ``keep``).

    Returns:
        float64 tensor on the inputs' device; entry (i, j) equals the single-pair function on
        ``(xs[i], ys[j])``. Degenerate layers give NaN rows/columns and one :class:`RepSimWarning`.

    Raises:
        RepSimValueError: unknown measure or option, inputs that are not 2-D, different numbers of
            examples, too few examples, or inputs on different devices.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(100, 8, generator=g)
        >>> layers = {"a": x, "b": 2 * x + 1, "c": torch.randn(100, 4, generator=g)}
        >>> m = similarity_matrix(layers, measure="linear_cka")
        >>> m.shape, round(float(m[0, 1]), 6)
        (torch.Size([3, 3]), 1.0)
    """
    options = resolve_options(measure, options)
    reps_x = xs if isinstance(xs, Representations) else Representations(xs, max_cache_bytes=0, name="xs")
    symmetric = ys is None or ys is xs
    reps_y = reps_x if symmetric else (
        ys if isinstance(ys, Representations) else Representations(ys, max_cache_bytes=0, name="ys"))
    names_x, mats_x, names_y, mats_y = reps_x.names, reps_x.matrices, reps_y.names, reps_y.matrices
    devices = {m.device for m in mats_x + mats_y}
    if len(devices) > 1:
        raise RepSimValueError(f"all representations must be on one device; got {sorted(map(str, devices))}. "
                               "Move them with .to(device) first.")
    device = devices.pop()

    if measure in _cca.CCA_MEASURES:
        shapes = {name: m.shape for name, m in zip(names_x + names_y, mats_x + mats_y)}
        n = check_examples(shapes, 2, measure)
        result, problems = _cca.cca_matrix(names_x, mats_x, None if symmetric else (names_y, mats_y), n, measure,
                                           **options)
        if warn:
            warn_degenerate(problems, measure)
        return result

    spec = gram_spec(measure, **options)
    shapes = {name: m.shape for name, m in zip(names_x + names_y, mats_x + mats_y)}
    n = check_examples(shapes, spec.min_examples, spec.measure.replace("_", " ") if spec.transform != "unbiased"
                       else f"{spec.measure} (unbiased HSIC)")
    prepared_x = reps_x.prepared(spec, device)
    prepared_y = None if symmetric else reps_y.prepared(spec, device)
    cross, self_x, self_y, problems = hsic_matrices(prepared_x, prepared_y, spec, n, method)
    other = prepared_x if prepared_y is None else prepared_y
    scale = spec.hsic_scale(n)
    dead_x = degenerate_layers(names_x, self_x, _energy_scale(prepared_x, spec, n) * scale, spec, problems)
    dead_y = dead_x if symmetric else degenerate_layers(names_y, self_y, _energy_scale(other, spec, n) * scale, spec,
                                                        problems)
    if warn:
        warn_degenerate(problems, spec.measure)
    return cosine(cross, self_x, self_y, dead_x, dead_y)


def _energy_scale(layers: PreparedLayers, spec: GramSpec, n: int) -> torch.Tensor:
    if spec.kernel == "rbf":
        return torch.full_like(layers.energy, float(n * n))  # kernel entries lie in [0, 1]
    return layers.energy
