"""One call to compare two trained models (or a model with itself) outside a Trainer.

The same capture and similarity engine as the callbacks: the probe runs through each model (no
grad, eval mode, hooks only for the pass), each layer becomes an (n, p) matrix, and every measure
is computed for all L_a x L_b layer pairs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from matplotlib.figure import Figure
from torch import nn

from lightning_repsim import report
from lightning_repsim.capture import LayerSelector, Probe, capture
from lightning_repsim.errors import RepSimValueError
from lightning_repsim.functional._measures import resolve_measures
from lightning_repsim.functional.matrix import similarity_matrix


@dataclass
class Comparison:
    """The result of :func:`compare` and :func:`~lightning_repsim.store.similarity_between`: layer
    names of each side and one matrix per measure.

    ``matrices[measure][i, j]`` is the similarity of ``layers_a[i]`` and ``layers_b[j]`` (float64).
    ``steps`` are the two stored steps compared (``similarity_between``; ``None`` for ``compare``).
    """

    layers_a: list[str]
    layers_b: list[str]
    matrices: dict[str, torch.Tensor]
    probe_hash: str
    n: int
    names: tuple[str, str] = field(default=("model A", "model B"))
    steps: Optional[tuple[int, int]] = None

    def __getitem__(self, measure: str) -> torch.Tensor:
        if measure not in self.matrices:
            raise RepSimValueError(f"no {measure!r} in this comparison; it has {list(self.matrices)}.")
        return self.matrices[measure]

    def plot(self, measure: Optional[str] = None, path: Union[str, Path, None] = None) -> Figure:
        """Heatmap of one measure (default: the first), saved as PNG when ``path`` is given."""
        measure = measure or next(iter(self.matrices))
        row_title, col_title = self.names if self.steps is None else (
            f"{name} (step {step})" for name, step in zip(self.names, self.steps))
        figure = report.heatmap_figure(self[measure].cpu().numpy(), self.layers_a, self.layers_b, measure=measure,
                                       row_title=row_title, col_title=col_title,
                                       title=f"{measure}: {self.names[0]} vs {self.names[1]} (n = {self.n})")
        if path is not None:
            report.save_png(figure, path)
        return figure

    def to_csv(self, directory: Union[str, Path]) -> list[Path]:
        """One CSV per measure, ``<directory>/<measure>.csv``, rows layers_a, columns layers_b."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return [report.write_matrix_csv(directory / f"{m}.csv", matrix.cpu().numpy(), self.layers_a, self.layers_b)
                for m, matrix in self.matrices.items()]


def compare(
    model_a: nn.Module,
    model_b: Optional[nn.Module] = None,
    probe: Any = None,
    measures: Sequence[str] = ("linear_cka",),
    layers: LayerSelector = None,
    layers_b: LayerSelector = None,
    *,
    measure_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
    batch_size: Optional[int] = 256,
    max_features: int = 4096,
    names: tuple[str, str] = ("model A", "model B"),
    **capture_options: Any,
) -> Comparison:
    """Compare every layer of ``model_a`` with every layer of ``model_b`` on a fixed probe set.

    Rows are probe examples; each layer's output is reduced to (n, p) by the rule of
    :func:`lightning_repsim.capture.reduce_output` (conv maps average pooled to at most
    ``max_features``). Architectures may differ. To compare checkpoints, load them first, e.g.
    ``MyModule.load_from_checkpoint(path)``.

    Args:
        model_a: the first network.
        model_b: the second network; ``None`` compares ``model_a`` with itself (one triangle).
        probe: a tensor, an ``(x, y)`` tuple, a DataLoader or a :class:`~lightning_repsim.capture.Probe`.
        measures: measure names (see :data:`lightning_repsim.functional.MEASURES`).
        layers: layer selector for ``model_a`` (names, globs, module types; None: leaf modules
            with parameters in execution order).
        layers_b: the same for ``model_b`` (default: ``layers``).
        measure_options: per-measure options, e.g. ``{"rbf_cka": {"sigma": 0.5}}``.
        batch_size: probe examples per forward pass.
        max_features: cap on p per conv layer.
        names: labels of the two models in figures.
        **capture_options: ``layout``, ``token_reduction``, ``output_selector``, ``forward``
            (see :func:`lightning_repsim.capture.capture`).

    Raises:
        RepSimValueError: a model that is not an ``nn.Module`` (a checkpoint path: load it
            first), no probe, or an unknown measure or option.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> result = compare(net, probe=torch.randn(64, 8), measures=("linear_cka", "rv2"))
        >>> result.layers_a, tuple(result["rv2"].shape)
        (['0', '2'], (2, 2))
    """
    for what, model in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(model, nn.Module) and (model is not None or what == "model_a"):
            hint = (f"; to compare a checkpoint, load it first, e.g. MyModule.load_from_checkpoint({str(model)!r})"
                    if isinstance(model, (str, os.PathLike)) else "")
            raise RepSimValueError(f"compare() needs {what} as an nn.Module, got {type(model).__name__}{hint}.")
    if probe is None:
        raise RepSimValueError("compare() needs a probe: a tensor, an (x, y) tuple or a DataLoader of inputs.")
    options = resolve_measures(measures, measure_options)
    probe = probe if isinstance(probe, Probe) else Probe(probe)
    features_a = capture(model_a, probe, layers, batch_size=batch_size, max_features=max_features, **capture_options)
    features_b = None
    if model_b is not None:
        features_b = capture(model_b, probe, layers if layers_b is None else layers_b, batch_size=batch_size,
                             max_features=max_features, **capture_options)
        device = next(iter(features_a.values())).device
        features_b = {k: v.to(device) for k, v in features_b.items()}
    matrices = {m: similarity_matrix(features_a, features_b, m, **o) for m, o in options.items()}
    return Comparison(list(features_a), list(features_a if features_b is None else features_b), matrices,
                      probe.hash, len(probe), names)
