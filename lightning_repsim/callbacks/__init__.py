"""Lightning callbacks of lightning_repsim, one module per callback (and the freeze schedules beside them)."""

from lightning_repsim.callbacks.freeze import FreezeTraining
from lightning_repsim.callbacks.freeze_schedules import (
    CubicSchedule,
    FreezeSchedule,
    LinearSchedule,
    TimesSchedule,
)
from lightning_repsim.callbacks.freeze_similarity import SimilaritySchedule
from lightning_repsim.callbacks.similarity import RepresentationSimilarity

__all__ = [
    "CubicSchedule",
    "FreezeSchedule",
    "FreezeTraining",
    "LinearSchedule",
    "RepresentationSimilarity",
    "SimilaritySchedule",
    "TimesSchedule",
]
