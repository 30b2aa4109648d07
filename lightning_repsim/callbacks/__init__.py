"""Lightning callbacks of lightning_repsim, one module per callback."""

from lightning_repsim.callbacks.freeze import FreezeTraining
from lightning_repsim.callbacks.similarity import RepresentationSimilarity

__all__ = [
    "FreezeTraining",
    "RepresentationSimilarity",
]
