"""Which modules, in which order: layer discovery in execution order, and selection.

Every selector of lightning_repsim matches names by one rule, :func:`name_matches`; every pass that
runs a model for us (discovery, capture) puts it in eval mode and restores each module's flag
exactly afterwards, by one context manager, :func:`eval_mode`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lightning_repsim.errors import RepSimValueError

__all__ = [
    "LayerSelector",
    "eval_mode",
    "execution_order",
    "name_matches",
    "select_layers",
    "select_names",
    "top_level_blocks",
]

# the list first: jsonargparse (LightningCLI) tries a Union's members in order, and str takes a YAML list
LayerSelector = Sequence[str | type] | str | type | None

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


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the ``with`` block, then restore every module's ``training``
    flag exactly as it was (also when the block raises), whatever mix of modes it had.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> net[1].eval()  # doctest: +ELLIPSIS
        Dropout(...)
        >>> with eval_mode(net):
        ...     print(net.training, net[1].training)
        False False
        >>> net.training, net[1].training
        (True, False)
    """
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def _first_calls(model: nn.Module, forward: Callable[[], Any]) -> list[str]:
    """Run ``forward()`` once and return every module path in order of its first call.

    The pass runs in eval mode under ``torch.no_grad``; hooks are removed and every
    module's ``training`` flag is restored exactly, also when ``forward`` raises.
    The root module (name ``""``) is included when it is called.
    """
    named = list(model.named_modules())
    seen: dict[str, None] = {}
    handles = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if name not in seen:
                seen[name] = None

        return hook

    try:
        for name, module in named:
            handles.append(module.register_forward_pre_hook(make_hook(name)))
        with eval_mode(model), torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
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
                f"Layer selector {selector!r} is neither a module name, a glob pattern nor an nn.Module type."
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


def top_level_blocks(model: nn.Module, forward: Callable[[], Any]) -> list[str]:
    """The model's top-level blocks with parameters, in the order they first run (``execution_order``
    with ``top_level=True``), looking through a single wrapped network (``self.net = Net()``): when
    one block is all there is and it has parameterised children, its own top-level blocks are taken.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Wrapper(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        ...     def forward(self, x):
        ...         return self.net(x)
        >>> model = Wrapper()
        >>> top_level_blocks(model, lambda: model(torch.randn(2, 3)))
        ['net.0', 'net.2']
    """
    root, prefix = model, ""
    with eval_mode(model):
        units = execution_order(model, forward, top_level=True)
        while len(units) == 1 and _has_param_children(root.get_submodule(units[0])):
            prefix += units[0] + "."
            root = root.get_submodule(units[0])
            units = execution_order(root, forward, top_level=True)
    return [prefix + unit for unit in units]


def _has_param_children(module: nn.Module) -> bool:
    return any(next(child.parameters(), None) is not None for child in module.children())
