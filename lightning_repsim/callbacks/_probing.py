"""What RepresentationSimilarity runs through the model: the probe set, the references, and the pass.

The probe is a tensor, an ``(x, y)`` tuple, a DataLoader, or ``"val:N"`` / ``"train:N"`` (the first
N examples of the Trainer's loader). References are keywords (``"init"``, ``"previous"``,
``"final"``), modules, or Lightning checkpoints loaded into a copy of the trained module. Every pass
over the trained module (and a checkpoint reference) runs under the Trainer's precision, as its
validation steps do.
"""

from __future__ import annotations

import copy
import os
import re
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_repsim.capture import (
    Block,
    LayerSelector,
    OutputSelector,
    Probe,
    capture,
    capture_blocks,
    default_blocks,
)
from lightning_repsim.capture.blocks import no_block_error
from lightning_repsim.capture.outputs import check_reduction
from lightning_repsim.capture.recorder import _model_device
from lightning_repsim.errors import RepSimValueError
from lightning_repsim.functional._validation import MIN_MEANINGFUL_EXAMPLES, too_small_probe

if TYPE_CHECKING:
    from lightning_repsim.callbacks.similarity import RepresentationSimilarity

KEYWORDS = ("init", "previous", "final")
PROBE_SPEC = re.compile(r"^(val|train):(\d+)$")


@dataclass
class Reference:
    """One thing the layers are compared with; ``label`` is its name in tags and file names."""

    label: str
    kind: str  # "init" | "previous" | "final" | "module"
    source: Any = None  # the nn.Module or checkpoint path
    features: dict[str, torch.Tensor] | None = None


def parse_references(reference: Any) -> list[Reference]:
    """The references of ``RepresentationSimilarity(reference=...)``, each with a unique label."""
    items = list(reference) if isinstance(reference, (list, tuple)) else [reference]
    if not items:
        raise RepSimValueError("reference is empty: use 'final', 'init', 'previous', a module or a checkpoint.")
    parsed, modules = [], 0
    for item in items:
        if isinstance(item, str) and item in KEYWORDS:
            parsed.append(Reference(item, item))
        elif isinstance(item, nn.Module):
            modules += 1
            parsed.append(Reference(f"model{modules}" if modules > 1 else "model", "module", item))
        elif isinstance(item, (str, os.PathLike)):
            label = re.sub(r"[^\w.\-]", "_", Path(item).stem) or "checkpoint"
            parsed.append(Reference(label, "module", Path(item)))
        else:
            raise RepSimValueError(f"reference {item!r} is not one of {KEYWORDS}, an nn.Module or a checkpoint path.")
    labels = [r.label for r in parsed]
    if len(set(labels)) != len(labels):
        raise RepSimValueError(f"references repeat: {labels}; give each once.")
    return parsed


def check_probe_arguments(
    probe: Any, max_features: Any, layout: Any, token_reduction: Any, output_selector: Any, forward: Any
) -> None:
    """Refuse, at construction, a malformed probe string or capture setting."""
    check_reduction(max_features, layout, token_reduction)
    if not (
        output_selector is None
        or callable(output_selector)
        or isinstance(output_selector, str)
        or (isinstance(output_selector, int) and not isinstance(output_selector, bool))
    ):
        raise RepSimValueError(
            f"output_selector must be None, an int index, a str key or a callable; got {output_selector!r}."
        )
    if forward is not None and not callable(forward):
        raise RepSimValueError(f"forward must be None or a callable forward(model, batch); got {forward!r}.")
    if isinstance(probe, str) and not PROBE_SPEC.match(probe):
        raise RepSimValueError(
            f"probe string must look like 'val:512' or 'train:512' (a split and a number of examples, "
            f"at least {MIN_MEANINGFUL_EXAMPLES}); got {probe!r}."
        )
    if isinstance(probe, str) and int(probe.split(":")[1]) < MIN_MEANINGFUL_EXAMPLES:
        raise RepSimValueError(too_small_probe(int(probe.split(":")[1]), f"probe={probe!r}"))


