"""The blocks people reason about: the default layers of the monitor and the default units of freezing.

One rule, applied to the modules in the order they first run in one forward pass
(:func:`~lightning_repsim.capture.layers.execution_order`):

* **Repeated blocks.** Each member of a ``ModuleList`` / ``Sequential`` / ``ModuleDict`` holding two
  or more modules of the same class that have submodules (transformer layers, ResNet blocks) is one
  block, named by its path (``"encoder.layers.3"``, ``"layer2.1"``); its output is the member's output.
* **Conv / linear groups.** Any other module is looked into down to its leaves (a module whose
  parameterised children never run, such as ``nn.MultiheadAttention``, counts as a leaf). A leaf
  with parameters (a conv, a linear, an RNN...) opens a group, and the normalisation, activation
  and dropout modules of the same parent module that run right after it join that group; anything
  else closes it. Token and position embeddings that run one after the other form one group (their
  sum, as the following norm or dropout sees it). A normalisation that runs with no group open to
  it (a final ``LayerNorm`` after the transformer blocks) opens a group that the next conv / linear
  joins: it goes with the head.
* **Names and outputs.** A group is named by the outermost module that holds its conv / linear /
  first embedding (its norm when it has none) and nothing outside the group, and its output is
  the output of its *last* module: in a flat ``nn.Sequential``, row ``"features.0"`` of a
  conv → BatchNorm → ReLU group is the ReLU's output, and the three freeze together as unit
  ``"features.0"``. When a group is exactly the modules of one module (a ``Conv2dNormActivation``,
  ``BertEmbeddings``, a wrapped ``nn.Sequential(nn.Linear, nn.ReLU)``), the block is that module and
  its output is that module's output.
* Modules that never run, groups without parameters and parameters held directly by a module with
  children (the LightningModule's own ``nn.Parameter``) belong to no block. Pooling, flattening
  and other parameter-free modules that are neither a normalisation, an activation nor dropout
  belong to no block (they close the open group).

An explicitly named layer (``layers=["features.0"]``) is that module's own output, as always; blocks
are what the defaults choose.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

from lightning_repsim.capture.layers import _first_calls, _has_parameters, _unwrap
from lightning_repsim.capture.outputs import _LAST_AXIS_TYPES, _SEQUENCE_TYPES
from lightning_repsim.errors import RepSimValueError

__all__ = ["Block", "default_blocks", "no_block_error", "reads_tokens"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_NORMS: tuple[type, ...] = (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    _NORMS += (nn.RMSNorm,)
_TOKEN_TYPES = _SEQUENCE_TYPES + _LAST_AXIS_TYPES


@dataclass(frozen=True)
class Block:
    """One block: its ``name`` (row of the heatmaps, unit of freezing), the module paths it holds
    (``modules``: what freezes together), and the module whose output stands for the block."""

    name: str
    modules: tuple[str, ...]
    output: str


def no_block_error(model: nn.Module, argument: str) -> RepSimValueError:
    """The configuration error for a model in which no block holds parameters."""
    return RepSimValueError(
        f"no layer with parameters found in {type(model).__name__} (no module with parameters runs in its "
        f"forward pass, apart from the model's own parameters); pass {argument}=[...] naming the modules to use."
    )


def reads_tokens(model: nn.Module, block: Block) -> bool:
    """Whether a 3-D output of ``block`` is read as tokens ``(N, T, D)`` under ``layout="auto"``: the block
    holds a sequence module, an embedding or a module acting on the last axis (``nn.Linear``,
    ``nn.LayerNorm``: a transformer's) and no convolution or batch / instance norm (a 1-d conv net's
    ``(N, C, L)``)."""
    model = _unwrap(model)
    inside = [m for path in block.modules for m in model.get_submodule(path).modules()]
    if any(isinstance(m, (_ConvNd, _NormBase)) for m in inside):
        return False
    return any(isinstance(m, _TOKEN_TYPES) or _is_embedding(m) or _is_norm(m) for m in inside)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) or type(module).__name__.endswith("Norm")


def _is_embedding(module: nn.Module) -> bool:
    """A learned embedding (a parameter-free "RotaryEmbedding" computing sines is none)."""
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or (
        "Embedding" in type(module).__name__ and _has_parameters(module)
    )


def _is_follower(module: nn.Module) -> bool:
    """A module that joins the open group: a normalisation, an activation or dropout."""
    if _is_norm(module) or isinstance(module, (_DropoutNd, nn.Dropout)):
        return True
    return "activation" in type(module).__module__.lower() and not _has_parameters(module)


def _is_stack(module: nn.Module) -> bool:
    """A container of repeated blocks: two or more members of one class that have submodules."""
    if not isinstance(module, _CONTAINERS):
        return False
    classes = [type(c) for c in module.children() if next(c.children(), None) is not None]
    return any(classes.count(cls) >= 2 for cls in set(classes))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _items(path: str, module: nn.Module, ran: set[str], param_ran: set[str]) -> Iterator[tuple[str, str]]:
    """``("block", path)`` for the members of stacks, ``("leaf", path)`` for the leaves, recursively."""
    stack = _is_stack(module)
    for name, child in module.named_children():
        child_path = _join(path, name)
        if child_path not in ran:
            continue
        inner_ran = any(p.startswith(child_path + ".") for p in param_ran)
        if stack and next(child.children(), None) is not None:
            yield "block", child_path
        elif next(child.children(), None) is None or not inner_ran:
            yield "leaf", child_path
        else:
            yield from _items(child_path, child, ran, param_ran)


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _groups(items: Sequence[tuple[str, str]], modules: dict[str, nn.Module]) -> list[tuple[str, list[str]]]:
    """Group the leaves (see the module docstring): ``(kind, members)`` with kind ``"block"`` or ``"group"``."""
    groups: list[tuple[str, list[str]]] = []
    open_: list[str] = []  # the open group's members
    core: str | None = None  # "core", "embedding", or None for a group opened by a norm
    home = ""  # the module holding the group's first module: followers join from there only

    def close() -> None:
        nonlocal open_, core
        if open_:
            groups.append(("group", open_))
        open_, core = [], None

    for kind, path in items:
        module = modules[path]
        if kind == "block":
            close()
            groups.append(("block", [path]))
        elif _is_embedding(module):
            if core == "embedding" and _is_embedding(modules[open_[-1]]) and _parent(path) == home:
                open_.append(path)
            else:
                close()
                open_, core, home = [path], "embedding", _parent(path)
        elif _is_follower(module):
            if open_ and _parent(path) == home:
                open_.append(path)
            elif _is_norm(module) and _has_parameters(module):
                close()
                open_, core, home = [path], None, _parent(path)
            else:
                close()
        elif _has_parameters(module):
            if open_ and core is None:  # a norm with nothing before it: the conv / linear it precedes joins it
                open_.append(path)
                core, home = "core", _parent(path)
            else:
                close()
                open_, core, home = [path], "core", _parent(path)
        else:
            close()
    close()
    return groups


def default_blocks(model: nn.Module, forward: Callable[[], Any]) -> list[Block]:
    """The model's blocks with parameters, in execution order (the rule of :mod:`.blocks`).

    ``forward()`` runs once in eval mode without gradients (see
    :func:`~lightning_repsim.capture.execution_order`); modes, parameters and buffers are unchanged.
    A DDP / DataParallel wrapper is unwrapped. The model's root is never a block.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(8, 2))
        >>> [(b.name, b.modules, b.output) for b in default_blocks(net, lambda: net(torch.randn(2, 3, 8, 8)))]
        [('0', ('0', '1', '2'), '2'), ('5', ('5',), '5')]
        >>> layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        >>> encoder = nn.Sequential(nn.Embedding(10, 16), nn.TransformerEncoder(layer, 2), nn.Linear(16, 3))
        >>> [b.name for b in default_blocks(encoder, lambda: encoder(torch.randint(0, 10, (2, 5))))]
        ['0', '1.layers.0', '1.layers.1', '2']
    """
    model = _unwrap(model)
    called = _first_calls(model, forward)
    rank = {name: i for i, name in enumerate(called)}
    modules = dict(model.named_modules())
    for name in called:  # a ModuleList never runs itself: it runs when a member does
        parts = name.split(".")
        for cut in range(1, len(parts)):
            rank.setdefault(".".join(parts[:cut]), rank[name])
    ran = set(rank)
    param_ran = {n for n in called if n and _has_parameters(modules[n])}
    items = sorted(_items("", model, ran, param_ran), key=lambda item: rank[item[1]])
    paths = [path for _, path in items]

    blocks = []
    for kind, members in _groups(items, modules):
        if not any(_has_parameters(modules[m]) for m in members):
            continue
        if kind == "block":
            blocks.append(Block(members[0], (members[0],), members[0]))
            continue
        named = next((m for m in members if not _is_norm(modules[m])), members[0])
        outer, exact = _outermost(named, members, paths)
        if exact:
            blocks.append(Block(outer, (outer,), outer))
        else:
            blocks.append(Block(outer, tuple(members), members[-1]))
    return blocks


def _outermost(named: str, members: list[str], paths: list[str]) -> tuple[str, bool]:
    """The outermost module holding ``named`` (never the root) whose executed leaves and blocks all
    belong to the group, and whether they are exactly the group."""
    parts = named.split(".")
    wanted = set(members)
    for cut in range(1, len(parts)):
        prefix = ".".join(parts[:cut])
        inside = {path for path in paths if path.startswith(prefix + ".")}
        if inside <= wanted:
            return prefix, inside == wanted
    return named, wanted == {named}
