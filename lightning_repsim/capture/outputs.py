"""How a layer's output becomes ``(n, p)`` features: which tensor of the output, then one reduction rule.

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
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_repsim.errors import RepSimValueError, RepSimWarning

__all__ = ["OutputSelector", "check_reduction", "first_tensor", "reduce_output", "select_output"]

# returns Any, not torch.Tensor: jsonargparse (LightningCLI) then resolves a YAML import path to the callable
OutputSelector = Callable[[Any], Any] | int | str | None

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


def first_tensor(obj: Any) -> torch.Tensor | None:
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
        found = first_tensor(value)
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
        chosen = first_tensor(output)
    else:
        chosen = None
        if isinstance(selector, str):
            chosen = _get_key(output, selector)
        if chosen is None:
            chosen = _get_key(output, "last_hidden_state")
        if chosen is None:
            chosen = first_tensor(output)
    if not isinstance(chosen, torch.Tensor):
        raise RepSimValueError(
            f"Layer {name!r}: cannot find a tensor in its output of type "
            f"{type(output).__name__} with output_selector={selector!r}; pass an "
            "`output_selector` (int index, key, or callable returning a tensor)."
        )
    return chosen


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
    kernel = [d // s for d, s in zip(x.shape[2:], sizes, strict=True)]
    if 1 <= len(sizes) <= 3 and all(
        s > 1 and k * s == d and k & (k - 1) == 0 for d, s, k in zip(x.shape[2:], sizes, kernel, strict=True)
    ):
        # Equal windows of a power-of-two side, and more than one per axis: plain average pooling sums and
        # divides as the adaptive kernel does (the same numbers, bit for bit, on CPU; tested), up to 10x
        # faster (a 32 x 32 map pooled to 4 x 4). Other windows keep the adaptive kernel, whose rounding
        # differs from it there.
        pool: Any = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(sizes) - 1]
        return pool(x, kernel, kernel)
    if len(sizes) == 1:
        return F.adaptive_avg_pool1d(x, sizes)
    if len(sizes) == 2:
        return F.adaptive_avg_pool2d(x, (sizes[0], sizes[1]))
    if len(sizes) == 3:
        return F.adaptive_avg_pool3d(x, (sizes[0], sizes[1], sizes[2]))
    # more than 3 spatial dims: treat them as one long axis
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    return F.adaptive_avg_pool1d(flat, min(sizes[0], flat.shape[-1]))


def _upcast(x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    if x.is_complex():
        raise RepSimValueError(f"Complex outputs ({x.dtype}) are not supported; select the real part.")
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
    float64 stays), and stays on its device. The result never shares memory with ``output``: a
    later in-place operation of the model (``nn.ReLU(inplace=True)``, a residual ``out +=
    identity``) cannot change what was recorded; a copy is made only where the reduction itself
    did not make one (a 2-D output, a flatten or token view). Then, by layout (see the module docstring for
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
    features = _reduce(output, module, name, layout, token_reduction, max_features, _warned)
    return features.clone() if _shares_memory(features, output) else features


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` is (a view of) ``b``'s storage, so that writing into ``b`` would change ``a``."""
    if a.numel() == 0:
        return False
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _reduce(
    output: torch.Tensor,
    module: nn.Module | None,
    name: str,
    layout: str,
    token_reduction: str,
    max_features: int,
    _warned: set[str] | None,
) -> torch.Tensor:
    x = _upcast(output)
    if x.ndim == 3 and not _batch_first(module) and isinstance(module, _SEQUENCE_TYPES):
        x = x.transpose(0, 1)
    if x.ndim == 0:
        raise RepSimValueError(f"Layer {name!r} returned a scalar; a layer output needs one row per example.")
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
                stacklevel=3,
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
                stacklevel=3,
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


def check_reduction(max_features: Any, layout: Any, token_reduction: Any) -> dict[str, str]:
    """Validate the reduction arguments of :func:`capture`; ``{layer or glob: layout}``."""
    if not isinstance(max_features, int) or max_features < 1:
        raise RepSimValueError(f"max_features must be a positive int, got {max_features!r}.")
    layouts = dict(layout) if isinstance(layout, Mapping) else {"*": layout}
    for value in layouts.values():
        if not isinstance(value, str) or value not in _LAYOUTS:
            raise RepSimValueError(f"layout must be one of {_LAYOUTS}, got {value!r}.")
    if not isinstance(token_reduction, str) or token_reduction not in _TOKEN_REDUCTIONS:
        raise RepSimValueError(f"token_reduction must be one of {_TOKEN_REDUCTIONS}, got {token_reduction!r}.")
    return layouts
