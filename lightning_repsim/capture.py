"""Which modules, in which order, and how their outputs become ``(n, p)`` features.

Conventions, everywhere in lightning_repsim: **rows are examples, columns are neurons**. A
layer's output for ``n`` probe examples becomes one ``(n, p)`` matrix, float32 (float64 when
the layer itself computes in float64), detached, on the model's device.

The pipeline, one function each:

* :func:`execution_order` — module paths in the order they first run in a forward pass.
* :func:`select_layers` — names, glob patterns or module types (classes or import paths such
  as ``"torch.nn.Linear"``), kept in execution order.
* :func:`select_output` — which tensor of a module's output (tuple, dict, dataclass, RNN).
* :func:`reduce_output` — one rule for every layer that maps ``(N, *)`` to ``(N, p)``.
* :class:`Probe` — the fixed, hashed set of probe inputs.
* :func:`capture` — all of the above in one no-grad, eval-mode pass with temporary hooks.

The reduction rule (:func:`reduce_output`):

* ``(N,)`` → ``(N, 1)``; ``(N, p)`` → as is.
* conv layout, ``(N, C, *S)`` with 1 to 3 (or more) spatial dims: if ``C * prod(S) <=
  max_features`` flatten as is; otherwise adaptive average pooling to the largest common side
  ``s`` (each spatial dim pooled to ``min(s, S_d)``, never upsampled) with ``C * prod(...) <=
  max_features``, then flatten (channel-major). When even global pooling is too wide
  (``C > max_features``) global average pooling is kept (``p = C``) with one
  :class:`~lightning_repsim.errors.RepSimWarning` naming the layer.
* tokens layout, ``(N, T, *D)``: ``token_reduction`` ``"mean"`` over tokens (default),
  ``"first"`` / ``"last"`` token, or ``"flatten"`` to ``(N, T * D)``.
* ``layout="auto"`` decides conv vs tokens per module: 4-D and higher outputs are conv maps;
  3-D outputs are tokens for the known sequence modules (``nn.MultiheadAttention``,
  ``nn.Transformer*``, ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``, ``nn.Embedding``) and for modules
  that act on the last axis (``nn.Linear``, ``nn.Bilinear``, ``nn.LayerNorm``, ``nn.RMSNorm``:
  a transformer's layers), and conv maps for everything else (``nn.Conv1d``, 1-d batch norms
  and pooling, and any other module). Pass ``layout="tokens"`` (or a per-layer mapping) for
  other modules of a transformer, e.g. parameter-free activations.
* Rows are examples. Sequence modules with ``batch_first=False`` have their ``(T, N, D)``
  outputs transposed to ``(N, T, D)`` first, whatever the layout; so has any other 3-D
  output whose second axis, not its first, has the batch's size (the inner layers of a
  sequence-first model). Each layer's reading is decided once per capture, by a batch
  whose size differs from the sequence length; when every batch is as long as the
  sequence, the layers inside a ``batch_first=False`` module are read as ``(T, N, D)``
  and all others as ``(N, T, D)`` (a hand-written sequence-first model then needs a
  ``batch_size`` other than its sequence length). An output with no axis of the batch's
  size in front cannot be read as one row per example: such a layer is left out with a
  warning when chosen by default, and is an error when selected explicitly.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib
import math
import re
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

from lightning_repsim.errors import RepSimValueError, RepSimWarning

__all__ = [
    "Probe",
    "capture",
    "execution_order",
    "reduce_output",
    "select_layers",
    "select_output",
]

# the list first: jsonargparse (LightningCLI) tries a Union's members in order, and str takes a YAML list
LayerSelector = Union[Sequence[Union[str, type]], str, type, None]
# returns Any, not torch.Tensor: jsonargparse (LightningCLI) then resolves a YAML import path to the callable
OutputSelector = Union[Callable[[Any], Any], int, str, None]

_LAYOUTS = ("auto", "conv", "tokens")
_TOKEN_REDUCTIONS = ("mean", "first", "last", "flatten")
_SEQUENCE_TYPES: tuple[type, ...] = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.Transformer,
    nn.RNNBase,  # RNN, LSTM, GRU
    nn.Embedding,
)

# Modules that act on the last axis: a 3-D output of theirs is (N, T, D), features last (the
# nn.Linear and nn.LayerNorm layers of a transformer), never (N, C, L) with channels first.
_LAST_AXIS_TYPES: tuple[type, ...] = (nn.Linear, nn.Bilinear, nn.LayerNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)

_CONTAINER_TYPES = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _unwrap(model: nn.Module) -> nn.Module:
    """Return the wrapped module of a DDP / DataParallel-like wrapper, else ``model``."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _first_calls(model: nn.Module, forward: Callable[[], Any]) -> list[str]:
    """Run ``forward()`` once and return every module path in order of its first call.

    The pass runs in eval mode under ``torch.no_grad``; hooks are removed and every
    module's ``training`` flag is restored exactly, also when ``forward`` raises.
    The root module (name ``""``) is included when it is called.
    """
    named = list(model.named_modules())
    seen: dict[str, None] = {}
    handles = []
    flags = [(m, m.training) for _, m in named]

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if name not in seen:
                seen[name] = None

        return hook

    try:
        for name, module in named:
            handles.append(module.register_forward_pre_hook(make_hook(name)))
        model.eval()
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
    return list(seen)


