"""``capture``: one no-grad, eval-mode pass of the probe with temporary hooks, recorded as ``(n, p)`` features."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_repsim.capture.blocks import Block, reads_tokens
from lightning_repsim.capture.layers import (
    LayerSelector,
    _has_parameters,
    _unwrap,
    eval_mode,
    name_matches,
    select_layers,
)
from lightning_repsim.capture.outputs import (
    OutputSelector,
    _examples_axis,
    _inside_sequence_first,
    check_reduction,
    reduce_output,
    select_output,
)
from lightning_repsim.capture.probe import Probe
from lightning_repsim.errors import RepSimValueError, RepSimWarning

__all__ = ["capture", "capture_blocks"]


def _model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _parameter_holders(modules: dict[str, nn.Module]) -> dict[str, set[str]]:
    """Modules holding any parameter, each with its descendants that also hold one."""
    holders = [n for n, m in modules.items() if _has_parameters(m)]
    return {name: {d for d in holders if d != name and (name == "" or d.startswith(name + "."))} for name in holders}


def capture(
    model: nn.Module,
    probe_or_tensor: Probe | Any,
    layers: LayerSelector = None,
    *,
    batch_size: int | None = None,
    max_features: int = 4096,
    layout: str | Mapping[str, str] = "auto",
    token_reduction: str = "mean",
    output_selector: OutputSelector = None,
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Run the probe set through ``model`` and return each selected layer's ``(n, p)`` features.

    Rows are examples (in probe order), columns are neurons. The pass runs in eval mode under
    ``torch.no_grad`` with forward hooks on the selected modules only; hooks are removed and
    every submodule's ``training`` flag is restored exactly afterwards, also when the forward
    raises, so parameters and buffers (BatchNorm running statistics) are unchanged. An active
    ``torch.autocast`` context is respected (not disabled); outputs are upcast to at least
    float32. Features stay on the model's device; a :class:`Probe` is copied there once and
    reused by later calls. A DDP / DataParallel wrapper is unwrapped;
    a LightningModule works like any ``nn.Module``.

    The result is ordered by first execution (the start of a module's first call, so a block
    comes before its submodules); a module called several times per forward (shared weights)
    contributes the output of its first call. Modules that never run are left out, with a
    :class:`~lightning_repsim.errors.RepSimWarning` when ``layers`` selected them explicitly.

    Args:
        model: the network (``nn.Module``, ``LightningModule``, or a DDP wrapper).
        probe_or_tensor: a :class:`Probe`, or anything :class:`Probe` accepts.
        layers: ``None`` for the deepest executed modules holding parameters: the leaf
            modules with parameters in ordinary models, and modules such as
            ``nn.MultiheadAttention`` or fast-path transformer layers whose parameterised
            children never run themselves. Else names, globs or module types (classes or
            import paths such as ``"torch.nn.Linear"``; see :func:`select_layers`), matched
            against all submodules (the whole model is ``""``).
        batch_size: examples per forward pass; ``None`` runs the whole probe at once.
        max_features: cap on ``p`` for conv maps (see :func:`reduce_output`).
        layout: ``"auto"``, ``"conv"`` or ``"tokens"``, or a mapping from layer name or glob
            to one of them (unmatched layers use ``"auto"``).
        token_reduction: ``"mean"``, ``"first"``, ``"last"`` or ``"flatten"`` for token layouts.
        output_selector: which tensor of tuple / dict outputs (see :func:`select_output`).
        forward: ``forward(model, batch)`` for models whose forward needs more than the
            tensor; default ``model(batch)``. ``batch`` is on the model's device.

    Returns:
        ``{layer path: (n, p) tensor}`` in execution order.

    Raises:
        RepSimValueError: a bad argument, a selector matching nothing, or an output with no
            tensor in it.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        ...                     nn.Linear(8 * 16 * 16, 10))
        >>> feats = capture(net, torch.randn(6, 3, 16, 16), batch_size=4, max_features=512)
        >>> {name: tuple(f.shape) for name, f in feats.items()}
        {'0': (6, 512), '3': (6, 10)}
        >>> list(capture(net, torch.randn(6, 3, 16, 16), nn.ReLU, max_features=128)["1"].shape)
        [6, 128]
    """
    layouts = check_reduction(max_features, layout, token_reduction)
    model = _unwrap(model)
    probe = probe_or_tensor if isinstance(probe_or_tensor, Probe) else Probe(probe_or_tensor)
    recorder, selected = _recording(
        model,
        layers,
        layouts=layouts,
        token_reduction=token_reduction,
        max_features=max_features,
        output_selector=output_selector,
    )
    _run(model, probe, selected, recorder, batch_size, forward)
    return recorder.features(selected)


