"""lightning_repsim: see how a network's layers learn, from inside a Lightning Trainer.

The callbacks, ``compare`` and the Metric class are imported on first use, so that importing
the package (e.g. for the ``lightning-repsim`` command or the functional API) does not pay for
PyTorch Lightning's import.
"""
import sys
from importlib import import_module
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

from lightning_repsim.errors import RepSimError, RepSimValueError, RepSimWarning  # noqa: E402

_LAZY = {
    "FreezeTraining": "lightning_repsim.callbacks.freeze",
    "RepresentationSimilarity": "lightning_repsim.callbacks.similarity",
    "Comparison": "lightning_repsim.compare",
    "compare": "lightning_repsim.compare",
    "LayerSimilarity": "lightning_repsim.metrics",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_repsim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


class _Package(ModuleType):
    """This package's module type: a submodule never takes the place of a same-named export.

    Loading the submodule ``lightning_repsim.compare`` (``from lightning_repsim.compare import
    Comparison``, a doctest run, ...) makes the import system set the package's ``compare``
    attribute to that module, so that ``from lightning_repsim import compare`` gave the module or
    the function depending on import order. Here the function always wins; the module stays
    reachable as ``sys.modules["lightning_repsim.compare"]`` and through ``from ... import``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "Comparison",
    "FreezeTraining",
    "LayerSimilarity",
    "RepSimError",
    "RepSimValueError",
    "RepSimWarning",
    "RepresentationSimilarity",
    "__version__",
    "compare",
]