def execution_order(
    model: nn.Module,
    forward: Callable[[], Any],
    *,
    leaf_only: bool = True,
    with_parameters: bool = True,
    top_level: bool = False,
) -> list[str]:
    """Module paths in the order they first execute during one forward pass.

    ``forward()`` is called once, in eval mode and under ``torch.no_grad``, with temporary
    forward pre-hooks on every submodule; the hooks are removed and every module's
    ``training`` flag is restored exactly afterwards (also if ``forward`` raises), so the
    model's parameters, buffers (e.g. BatchNorm running statistics) and modes are unchanged.
    A module called several times (shared weights) is listed once, at its first call.
    Modules that never execute are omitted. Names are those of ``model.named_modules()``;
    a DDP / DataParallel wrapper is unwrapped first.

    Args:
        model: the network.
        forward: a closure that runs the network once, e.g. ``lambda: model(x)``.
        leaf_only: keep only modules without children.
        with_parameters: keep only modules owning parameters directly (``recurse=False``).
            With ``leaf_only=False, with_parameters=False`` every executed submodule is
            returned (containers included, the root ``""`` excluded).
        top_level: instead return the model's direct children that hold any parameter,
            with ``nn.Sequential`` / ``nn.ModuleList`` / ``nn.ModuleDict`` children expanded
            into their own top-level blocks, ordered by the first execution of any of
            their descendants. ``leaf_only`` and ``with_parameters`` are then ignored.

    Returns:
        Module paths in first-execution order.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.head = nn.Linear(4, 2)
        ...         self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        ...     def forward(self, x):
        ...         return self.head(self.body(x))
        >>> net = Net()
        >>> x = torch.randn(5, 3)
        >>> execution_order(net, lambda: net(x))
        ['body.0', 'head']
        >>> execution_order(net, lambda: net(x), top_level=True)
        ['body.0', 'head']
        >>> execution_order(net, lambda: net(x), leaf_only=False, with_parameters=False)
        ['body', 'body.0', 'body.1', 'head']
    """
    model = _unwrap(model)
    called = _first_calls(model, forward)
    modules = dict(model.named_modules())
    rank = {name: i for i, name in enumerate(called)}

    if top_level:
        candidates: list[str] = []
        for name, child in model.named_children():
            if isinstance(child, _CONTAINER_TYPES):
                candidates.extend(f"{name}.{sub}" for sub, _ in child.named_children())
            else:
                candidates.append(name)
        firsts = []
        for name in candidates:
            if not _has_parameters(modules[name]):
                continue
            prefix = name + "."
            hits = [r for n, r in rank.items() if n == name or n.startswith(prefix)]
            if hits:
                firsts.append((min(hits), name))
        return [name for _, name in sorted(firsts)]

    out = []
    for name in called:
        module = modules[name]
        is_leaf = next(module.children(), None) is None
        if name == "" and not (is_leaf and len(modules) == 1):
            continue  # the root itself, unless the model is a single leaf module
        if leaf_only and not is_leaf:
            continue
        if with_parameters and not _owns_parameters(module):
            continue
        out.append(name)
    return out


# --------------------------------------------------------------------------- selection


def _selector_label(selector: str | type) -> str:
    if isinstance(selector, type):
        return f"{selector.__module__}.{selector.__qualname__}".replace("torch.nn.modules.", "nn.")
    return repr(selector)


_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")


def _module_type(path: str) -> type | None:
    """The ``nn.Module`` subclass that the dotted import path ``path`` names, else None.

    Only a path of two or more identifiers whose top-level package is already imported is
    resolved (``"torch.nn.Linear"``, ``"mypkg.blocks.Block"`` once the model's package is
    loaded): a misspelt layer name never runs a stray ``head.py``. Module paths with an index
    (``"features.0"``) and globs never are.
    """
    if not _IMPORT_PATH.fullmatch(path):
        return None
    parts = path.split(".")
    if parts[0] not in sys.modules:
        return None
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable prefix, then attributes
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except Exception:  # not importable (or failing at import): not a type selector
            continue
        for attr in parts[cut:]:
            found = getattr(found, attr, None)
        return found if isinstance(found, type) and issubclass(found, nn.Module) else None
    return None