def _recording(
    model: nn.Module,
    layers: LayerSelector,
    *,
    layouts: dict[str, str],
    token_reduction: str,
    max_features: int,
    output_selector: OutputSelector,
) -> tuple[_Recorder, list[str]]:
    """The recorder of one pass over ``model`` (already unwrapped) and the selected layer names."""
    modules = dict(model.named_modules())
    if layers is None:
        # the deepest executed modules holding parameters, decided during the first batch
        deeper = _parameter_holders(modules)
        if not deeper:
            raise RepSimValueError(
                "The model has no parameters, so there is no default layer; pass `layers` "
                f"(available: {', '.join(repr(n) for n in modules if n) or repr('')})."
            )
        selected = list(deeper)
    else:
        deeper = {}
        selected = select_layers(model, list(modules), layers)
    recorder = _Recorder(
        modules,
        deeper,
        explicit=layers is not None,
        layouts=layouts,
        token_reduction=token_reduction,
        max_features=max_features,
        output_selector=output_selector,
    )
    return recorder, selected


def capture_blocks(
    model: nn.Module,
    probe_or_tensor: Probe | Any,
    blocks: Sequence[Block],
    *,
    batch_size: int | None = None,
    max_features: int = 4096,
    layout: str | Mapping[str, str] = "auto",
    token_reduction: str = "mean",
    output_selector: OutputSelector = None,
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`capture` of :func:`~lightning_repsim.capture.blocks.default_blocks`: each block's
    ``(n, p)`` features under the block's name, read from its output module (``layout`` patterns
    match block names). As for default layers, a block whose output has no row per example, or
    that never runs, is left out with a warning.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_repsim.capture.blocks import default_blocks
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> x = torch.randn(5, 3)
        >>> feats = capture_blocks(net, x, default_blocks(net, lambda: net(x)))
        >>> {name: tuple(f.shape) for name, f in feats.items()}
        {'0': (5, 4), '2': (5, 2)}
        >>> bool((feats["0"] >= 0).all())  # the ReLU's output, not the Linear's
        True
    """
    layouts = check_reduction(max_features, layout, token_reduction)
    model = _unwrap(model)
    probe = probe_or_tensor if isinstance(probe_or_tensor, Probe) else Probe(probe_or_tensor)
    recorder, selected = block_recording(
        model,
        blocks,
        layouts=layouts,
        token_reduction=token_reduction,
        max_features=max_features,
        output_selector=output_selector,
    )
    _run(model, probe, selected, recorder, batch_size, forward)
    return recorder.block_features(selected)


def block_recording(
    model: nn.Module,
    blocks: Sequence[Block],
    *,
    layouts: dict[str, str],
    token_reduction: str,
    max_features: int,
    output_selector: OutputSelector,
) -> tuple[_Recorder, list[str]]:
    """As :func:`_recording`, for ``blocks``: the hooks go on each block's output module, whose features
    :meth:`_Recorder.block_features` returns under the block's name."""
    modules = dict(model.named_modules())
    named = {block.output: block.name for block in blocks}
    missing = [output for output in named if output not in modules]
    if missing:
        raise RepSimValueError(f"blocks name modules that {type(model).__name__} does not have: {missing}.")
    recorder = _Recorder(
        modules,
        {},
        explicit=False,
        layouts=layouts,
        token_reduction=token_reduction,
        max_features=max_features,
        output_selector=output_selector,
        names=named,
        token_blocks=[block.output for block in blocks if reads_tokens(model, block)],
    )
    return recorder, list(named)