def materialise_probe(source: Any, trainer: pl.Trainer) -> Probe:
    """The probe set of ``source`` (``None``: ``"val:512"``, else ``"train:512"``), materialised once."""
    if source is not None and not isinstance(source, str):
        return Probe(source)
    split, count = ("val", 512) if source is None else (source.split(":")[0], int(source.split(":")[1]))
    loader = _dataloader(trainer, split)
    if loader is None and source is None:
        split, loader = "train", _dataloader(trainer, "train")
    if loader is None:
        raise RepSimValueError(
            f"probe={source or 'val:512'!r} needs a {split} dataloader, and the Trainer has "
            "none; pass probe= a tensor, an (x, y) tuple or a DataLoader."
        )
    return Probe(loader, max_examples=count)


def check_probe_size(probe: Probe) -> None:
    """Refuse a probe of fewer than 4 examples: the unbiased HSIC needs 4, and below 4 every other
    measure is (close to) 1 whatever the model does."""
    if len(probe) < MIN_MEANINGFUL_EXAMPLES:
        raise RepSimValueError(too_small_probe(len(probe)))


def _dataloader(trainer: pl.Trainer, split: str) -> Any:
    """The Trainer's train or val dataloader (the first one when there are several), or None.

    At ``on_fit_start`` Lightning has not loaded the dataloaders yet and offers no public view of
    their source (a datamodule, the module's hooks, or loaders passed to ``fit``); its data
    source objects are asked for the loader.
    """
    loop = trainer.fit_loop if split == "train" else trainer.fit_loop.epoch_loop.val_loop
    source = getattr(loop, "_data_source", None)
    try:
        loader = source.dataloader() if source is not None and source.is_defined() else None
    except Exception:  # a LightningModule without the hook
        loader = None
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()), None)
    return loader


