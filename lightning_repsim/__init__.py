"""lightning_repsim: see how a network's layers learn, from inside a Lightning Trainer.

The callbacks, ``compare`` and the Metric class are imported on first use, so that importing
the package (e.g. for the ``lightning-repsim`` command or the functional API) does not pay for
PyTorch Lightning's import.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

from lightning_repsim.errors import RepSimError, RepSimIntegrityError, RepSimValueError, RepSimWarning

_LAZY = {
    "FreezeTraining": "lightning_repsim.callbacks.freeze",
    "RepresentationSimilarity": "lightning_repsim.callbacks.similarity",
    "Comparison": "lightning_repsim.analysis",
    "compare": "lightning_repsim.analysis",
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


__all__ = [
    "Comparison",
    "FreezeTraining",
    "LayerSimilarity",
    "RepSimError",
    "RepSimIntegrityError",
    "RepSimValueError",
    "RepSimWarning",
    "RepresentationSimilarity",
    "__version__",
    "compare",
]