def _run(
    model: nn.Module,
    probe: Probe,
    selected: list[str],
    recorder: _Recorder,
    batch_size: int | None,
    forward: Callable[[nn.Module, torch.Tensor], Any] | None,
) -> None:
    """The probe pass: hooks on ``selected``, eval mode, no grad; everything restored afterwards."""
    device = _model_device(model)
    # validates batch_size before any hook is placed; a Probe copies itself to the device once
    batches = probe.batches(batch_size, device=device)
    handles = _install(recorder, selected)
    try:
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                batch = batch.clone()  # a forward that changes its input in place must not change the probe
                recorder.start_batch(batch.shape[0])
                if forward is None:
                    model(batch)
                else:
                    forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()


def _install(
    recorder: _Recorder,
    selected: list[str],
    gate: Callable[[], bool] | None = None,
    on_error: Callable[[Exception], None] | None = None,
) -> list[Any]:
    """The recorder's hooks on the selected modules (the handles, to remove them). With ``gate``, a hook
    records only while ``gate()`` is true; with ``on_error``, a hook's exception goes there instead of
    stopping the forward."""
    handles = []
    try:
        for name in selected:
            pre_hook, hook = recorder.pre_hook(name), recorder.hook(name)
            if gate is not None:
                pre_hook, hook = _gated(pre_hook, gate, on_error), _gated(hook, gate, on_error)
            handles.append(recorder.modules[name].register_forward_pre_hook(pre_hook))
            handles.append(recorder.modules[name].register_forward_hook(hook))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


def _gated(
    hook: Callable[..., None], gate: Callable[[], bool], on_error: Callable[[Exception], None] | None
) -> Callable[..., None]:
    def gated(*args: Any) -> None:
        if not gate():
            return
        if on_error is None:
            hook(*args)
            return
        try:
            hook(*args)
        except Exception as err:  # the caller's forward goes on; the recording is abandoned
            on_error(err)

    return gated


