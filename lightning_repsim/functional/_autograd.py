"""Gradients through the Gram-based measures (private).

The Gram engine (:mod:`lightning_repsim.functional._engine`) is built for many layers at once without
gradients: it caches, scales into float32 and multiplies through NumPy. When an input requires grad
(CKA as a loss term: distillation, representation alignment), :func:`similarity_matrix` and the
single-pair measures come here instead: the same transformed Grams, ``<T(K), T(L)>_F /
(||T(K)||_F ||T(L)||_F)`` (see the engine's table), written in plain float64 torch so that autograd
follows every step, with the same degenerate-layer rules and messages as the engine.
"""

from __future__ import annotations

import torch

from lightning_repsim.functional._engine import cosine, degenerate_layers
from lightning_repsim.functional._validation import no_autocast
from lightning_repsim.functional.gram import center_gram, numpy_median, rbf_from_distances, squared_distances
from lightning_repsim.measures import GramSpec


def _transformed_gram(x: torch.Tensor, spec: GramSpec, problems: dict[str, str], name: str) -> torch.Tensor:
    """``T(K)`` of one layer, float64 n x n, differentiable in ``x``; a degenerate layer is recorded in
    ``problems`` and gives zeros."""
    x = x.to(torch.float64)
    if not bool(torch.isfinite(x.detach()).all()):
        problems[name] = "it contains NaN or Inf"
        return torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
    if spec.center_features:
        x = x - x.mean(0, keepdim=True)
    if spec.kernel == "rbf":
        distances = squared_distances(x, torch.float64)
        if not float(numpy_median(distances.detach())) > 0:
            problems[name] = "its examples are (nearly all) identical: the RBF median distance is 0"
            return torch.zeros_like(distances)
        gram = rbf_from_distances(distances, spec.sigma)
    else:
        with no_autocast(x.device):
            gram = x @ x.T
    if spec.transform == "center":
        return center_gram(gram)
    if spec.transform == "unbiased":
        return center_gram(gram, unbiased=True)
    if spec.transform == "zero_diag":
        return gram - torch.diag_embed(gram.diagonal())
    return gram


def gram_terms(
    names: list[str], mats: list[torch.Tensor], spec: GramSpec, problems: dict[str, str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flattened T(K) per layer (L, n²), scale of "zero" per layer (L,))``, both unscaled by HSIC's
    normalisation (the caller applies ``spec.hsic_scale``)."""
    n = mats[0].shape[0]
    vectors = torch.stack([_transformed_gram(m, spec, problems, k).reshape(-1) for k, m in zip(names, mats)])
    if spec.kernel == "rbf":
        energy = torch.full((len(mats),), float(n * n), dtype=torch.float64, device=vectors.device)
    else:  # (||X||_F²)² of the raw input, as the engine's
        energy = torch.stack([torch.linalg.vector_norm(m.detach().to(torch.float64)) ** 4 for m in mats])
        energy = torch.nan_to_num(energy.to(vectors.device), nan=0.0, posinf=0.0)
    return vectors, energy


def differentiable_matrix(
    names_x: list[str],
    mats_x: list[torch.Tensor],
    other: tuple[list[str], list[torch.Tensor]] | None,
    spec: GramSpec,
) -> tuple[torch.Tensor, dict[str, str]]:
    """All pairs of a Gram-based measure with gradients: ``(matrix (Lx, Ly) float64, problems)``;
    ``other=None`` compares ``mats_x`` with itself."""
    problems: dict[str, str] = {}
    device = mats_x[0].device
    vectors_x, energy_x = gram_terms(names_x, mats_x, spec, problems)
    if other is None:
        names_y, vectors_y, energy_y = names_x, vectors_x, energy_x
    else:
        names_y = other[0]
        vectors_y, energy_y = gram_terms(names_y, [m.to(device) for m in other[1]], spec, problems)
    with no_autocast(device):
        cross = vectors_x @ vectors_y.T
    self_x, self_y = vectors_x.square().sum(1), vectors_y.square().sum(1)
    dead_x = degenerate_layers(names_x, self_x, energy_x, spec, problems)
    dead_y = dead_x if other is None else degenerate_layers(names_y, self_y, energy_y, spec, problems)
    return cosine(cross, self_x, self_y, dead_x, dead_y), problems
