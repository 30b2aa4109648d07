"""lightning_repsim: see how a network's layers learn, from inside a Lightning Trainer."""

__version__ = "0.1.0"

from lightning_repsim.errors import RepSimError, RepSimValueError, RepSimWarning  # noqa: E402
from lightning_repsim.callbacks import FreezeTraining, RepresentationSimilarity  # noqa: E402
from lightning_repsim.compare import Comparison, compare  # noqa: E402
from lightning_repsim.metrics import LayerSimilarity  # noqa: E402

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