@dataclass
class ProbeRunner:
    """Runs the probe through a model and returns each selected layer's ``(n, p)`` features
    (:func:`lightning_repsim.capture.capture` with the callback's settings)."""

    probe: Probe
    layers: LayerSelector
    reference_layers: LayerSelector
    batch_size: int
    max_features: int
    layout: Any
    token_reduction: str
    output_selector: OutputSelector
    forward: Callable[[nn.Module, torch.Tensor], Any] | None
    _blocks: weakref.WeakKeyDictionary[nn.Module, list[Block]] = field(
        default_factory=weakref.WeakKeyDictionary, init=False, repr=False
    )

    @classmethod
    def for_monitor(cls, probe: Probe, monitor: RepresentationSimilarity) -> ProbeRunner:
        """A runner of ``probe`` with the monitor's layer selection, batch size and output reduction."""
        return cls(
            probe,
            monitor.layers,
            monitor.reference_layers,
            monitor.batch_size,
            monitor.max_features,
            monitor.layout,
            monitor.token_reduction,
            monitor.output_selector,
            monitor.forward,
        )

    def features(
        self, module: nn.Module, layers: LayerSelector = None, trainer: pl.Trainer | None = None
    ) -> dict[str, torch.Tensor]:
        """The probe's features; with ``trainer``, the pass runs as its validation steps do: inputs converted
        and the forward wrapped by its precision plugin (autocast for "16-mixed"/"bf16-mixed", the module's
        dtype for "bf16-true"/"16-true"). Features are upcast to float32 by capture()."""
        forward = self.forward  # forward(model, batch), or None for model(batch)
        if trainer is not None:
            precision, user_forward = trainer.precision_plugin, self.forward

            def forward_with_precision(model: nn.Module, batch: torch.Tensor) -> Any:
                with precision.val_step_context():
                    batch = precision.convert_input(batch)
                    return model(batch) if user_forward is None else user_forward(model, batch)

            forward = forward_with_precision
        selector = self.layers if layers is None else layers
        settings: dict[str, Any] = {
            "batch_size": self.batch_size,
            "max_features": self.max_features,
            "layout": self.layout,
            "token_reduction": self.token_reduction,
            "output_selector": self.output_selector,
            "forward": forward,
        }
        if selector is not None:
            return capture(module, self.probe, selector, **settings)
        return capture_blocks(module, self.probe, self.blocks(module, forward, trainer is not None), **settings)

    def blocks(
        self, module: nn.Module, forward: Callable[[nn.Module, torch.Tensor], Any] | None, trained: bool
    ) -> list[Block]:
        """The default layers of ``module``: its blocks (:func:`lightning_repsim.capture.default_blocks`), found
        once per module by a forward pass of the probe's first two examples."""
        found = self._blocks.get(module)
        if found is None:
            inputs = next(self.probe.batches(2, device=_model_device(module)))
            found = default_blocks(module, lambda: module(inputs) if forward is None else forward(module, inputs))
            if not found:
                raise no_block_error(module, "layers" if trained else "reference_layers")
            self._blocks[module] = found
        return found

    def known_blocks(self, module: nn.Module) -> list[Block] | None:
        """The default layers of ``module`` when a probe pass has found them, else None."""
        return self._blocks.get(module)

    def block_outputs(self, module: nn.Module) -> dict[str, str]:
        """``{block: the module whose output it is}`` of the default layers of ``module`` (empty when explicit)."""
        return {block.name: block.output for block in self._blocks.get(module, [])}

    def trained(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """The trained module's features; a probe it cannot run is reported as such, with its shape."""
        try:
            return self.features(pl_module, trainer=trainer)
        except RepSimValueError:
            raise
        except Exception as err:  # the user's model, the user's probe: say which pairing failed
            raise self.failure(type(pl_module).__name__, err) from err

    def reference(self, ref: Reference, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """A reference's features. A checkpoint, loaded into a copy of the trained module, runs under the
        Trainer's precision like it; an ``nn.Module`` runs as given (its own dtype, no autocast)."""
        if isinstance(ref.source, Path):
            checkpoint = torch.load(ref.source, map_location="cpu", weights_only=True)
            model = copy.deepcopy(pl_module)
            try:
                model.load_state_dict(checkpoint["state_dict"])
            except (KeyError, RuntimeError) as err:
                raise RepSimValueError(
                    f"reference checkpoint {str(ref.source)!r} does not fit {type(pl_module).__name__}: {err}"
                ) from None
        else:
            model = ref.source
        try:
            model.to(pl_module.device)
            return self.features(model, self.reference_layers, trainer if isinstance(ref.source, Path) else None)
        except RepSimValueError:
            raise
        except Exception as err:  # the user's model, the user's probe: say which pairing failed
            raise self.failure(f"reference {ref.label!r} ({type(model).__name__})", err) from err

    def failure(self, who: str, err: Exception) -> RepSimValueError:
        """The error for a model that cannot run the probe: which model, the probe's shape and dtype, the cause."""
        return RepSimValueError(
            f"{who} cannot run the probe of shape {tuple(self.probe.inputs.shape)} "
            f"({self.probe.inputs.dtype}): {type(err).__name__}: {err}. Pass probe= inputs "
            "that the module's forward accepts (its first tensor is what is fed to forward)."
        )


def check_features(features: Mapping[str, torch.Tensor], step: int, warn: Callable[[str, str], None]) -> None:
    """Warn once per layer about NaN/Inf activations (divergence) or a layer constant over the probe.

    Every layer is checked on its own device and the verdicts come to the host in one transfer, not
    two synchronisations per layer."""
    if not features:
        return
    flags = [_verdict(x) for x in features.values()]
    verdicts = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
    for name, (finite, constant) in zip(features, verdicts, strict=True):
        if not finite:
            warn(
                f"nonfinite:{name}",
                f"layer {name!r} produced NaN/Inf activations at step {step}: its similarities are NaN; "
                "training continues.",
            )
        elif constant:
            warn(
                f"constant:{name}",
                f"layer {name!r} is constant over the probe at step {step} (a dead layer?): its centred "
                "similarities are NaN; training continues.",
            )


def _verdict(x: torch.Tensor) -> torch.Tensor:
    """``[all finite, constant over the probe]`` of one layer, as a boolean tensor on its device.

    Constant: no variation over the probe examples, relative to the magnitude, as the functional API decides."""
    x64 = x.to(torch.float64)
    finite = torch.isfinite(x).all()
    constant = (x64 - x64.mean(0)).square().sum() <= 1e-20 * x64.square().sum()
    return torch.stack([finite, constant])


def describe(value: Any) -> Any:
    """A setting as JSON: a callable by its qualified name, anything else as it is."""
    if callable(value):
        name = getattr(value, "__qualname__", None) or type(value).__qualname__
        return f"{getattr(value, '__module__', None) or type(value).__module__}.{name}"
    return value