def name_matches(name: str, pattern: str) -> bool:
    """Whether a layer name matches ``pattern``: the same name, or an :mod:`fnmatch` glob (a pattern
    with ``*``, ``?`` or ``[``; ``*`` also crosses dots) matching a non-empty name.

    The one rule by which every selector of lightning_repsim matches names: layers, references'
    layers, per-layer layouts, freeze units and the layers of a snapshot store.

    Example:
        >>> name_matches("features.0", "features.*"), name_matches("features.0", "features"), name_matches("", "*")
        (True, False, False)
    """
    if name == pattern:
        return True
    return name != "" and any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(name, pattern)


def select_names(names: Sequence[str], selector: str | Sequence[str] | None, what: str, where: str) -> list[str]:
    """The names matching ``selector`` (a name, a glob, or a non-empty list of them; ``None``: all), in
    the order of ``names``. ``what`` names the argument and ``where`` the names' owner in errors.

    Example:
        >>> select_names(["conv", "block.0", "block.1", "fc"], ["fc", "block.*"], "layers", "the model")
        ['block.0', 'block.1', 'fc']
    """
    if selector is None:
        return list(names)
    patterns = [selector] if isinstance(selector, str) else list(selector)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise RepSimValueError(
            f"{what} must be a layer name, a glob such as 'block.*', or a non-empty list of them "
            f"(None: every layer), got {selector!r}"
        )
    keep: set[str] = set()
    for pattern in patterns:
        hits = {name for name in names if name_matches(name, pattern)}
        if not hits:
            raise RepSimValueError(f"{what}: {pattern!r} matches no layer of {where}; its layers are {list(names)}")
        keep |= hits
    return [name for name in names if name in keep]


def _matches(name: str, module: nn.Module, selector: str | type) -> bool:
    if isinstance(selector, type):
        return isinstance(module, selector)
    return name_matches(name, selector)


def select_layers(model: nn.Module, order: list[str], layers: LayerSelector = None) -> list[str]:
    """Keep the layers of ``order`` that match ``layers``, in the order of ``order``.

    Args:
        model: the network whose ``named_modules()`` names appear in ``order``.
        order: candidate module paths in execution order (from :func:`execution_order`; pass
            ``leaf_only=False, with_parameters=False`` there to let types and globs reach
            parameter-free modules such as ``nn.ReLU`` or whole blocks).
        layers: ``None`` keeps ``order`` as is. Otherwise one selector or a list of them: an
            exact module name, an :mod:`fnmatch` glob (``"features.*"``; note that ``*`` also
            crosses dots, so ``"layer1.*"`` matches blocks and their submodules, while
            ``"layer1.?"`` matches blocks only), or an ``nn.Module`` subclass (``nn.Conv2d``),
            matched with ``isinstance``. A module matching several selectors appears once.
            A string is a module type when it is the dotted import path of an ``nn.Module``
            subclass (``"torch.nn.Linear"``, ``"mypkg.blocks.Block"``: the way YAML configs name
            types) and not the name of one of ``model``'s modules; it is only imported when it
            names no module and consists of identifiers joined by dots, so module names
            (``"features.0"``, ``"encoder"``) and globs (``"encoder.*"``) are never imported.

    Returns:
        The selected module paths, in the order of ``order``.

    Raises:
        RepSimValueError: a selector matches none of ``order``; the message lists them.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
        >>> order = ["0", "1", "2", "3"]
        >>> select_layers(net, order, [nn.Conv2d, "3"])
        ['0', '3']
        >>> select_layers(net, order, "[01]")
        ['0', '1']
        >>> select_layers(net, order, ["torch.nn.ReLU", "torch.nn.Linear"])
        ['1', '3']
    """
    if layers is None:
        return list(order)
    selectors = [layers] if isinstance(layers, (str, type)) else list(layers)
    if not selectors:
        raise RepSimValueError("`layers` is an empty list; pass None for the default layers.")
    modules = dict(_unwrap(model).named_modules())
    keep: set[str] = set()
    for selector in selectors:
        if not isinstance(selector, (str, type)):
            raise RepSimValueError(
                f"Layer selector {selector!r} is neither a module name, a glob pattern nor an "
                "nn.Module type."
            )
        matcher = selector
        if isinstance(selector, str) and selector not in modules:
            matcher = _module_type(selector) or selector
        hits = {n for n in order if n in modules and _matches(n, modules[n], matcher)}
        if not hits:
            named = [n for n in order if n] or list(order)  # the root '' only if alone
            label = _selector_label(selector)
            if matcher is not selector:
                label += f" ({_selector_label(matcher)})"
            elif isinstance(selector, str) and _IMPORT_PATH.fullmatch(selector):
                label += " (no module of that name, nor the import path of an nn.Module subclass)"
            raise RepSimValueError(
                f"Layer selector {label} matched no executed module; "
                f"available layers: {', '.join(repr(n) for n in named) or '(none)'}."
            )
        keep |= hits
    return [n for n in order if n in keep]