class _Recorder:
    """What the hooks of one :func:`capture` pass record: each selected layer's reduced chunks, in
    order of first execution.

    Which axis of a layer's output holds the examples is decided once per layer, from a batch whose
    size differs from the sequence length; while every batch has T == N, both readings are kept
    (already reduced) until a batch or, at the end, the model's structure decides. A default-selected
    layer that turns out to have an executed parameter-holding descendant is superseded by it; one
    without one row per example is left out with a warning.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        deeper: dict[str, set[str]],
        *,
        explicit: bool,
        layouts: dict[str, str],
        token_reduction: str,
        max_features: int,
        output_selector: OutputSelector,
        names: Mapping[str, str] | None = None,
        token_blocks: Sequence[str] = (),
    ) -> None:
        self.modules, self.deeper, self.explicit = modules, deeper, explicit
        self.names = dict(names or {})  # module path -> the name its features go by (a block's)
        self.token_blocks = set(token_blocks)  # block outputs whose 3-D outputs are tokens under "auto"
        self.layouts, self.token_reduction, self.max_features = layouts, token_reduction, max_features
        self.output_selector = output_selector
        self.first_call: dict[str, int] = {}  # order of first *start* (pre-hook), containers first
        self.chunks: dict[str, list[Any]] = {}
        self.seen_this_batch: set[str] = set()
        self.warned: set[str] = set()
        self.superseded: set[str] = set()  # default layers with an executed parameter-holding descendant
        self.misshapen: dict[str, tuple[int, ...]] = {}  # default layers without one row per example
        self.rows = 0  # examples in the batch being run
        self.keep: int | None = None  # record only the batch's first rows (None: all)
        self.examples_axis: dict[str, int] = {}  # 0: (N, ...); 1: (T, N, ...) inside a sequence-first model
        # chunks with T == N, until a batch tells: (index, (features read on axis 0, on axis 1))
        self.undecided: dict[str, list[tuple[int, tuple[torch.Tensor, torch.Tensor]]]] = {}

    def start_batch(self, rows: int, keep: int | None = None) -> None:
        """A forward of ``rows`` examples starts; of each layer's output only the first ``keep`` rows are kept."""
        self.seen_this_batch.clear()
        self.rows, self.keep = rows, keep

    def layout_of(self, name: str) -> str:
        for pattern, value in self.layouts.items():
            if pattern == "*" or name_matches(name, pattern):
                return value
        return "auto"

    def pre_hook(self, name: str) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: Any) -> None:
            self.first_call.setdefault(name, len(self.first_call))

        return pre_hook

    def label(self, name: str) -> str:
        return self.names.get(name, name)

    def hook(self, name: str) -> Callable[..., None]:
        layout = self.layout_of(self.label(name))

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.record(name, module, layout, output)

        return hook

    def reduced(self, name: str, module: nn.Module, layout: str, x: torch.Tensor, axis: int) -> torch.Tensor:
        features = reduce_output(
            x.transpose(0, 1) if axis == 1 else x,
            module=module,
            name=self.label(name),
            layout=layout,
            token_reduction=self.token_reduction,
            max_features=self.max_features,
            _warned=self.warned,
        )
        return features if self.keep is None else features[: self.keep]

    def record(self, name: str, module: nn.Module, layout: str, output: Any) -> None:
        if name in self.seen_this_batch or name in self.superseded:
            return  # shared module: its first call per forward wins
        self.seen_this_batch.add(name)
        if any(d in self.first_call for d in self.deeper.get(name, ())):
            self.superseded.add(name)
            return
        tensor = select_output(output, self.output_selector, name=name)
        if layout == "auto" and tensor.ndim == 3 and name in self.token_blocks:
            layout = "tokens"  # a transformer block's (N, T, D)
        rows = self.rows
        axis = _examples_axis(tensor, rows, module)
        if axis == -1:
            if self.explicit:
                raise RepSimValueError(
                    f"Layer {name!r} gave an output of shape {tuple(tensor.shape)} for a batch of "
                    f"{rows} examples: no leading axis of {rows} rows, one per example. Select "
                    "other layers, or an output_selector / forward that yields (N, ...) outputs."
                )
            self.misshapen[name] = tuple(tensor.shape)
            return
        chunks = self.chunks.setdefault(name, [])
        decided = self.examples_axis.get(name)
        if axis is None and decided is None:  # T == N: keep both readings until a batch tells
            chunks.append(None)
            both = (self.reduced(name, module, layout, tensor, 0), self.reduced(name, module, layout, tensor, 1))
            self.undecided.setdefault(name, []).append((len(chunks) - 1, both))
            return
        if axis is not None and decided is not None and axis != decided:
            raise RepSimValueError(
                f"Layer {name!r} gave outputs whose examples lie on axis {decided} in one batch and "
                f"on axis {axis} in another ({tuple(tensor.shape)} for {rows} examples); pass a "
                "forward that yields (N, ...) outputs."
            )
        if decided is None:
            assert axis is not None  # handled above: undecided outputs wait for a telling batch
            decided = self.examples_axis[name] = axis
            for index, both in self.undecided.pop(name, []):
                chunks[index] = both[decided]
        chunks.append(self.reduced(name, module, layout, tensor, decided))

    def block_features(self, selected: list[str]) -> dict[str, torch.Tensor]:
        """:meth:`features` under the blocks' names (see :func:`block_recording`)."""
        return {self.label(output): x for output, x in self.features(selected).items()}

    def features(self, selected: list[str]) -> dict[str, torch.Tensor]:
        """The recorded ``{layer: (n, p)}``, in order of first execution, after warning about the
        layers left out."""
        never = [n for n in selected if n not in self.first_call]
        if never and self.explicit:
            warnings.warn(
                f"Selected layers never executed during the forward pass and are left out: {never}.",
                RepSimWarning,
                stacklevel=3,
            )
        for name, pending in self.undecided.items():  # every batch had T == N: the model's structure decides
            axis = 1 if _inside_sequence_first(name, self.modules) else 0
            for index, both in pending:
                self.chunks[name][index] = both[axis]
        if self.misshapen:
            warnings.warn(
                "Layers left out because their outputs have no leading axis of one row per example: "
                + ", ".join(f"{self.label(n)!r} {shape}" for n, shape in self.misshapen.items())
                + ". Select layers explicitly, or pass an output_selector / forward that yields (N, ...) outputs.",
                RepSimWarning,
                stacklevel=3,
            )
        result: dict[str, torch.Tensor] = {}
        for name in sorted(self.first_call, key=self.first_call.__getitem__):
            if name in self.superseded or name in self.misshapen:
                continue
            parts = self.chunks[name]
            if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
                raise RepSimValueError(
                    f"Layer {self.label(name)!r} gave features of different widths across probe batches "
                    f"({[tuple(p.shape) for p in parts]}); use equal-length inputs or a token "
                    "reduction other than 'flatten'."
                )
            result[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
        return result
