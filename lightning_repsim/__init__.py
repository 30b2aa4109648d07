"""lightning_repsim: see how a network's layers learn, from inside a Lightning Trainer."""

__version__ = "0.1.0"

from lightning_repsim.errors import RepSimError, RepSimValueError, RepSimWarning

__all__ = ["RepSimError", "RepSimValueError", "RepSimWarning", "__version__"]