def _first_tensor(obj: Any) -> torch.Tensor | None:
    """Depth-first search for the first tensor in nested tuples/lists/mappings/dataclasses."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        values: Any = obj.values()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        values = (getattr(obj, f.name) for f in dataclasses.fields(obj))
    elif isinstance(obj, (tuple, list)):
        values = obj
    else:
        return None
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _get_key(obj: Any, key: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def select_output(output: Any, selector: OutputSelector = None, *, name: str = "") -> torch.Tensor:
    """The tensor of a module's output that stands for the layer's representation.

    * a tensor → itself;
    * a callable ``selector`` → ``selector(output)``, for any output;
    * a tuple / list → ``output[selector]`` when ``selector`` is an int, else its first tensor
      (depth first). RNN / LSTM / GRU outputs ``(output, h)`` / ``(output, (h, c))`` therefore
      give ``output``, ``nn.MultiheadAttention`` gives the attention output;
    * a mapping or dataclass-like object (Hugging Face ``ModelOutput``) → the key ``selector``
      when it is a string, else ``last_hidden_state`` when present, else its first tensor.

    Args:
        output: what the module's forward returned.
        selector: ``None``, an int index, a str key, or a callable ``output -> Tensor``.
        name: the layer's path, for error messages.

    Returns:
        The selected tensor (not yet reduced).

    Raises:
        RepSimValueError: no tensor can be found, or the selector does not give one.

    Example:
        >>> import torch
        >>> h = torch.zeros(2, 3)
        >>> select_output((h, (torch.ones(1), torch.ones(1)))) is h
        True
        >>> select_output({"logits": torch.ones(2), "last_hidden_state": h}) is h
        True
        >>> select_output({"logits": torch.ones(2), "hidden": h}, "hidden") is h
        True
    """
    if callable(selector):
        chosen = selector(output)
    elif isinstance(output, torch.Tensor):
        chosen = output
    elif isinstance(selector, int) and isinstance(output, (tuple, list)):
        chosen = output[selector]
    elif isinstance(output, (tuple, list)):
        chosen = _first_tensor(output)
    else:
        chosen = None
        if isinstance(selector, str):
            chosen = _get_key(output, selector)
        if chosen is None:
            chosen = _get_key(output, "last_hidden_state")
        if chosen is None:
            chosen = _first_tensor(output)
    if not isinstance(chosen, torch.Tensor):
        raise RepSimValueError(
            f"Layer {name!r}: cannot find a tensor in its output of type "
            f"{type(output).__name__} with output_selector={selector!r}; pass an "
            "`output_selector` (int index, key, or callable returning a tensor)."
        )
    return chosen


# --------------------------------------------------------------------------- reduction


def _batch_first(module: nn.Module | None) -> bool:
    """Whether a sequence module's 3-D outputs are (N, T, D); False means (T, N, D)."""
    if module is None:
        return True
    flag = getattr(module, "batch_first", None)
    if flag is None and isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return _batch_first(module.layers[0]) if len(module.layers) else True
    if flag is None and isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        flag = getattr(module.self_attn, "batch_first", None)  # the layers keep it on their attention only
    return True if flag is None else bool(flag)


def _examples_axis(output: torch.Tensor, rows: int, module: nn.Module) -> int | None:
    """Where a layer's output keeps the batch's ``rows`` examples: 0, 1 for a 3-D ``(T, N, D)``
    output inside a sequence-first model, None when both axes have that size, -1 when neither.

    Sequence modules with ``batch_first=False`` are transposed by :func:`reduce_output` itself,
    so for them the question is asked of the transposed output and the answer is 0 or -1.
    """
    if output.ndim == 0:
        return 0  # reduce_output says why a scalar will not do
    own = output.ndim == 3 and isinstance(module, _SEQUENCE_TYPES) and not _batch_first(module)
    seen = output.transpose(0, 1) if own else output
    first = seen.shape[0] == rows
    second = seen.ndim == 3 and seen.shape[1] == rows and not own
    if first and second:
        return None
    return 0 if first else 1 if second else -1


def _inside_sequence_first(name: str, modules: Mapping[str, nn.Module]) -> bool:
    """Whether a module path lies inside a ``batch_first=False`` sequence module (its ancestors)."""
    parts = name.split(".")
    ancestors = (modules.get(".".join(parts[:i])) for i in range(len(parts)))
    return any(isinstance(m, _SEQUENCE_TYPES) and not _batch_first(m) for m in ancestors if m is not None)


