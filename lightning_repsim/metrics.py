"""Streaming similarity of all layer pairs over probe batches, as a torchmetrics ``Metric``.

The probe set arrives in batches (and, under DDP, in shards across processes). ``LayerSimilarity``
accumulates what the measures need and computes every L_a x L_b matrix at the end; its states are
declared with torchmetrics' ``dist_reduce_fx`` so torchmetrics itself reduces them across ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_repsim.errors import RepSimValueError, RepSimWarning
from lightning_repsim.functional._engine import cosine, degenerate_layers, hsic_matrices
from lightning_repsim.functional._prepared import prepare_layers
from lightning_repsim.functional._validation import as_matrix, warn_degenerate
from lightning_repsim.functional.matrix import similarity_matrix
from lightning_repsim.measures import MEASURES, gram_spec, resolve_measures

Batch = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]

#: Default memory budget of the exact mode: stored probe features, summed over layers (1 GiB).
DEFAULT_MAX_BYTES = 1 << 30


class LayerSimilarity(Metric):
    r"""Similarity of every layer of side A with every layer of side B, accumulated over probe batches.

    Rows are examples: each ``update`` receives, per layer, an (n_batch, p) tensor for the same
    n_batch probe examples on both sides.

    Two modes:

    - ``"exact"``: the full-probe value of every measure, equal to
      :func:`lightning_repsim.functional.similarity_matrix` on the concatenated batches. A Gram
      block between two batches needs both batches' features, so this mode keeps each layer's
      features (n x p, at most float32 for half-precision input), summed over layers within
      ``max_bytes``; past it, an error names the widest layer and suggests what to change. The
      functional call then picks feature space (p < n) or n x n Grams per call.
    - ``"minibatch"``: linear CKA with the estimator of Nguyen, Raghu & Kornblith (2021): the
      unbiased HSIC of each batch (n_batch >= 4) is summed per layer pair, and CKA is formed from
      the sums. Memory is O(L_a L_b), independent of the probe size. Only ``linear_cka``.

    Under DDP each rank may update with its own shard of the probe (uneven shards are fine);
    ``compute`` returns the same matrices as one process over the whole probe (the exact mode
    gathers the features, the minibatch mode sums the per-batch statistics).

    Args:
        names_a: layer names of side A, in order.
        names_b: layer names of side B; None compares side A with itself.
        measures: measure names (see :data:`lightning_repsim.functional.MEASURES`).
        mode: ``"exact"`` or ``"minibatch"``.
        measure_options: per-measure options, e.g. ``{"svcca": {"keep": 0.99}}``.
        max_bytes: memory budget of the exact mode.
        kwargs: passed to :class:`torchmetrics.Metric` (e.g. ``dist_sync_on_step``).

    Example:
        >>> import torch
        >>> metric = LayerSimilarity(["conv", "fc"], measures=("linear_cka", "rv2"))
        >>> for _ in range(4):
        ...     x = torch.randn(16, 8)
        ...     metric.update({"conv": x, "fc": torch.tanh(x)})
        >>> result = metric.compute()
        >>> sorted(result), tuple(result["linear_cka"].shape)
        (['linear_cka', 'rv2'], (2, 2))
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    # the states of the minibatch mode (add_state in __init__)
    hsic_ab: torch.Tensor
    hsic_aa: torch.Tensor
    hsic_bb: torch.Tensor
    energy_a: torch.Tensor
    energy_b: torch.Tensor
    batches: torch.Tensor

    def __init__(
        self,
        names_a: Sequence[str],
        names_b: Sequence[str] | None = None,
        measures: Sequence[str] = ("linear_cka",),
        mode: str = "exact",
        measure_options: Mapping[str, Mapping[str, Any]] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.names_a = [str(n) for n in names_a]
        self.symmetric = names_b is None
        self.names_b = list(self.names_a) if names_b is None else [str(n) for n in names_b]
        if not self.names_a or not self.names_b:
            raise RepSimValueError("LayerSimilarity needs at least one layer name on each side.")
        if mode not in ("exact", "minibatch"):
            raise RepSimValueError(f"mode must be 'exact' or 'minibatch'; got {mode!r}.")
        self.options = resolve_measures(measures, measure_options)
        measures = tuple(self.options)
        if mode == "minibatch" and set(measures) - {"linear_cka"}:
            raise RepSimValueError(
                f"mode='minibatch' computes linear CKA with the Nguyen et al. (2021) estimator only; got measures "
                f"{list(measures)}. Use mode='exact' for {', '.join(sorted(set(measures) - {'linear_cka'}))}."
            )
        self.measures = tuple(measures)
        self.mode = mode
        self.max_bytes = int(max_bytes)
        self._stored_bytes = 0

        if mode == "exact":
            for i in range(len(self.names_a)):
                self.add_state(f"features_a_{i}", default=[], dist_reduce_fx="cat")
            if not self.symmetric:
                for j in range(len(self.names_b)):
                    self.add_state(f"features_b_{j}", default=[], dist_reduce_fx="cat")
        else:
            la, lb = len(self.names_a), len(self.names_b)
            zeros = torch.zeros  # states must be float64: sums of HSIC estimates over many batches
            self.add_state("hsic_ab", default=zeros(la, lb, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("hsic_aa", default=zeros(la, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("hsic_bb", default=zeros(lb, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("energy_a", default=zeros(la, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("energy_b", default=zeros(lb, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("batches", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _as_list(self, batch: Batch, names: list[str], side: str) -> list[torch.Tensor]:
        if isinstance(batch, Mapping):
            missing = [n for n in names if n not in batch]
            if missing:
                raise RepSimValueError(f"update() for side {side} lacks layer(s) {missing}; it has {list(batch)}.")
            tensors = [batch[n] for n in names]
        else:
            tensors = list(batch)
            if len(tensors) != len(names):
                raise RepSimValueError(
                    f"update() for side {side} got {len(tensors)} tensors for {len(names)} layers {names}."
                )
        out = []
        for name, t in zip(names, tensors):
            t = as_matrix(t.detach(), f"layer {name!r}")
            if t.dtype in (torch.float16, torch.bfloat16):
                t = t.float()
            out.append(t)
        return out

    def update(self, batch_a: Batch, batch_b: Batch | None = None) -> None:
        """Add one probe batch: per layer an (n_batch, p) tensor, as a dict by name or a list in order."""
        xs = self._as_list(batch_a, self.names_a, "A")
        if self.symmetric:
            if batch_b is not None:
                raise RepSimValueError("this LayerSimilarity compares side A with itself; call update(batch_a) only.")
            ys = None
        else:
            if batch_b is None:
                raise RepSimValueError("this LayerSimilarity has a side B; call update(batch_a, batch_b).")
            ys = self._as_list(batch_b, self.names_b, "B")
        n = xs[0].shape[0]
        shapes = {name: t.shape for name, t in zip(self.names_a + (self.names_b if ys else []), xs + (ys or []))}
        if any(s[0] != n for s in shapes.values()):
            listed = ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())
            raise RepSimValueError(f"every layer in one update must have the same batch size (rows); got {listed}.")
        if self.mode == "exact":
            self._store(xs, ys)
        else:
            self._accumulate(xs, ys, n)

    def _store(self, xs: list[torch.Tensor], ys: list[torch.Tensor] | None) -> None:
        added = sum(t.numel() * t.element_size() for t in xs + (ys or []))
        if self._stored_bytes + added > self.max_bytes:
            widest_name, widest = max(
                zip(self.names_a + (self.names_b if ys else []), xs + (ys or [])), key=lambda item: item[1].shape[1]
            )
            raise RepSimValueError(
                f"LayerSimilarity(mode='exact') would hold {(self._stored_bytes + added) / 2**20:.0f} MiB of probe "
                f"features, over max_bytes = {self.max_bytes / 2**20:.0f} MiB. The widest layer is {widest_name!r} "
                f"with p = {widest.shape[1]} features. Reduce the features per layer (e.g. a smaller max_features "
                "when capturing), use fewer probe examples, raise max_bytes, or use mode='minibatch'."
            )
        self._stored_bytes += added
        for i, t in enumerate(xs):
            self._features("a", i).append(t)
        for j, t in enumerate(ys or []):
            self._features("b", j).append(t)

    def _accumulate(self, xs: list[torch.Tensor], ys: list[torch.Tensor] | None, n: int) -> None:
        if n < 4:
            warnings.warn(
                f"LayerSimilarity(mode='minibatch') skipped a batch of {n} example(s): the unbiased HSIC "
                "needs at least 4 per batch.",
                RepSimWarning,
                stacklevel=3,
            )
            return
        spec = gram_spec("debiased_cka")
        device = self.hsic_ab.device
        prepared_a = prepare_layers(self.names_a, xs, spec, device)
        prepared_b = None if ys is None else prepare_layers(self.names_b, ys, spec, device)
        cross, self_a, self_b, problems = hsic_matrices(prepared_a, prepared_b, spec, n)
        if problems:  # NaN/Inf in this batch: the sums would be poisoned; say so now, NaN comes out at compute
            warn_degenerate(problems, "minibatch linear_cka (this batch)")
        scale = spec.hsic_scale(n)
        bad_a = torch.tensor([name in problems for name in self.names_a], device=device)
        self.hsic_ab += cross
        self.hsic_aa += torch.where(bad_a, torch.nan, self_a)
        self.energy_a += prepared_a.energy * scale
        other = prepared_a if prepared_b is None else prepared_b
        bad_b = bad_a if ys is None else torch.tensor([name in problems for name in self.names_b], device=device)
        self.hsic_bb += torch.where(bad_b, torch.nan, self_b)
        self.energy_b += other.energy * scale
        self.batches += 1

    def _features(self, side: str, i: int) -> Any:
        """The exact mode's stored batches of layer ``i`` of side ``side``: a list state, which torchmetrics
        turns into one concatenated tensor when it syncs across processes."""
        return getattr(self, f"features_{side}_{i}")

    def compute(self) -> dict[str, torch.Tensor]:
        """Every measure's (L_a, L_b) float64 matrix, as a dict measure -> tensor."""
        if self.mode == "minibatch":
            return {"linear_cka": self._compute_minibatch()}
        if len(self._features("a", 0)) == 0:  # a list, or after a DDP sync one tensor
            raise RepSimValueError("LayerSimilarity.compute() was called before any update().")
        xs = {name: dim_zero_cat(self._features("a", i)) for i, name in enumerate(self.names_a)}
        ys = (
            None
            if self.symmetric
            else {name: dim_zero_cat(self._features("b", j)) for j, name in enumerate(self.names_b)}
        )
        return {m: similarity_matrix(xs, ys, m, **self.options[m]) for m in self.measures}

    def _compute_minibatch(self) -> torch.Tensor:
        if float(self.batches) == 0:
            raise RepSimValueError("LayerSimilarity.compute() was called before any batch of >= 4 examples.")
        spec = gram_spec("debiased_cka")
        problems = {
            name: "it contained NaN or Inf in a probe batch"
            for name, value in zip(self.names_a + self.names_b, torch.cat([self.hsic_aa, self.hsic_bb]).tolist())
            if value != value
        }
        dead_a = degenerate_layers(self.names_a, self.hsic_aa.cpu(), self.energy_a.cpu(), spec, problems)
        dead_b = degenerate_layers(self.names_b, self.hsic_bb.cpu(), self.energy_b.cpu(), spec, problems)
        warn_degenerate(problems, "minibatch linear_cka")
        return cosine(self.hsic_ab, self.hsic_aa, self.hsic_bb, dead_a, dead_b)

    def reset(self) -> None:
        super().reset()
        self._stored_bytes = 0


__all__ = ["LayerSimilarity", "MEASURES", "DEFAULT_MAX_BYTES"]