def _resolve_layout(layout: str, module: nn.Module | None, ndim: int) -> str:
    if layout != "auto":
        return layout
    if ndim == 3 and isinstance(module, _SEQUENCE_TYPES + _LAST_AXIS_TYPES):
        return "tokens"
    return "conv"


def _pool_sizes(channels: int, spatial: Sequence[int], max_features: int) -> list[int] | None:
    """Largest common side s with C * prod(min(s, S_d)) <= max_features; None if C is too wide."""
    if channels * math.prod(spatial) <= max_features:
        return list(spatial)
    if channels > max_features:
        return None
    lo, hi = 1, max(spatial)  # s = 1 always fits here; find the largest s that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if channels * math.prod(min(mid, d) for d in spatial) <= max_features:
            lo = mid
        else:
            hi = mid - 1
    return [min(lo, d) for d in spatial]


def _adaptive_avg_pool(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    if list(x.shape[2:]) == sizes:
        return x
    if len(sizes) == 1:
        return F.adaptive_avg_pool1d(x, sizes)
    if len(sizes) == 2:
        return F.adaptive_avg_pool2d(x, sizes)
    if len(sizes) == 3:
        return F.adaptive_avg_pool3d(x, sizes)
    # more than 3 spatial dims: treat them as one long axis
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    return F.adaptive_avg_pool1d(flat, min(sizes[0], flat.shape[-1]))


def _upcast(x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    if x.is_complex():
        raise RepSimValueError(
            f"Complex outputs ({x.dtype}) are not supported; select the real part."
        )
    if not x.is_floating_point() or x.element_size() < 4:
        x = x.to(torch.float32)
    return x


def reduce_output(
    output: torch.Tensor,
    *,
    module: nn.Module | None = None,
    name: str = "",
    layout: str = "auto",
    token_reduction: str = "mean",
    max_features: int = 4096,
    _warned: set[str] | None = None,
) -> torch.Tensor:
    """Map one layer's output ``(N, *)`` to features ``(N, p)``: rows are examples.

    The output is detached and upcast to at least float32 (fp16 / bf16 / integers → float32,
    float64 stays), and stays on its device. Then, by layout (see the module docstring for
    the ``"auto"`` rule and for ``batch_first=False`` sequence modules):

    * ``(N,)`` → ``(N, 1)``; ``(N, p)`` → as is, whatever the layout.
    * ``"conv"``, ``(N, C, *S)``: flattened as is when ``C * prod(S) <= max_features``, else
      adaptive average pooling of each spatial dim to ``min(s, S_d)`` for the largest ``s``
      that fits, then flattened channel-major. When ``C > max_features`` global average
      pooling is kept (``p = C``) and a :class:`~lightning_repsim.errors.RepSimWarning`
      naming the layer is issued (once per layer when ``_warned`` is shared).
    * ``"tokens"``, ``(N, T, *D)`` (trailing dims flattened into ``D``): ``token_reduction``
      ``"mean"`` over tokens, ``"first"`` or ``"last"`` token, or ``"flatten"`` →
      ``(N, T * D)`` (not capped; a warning names the layer if wider than ``max_features``).

    Args:
        output: the selected output tensor.
        module: the module that produced it (decides ``"auto"`` and ``batch_first``).
        name: the layer's path, for warnings and errors.
        layout: ``"auto"``, ``"conv"`` or ``"tokens"``.
        token_reduction: ``"mean"``, ``"first"``, ``"last"`` or ``"flatten"``.
        max_features: the cap on ``p`` for conv maps.

    Returns:
        A ``(N, p)`` tensor.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> reduce_output(torch.randn(2, 16, 32, 32), max_features=4096).shape  # 16*16*16
        torch.Size([2, 4096])
        >>> reduce_output(torch.randn(2, 8, 5), module=nn.Conv1d(3, 8, 1)).shape
        torch.Size([2, 40])
        >>> lstm = nn.LSTM(4, 6, batch_first=True)
        >>> reduce_output(torch.randn(2, 7, 6), module=lstm).shape  # mean over 7 tokens
        torch.Size([2, 6])
        >>> reduce_output(torch.randn(2, 7, 6), layout="tokens", token_reduction="flatten").shape
        torch.Size([2, 42])
        >>> reduce_output(torch.randn(2, 3, dtype=torch.float16)).dtype
        torch.float32
    """
    x = _upcast(output)
    if x.ndim == 3 and not _batch_first(module) and isinstance(module, _SEQUENCE_TYPES):
        x = x.transpose(0, 1)
    if x.ndim == 0:
        raise RepSimValueError(
            f"Layer {name!r} returned a scalar; a layer output needs one row per example."
        )
    if x.ndim == 1:
        return x.unsqueeze(1)
    if x.ndim == 2:
        return x
    kind = _resolve_layout(layout, module, x.ndim)
    n = x.shape[0]
    if kind == "tokens":
        x = x.reshape(n, x.shape[1], -1)
        if token_reduction == "mean":
            return x.mean(dim=1)
        if token_reduction == "first":
            return x[:, 0]
        if token_reduction == "last":
            return x[:, -1]
        if x.shape[1] * x.shape[2] > max_features and _warn_once(_warned, name):
            warnings.warn(
                f"Layer {name!r}: flattening {tuple(x.shape[1:])} tokens gives "
                f"{x.shape[1] * x.shape[2]} features > max_features={max_features}; "
                "consider token_reduction='mean'.",
                RepSimWarning,
                stacklevel=2,
            )
        return x.reshape(n, -1)
    channels, spatial = x.shape[1], list(x.shape[2:])
    sizes = _pool_sizes(channels, spatial, max_features)
    if sizes is None:
        if _warn_once(_warned, name):
            warnings.warn(
                f"Layer {name!r} has {channels} channels > max_features={max_features}; "
                f"using global average pooling (p={channels}). Raise max_features to keep "
                "spatial detail, or select fewer layers.",
                RepSimWarning,
                stacklevel=2,
            )
        sizes = [1] * len(spatial)
    return _adaptive_avg_pool(x, sizes).reshape(n, -1)


def _warn_once(warned: set[str] | None, name: str) -> bool:
    if warned is None:
        return True
    if name in warned:
        return False
    warned.add(name)
    return True


# --------------------------------------------------------------------------- probe set


class Probe:
    """A fixed set of probe inputs, materialised once on the CPU and hashed.

    Rows (dim 0) are examples. Accepted sources:

    * a tensor;
    * an ``(x, y)`` tuple (``x`` is used);
    * a list of tensors — batches, concatenated along dim 0;
    * a ``DataLoader`` (or any iterable of batches) — iterated once; of each batch the
      tensor itself, or its first element when it is a tuple / list (``(x, y)`` batches),
      or its ``"input"`` / ``"x"`` / first tensor value when it is a mapping. The global
      CPU RNG state is restored afterwards, so building a probe does not shift training's
      random stream (a shuffling loader still gives a different probe each time: pass
      ``shuffle=False`` for a fixed probe).

    Args:
        data: one of the sources above, or another :class:`Probe` (copied).
        max_examples: keep only the first ``max_examples`` examples (stops iterating early).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> x = torch.arange(12.0).reshape(6, 2)
        >>> loader = DataLoader(TensorDataset(x, torch.zeros(6)), batch_size=4)
        >>> probe = Probe(loader, max_examples=5)
        >>> len(probe), probe.inputs.shape
        (5, torch.Size([5, 2]))
        >>> [b.shape[0] for b in probe.batches(2)]
        [2, 2, 1]
        >>> probe.hash == Probe(x[:5]).hash
        True
    """

    def __init__(self, data: Any, *, max_examples: int | None = None) -> None:
        if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
            raise RepSimValueError(f"max_examples must be a positive int, got {max_examples!r}.")
        inputs = self._materialise(data, max_examples)
        if inputs.ndim == 0:
            raise RepSimValueError("A probe needs a batch dimension; got a 0-d tensor.")
        if max_examples is not None:
            inputs = inputs[:max_examples]
        if inputs.shape[0] == 0:
            raise RepSimValueError("The probe set is empty.")
        self._inputs = inputs.detach().cpu().contiguous()
        self._on_device: dict[torch.device, torch.Tensor] = {}
        self._hash: str | None = None

    @staticmethod
    def _batch_inputs(batch: Any) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):
            return batch
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            return batch[0]
        if isinstance(batch, Mapping):
            for key in ("input", "inputs", "x"):
                if isinstance(batch.get(key), torch.Tensor):
                    return batch[key]
            found = _first_tensor(batch)
            if found is not None:
                return found
        raise RepSimValueError(
            f"Cannot find the inputs in a probe batch of type {type(batch).__name__}; pass a "
            "tensor, (x, y) batches, or materialise the inputs yourself."
        )

    @classmethod
    def _materialise(cls, data: Any, max_examples: int | None) -> torch.Tensor:
        if isinstance(data, Probe):
            return data.inputs
        if isinstance(data, torch.Tensor):
            return data
        if isinstance(data, tuple) and data and isinstance(data[0], torch.Tensor):
            return data[0]
        if isinstance(data, list) and data and all(isinstance(t, torch.Tensor) for t in data):
            return torch.cat([t.detach().cpu() for t in data])
        if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
            raise RepSimValueError(
                f"Cannot build a probe set from {type(data).__name__}; pass a tensor, an "
                "(x, y) tuple, a list of tensors or a DataLoader."
            )
        chunks, count = [], 0
        # iterating a DataLoader draws a seed from the global RNG: keep the training stream intact
        with torch.random.fork_rng(devices=[]):
            for batch in data:
                x = cls._batch_inputs(batch).detach().cpu()
                chunks.append(x)
                count += x.shape[0]
                if max_examples is not None and count >= max_examples:
                    break
        if not chunks:
            raise RepSimValueError("The probe data loader yielded no batches.")
        return torch.cat(chunks)

    @property
    def inputs(self) -> torch.Tensor:
        """The probe inputs, ``(n, *)``, on the CPU."""
        return self._inputs

    def __len__(self) -> int:
        return self._inputs.shape[0]

    def __repr__(self) -> str:
        shape, dtype = tuple(self._inputs.shape), self._inputs.dtype
        return f"Probe(n={len(self)}, shape={shape}, dtype={dtype})"

    def to(self, device: torch.device | str) -> torch.Tensor:
        """The inputs on ``device``; copied once per device and cached."""
        device = torch.device(device)
        if device.type == "cpu":
            return self._inputs
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._on_device:
            self._on_device[device] = self._inputs.to(device)
        return self._on_device[device]

    @property
    def hash(self) -> str:
        """sha256 hex digest of dtype, shape and the raw bytes of the inputs.

        Deterministic across runs and (little-endian) machines for the same data; any change
        of a value, the shape or the dtype changes it.
        """
        if self._hash is None:
            digest = hashlib.sha256()
            header = f"lightning_repsim.Probe/v1|{self._inputs.dtype}|{tuple(self._inputs.shape)}|"
            digest.update(header.encode())
            flat = self._inputs.reshape(-1)
            if flat.dtype == torch.bool:
                flat = flat.to(torch.uint8)
            raw = flat.view(torch.uint8).numpy()
            step = 1 << 24
            for start in range(0, raw.shape[0], step):
                digest.update(memoryview(raw[start : start + step]))
            self._hash = digest.hexdigest()
        return self._hash

    def batches(
        self, batch_size: int | None = None, device: torch.device | str | None = None
    ) -> Iterator[torch.Tensor]:
        """Consecutive slices of ``batch_size`` examples (all at once when None)."""
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise RepSimValueError(
                f"batch_size must be a positive int or None, got {batch_size!r}."
            )
        inputs = self._inputs if device is None else self.to(device)
        step = len(self) if batch_size is None else batch_size
        for start in range(0, len(self), step):
            yield inputs[start : start + step]


# --------------------------------------------------------------------------- capture


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _parameter_holders(modules: dict[str, nn.Module]) -> dict[str, set[str]]:
    """Modules holding any parameter, each with its descendants that also hold one."""
    holders = [n for n, m in modules.items() if _has_parameters(m)]
    return {
        name: {d for d in holders if d != name and (name == "" or d.startswith(name + "."))}
        for name in holders
    }


def _check_reduction(
    max_features: Any, layout: Any, token_reduction: Any
) -> dict[str, str]:
    """Validate the reduction arguments of :func:`capture`; ``{layer or glob: layout}``."""
    if not isinstance(max_features, int) or max_features < 1:
        raise RepSimValueError(f"max_features must be a positive int, got {max_features!r}.")
    layouts = dict(layout) if isinstance(layout, Mapping) else {"*": layout}
    for value in layouts.values():
        if not isinstance(value, str) or value not in _LAYOUTS:
            raise RepSimValueError(f"layout must be one of {_LAYOUTS}, got {value!r}.")
    if not isinstance(token_reduction, str) or token_reduction not in _TOKEN_REDUCTIONS:
        raise RepSimValueError(
            f"token_reduction must be one of {_TOKEN_REDUCTIONS}, got {token_reduction!r}."
        )
    return layouts


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
    layouts = _check_reduction(max_features, layout, token_reduction)
    model = _unwrap(model)
    probe = probe_or_tensor if isinstance(probe_or_tensor, Probe) else Probe(probe_or_tensor)
    device = _model_device(model)
    # validates batch_size before any hook is placed; a Probe copies itself to the device once
    batches = probe.batches(batch_size, device=device)

    modules = dict(model.named_modules())
    if layers is None:
        # the deepest executed modules holding parameters, decided during the first batch
        deeper = _parameter_holders(modules)
        selected = list(deeper)
        if not selected:
            raise RepSimValueError(
                "The model has no parameters, so there is no default layer; pass `layers` "
                f"(available: {', '.join(repr(n) for n in modules if n) or repr('')})."
            )
    else:
        deeper = {}
        selected = select_layers(model, list(modules), layers)

    def layout_of(name: str) -> str:
        for pattern, value in layouts.items():
            if pattern == "*" or name_matches(name, pattern):
                return value
        return "auto"

    first_call: dict[str, int] = {}  # order of first *start* (pre-hook), containers first
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in selected}
    seen_this_batch: set[str] = set()
    warned: set[str] = set()
    superseded: set[str] = set()  # default layers with an executed parameter-holding descendant
    misshapen: dict[str, tuple[int, ...]] = {}  # default layers without one row per example
    batch_rows = [0]  # examples in the batch being run, for the hooks
    examples_axis: dict[str, int] = {}  # 0: (N, ...); 1: (T, N, ...) inside a sequence-first model
    # chunks with T == N, until a batch tells: (index, (features read on axis 0, on axis 1))
    undecided: dict[str, list[tuple[int, tuple[torch.Tensor, torch.Tensor]]]] = {}

    def make_pre_hook(name: str) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: Any) -> None:
            first_call.setdefault(name, len(first_call))

        return pre_hook

    def make_hook(name: str) -> Callable[..., None]:
        descendants = deeper.get(name, ())
        name_layout = layout_of(name)

        def reduced(module: nn.Module, x: torch.Tensor, axis: int) -> torch.Tensor:
            return reduce_output(x.transpose(0, 1) if axis == 1 else x, module=module, name=name,
                                 layout=name_layout, token_reduction=token_reduction,
                                 max_features=max_features, _warned=warned)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name in seen_this_batch or name in superseded:
                return  # shared module: its first call per forward wins
            seen_this_batch.add(name)
            if any(d in first_call for d in descendants):
                superseded.add(name)
                return
            tensor = select_output(output, output_selector, name=name)
            rows = batch_rows[0]
            axis = _examples_axis(tensor, rows, module)
            if axis == -1:
                if layers is not None:
                    raise RepSimValueError(
                        f"Layer {name!r} gave an output of shape {tuple(tensor.shape)} for a batch of "
                        f"{rows} examples: no leading axis of {rows} rows, one per example. Select "
                        "other layers, or an output_selector / forward that yields (N, ...) outputs."
                    )
                misshapen[name] = tuple(tensor.shape)
                return
            decided = examples_axis.get(name)
            if axis is None and decided is None:  # T == N: keep both readings until a batch tells
                chunks[name].append(None)
                both = (reduced(module, tensor, 0), reduced(module, tensor, 1))
                undecided.setdefault(name, []).append((len(chunks[name]) - 1, both))
                return
            if axis is not None and decided is not None and axis != decided:
                raise RepSimValueError(
                    f"Layer {name!r} gave outputs whose examples lie on axis {decided} in one batch and "
                    f"on axis {axis} in another ({tuple(tensor.shape)} for {rows} examples); pass a "
                    "forward that yields (N, ...) outputs."
                )
            if decided is None:
                decided = examples_axis[name] = axis
                for index, both in undecided.pop(name, []):
                    chunks[name][index] = both[decided]
            chunks[name].append(reduced(module, tensor, decided))

        return hook

    flags = [(m, m.training) for m in modules.values()]
    handles = []
    try:
        for name in selected:
            handles.append(modules[name].register_forward_pre_hook(make_pre_hook(name)))
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        model.eval()
        with torch.no_grad():
            for batch in batches:
                batch = batch.clone()  # a forward that changes its input in place must not change the probe
                seen_this_batch.clear()
                batch_rows[0] = batch.shape[0]
                if forward is None:
                    model(batch)
                else:
                    forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag

    never = [n for n in selected if n not in first_call]
    if never and layers is not None:
        warnings.warn(
            f"Selected layers never executed during the forward pass and are left out: {never}.",
            RepSimWarning,
            stacklevel=2,
        )
    for name, pending in undecided.items():  # every batch had T == N: the model's structure decides
        axis = 1 if _inside_sequence_first(name, modules) else 0
        for index, both in pending:
            chunks[name][index] = both[axis]
    if misshapen:
        warnings.warn(
            "Layers left out because their outputs have no leading axis of one row per example: "
            + ", ".join(f"{n!r} {shape}" for n, shape in misshapen.items())
            + ". Select layers explicitly, or pass an output_selector / forward that yields (N, ...) outputs.",
            RepSimWarning,
            stacklevel=2,
        )
    result: dict[str, torch.Tensor] = {}
    for name in sorted(first_call, key=first_call.__getitem__):
        if name in superseded or name in misshapen:
            continue
        parts = chunks[name]
        if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
            raise RepSimValueError(
                f"Layer {name!r} gave features of different widths across probe batches "
                f"({[tuple(p.shape) for p in parts]}); use equal-length inputs or a token "
                "reduction other than 'flatten'."
            )
        result[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return result
