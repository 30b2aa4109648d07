"""The measure catalogue, as the functional modules import it (it lives in :mod:`lightning_repsim.measures`,
which imports no torch, so that the command line answers ``--help`` at once)."""

from lightning_repsim.measures import (
    CCA_MEASURES,
    GRAM_MEASURES,
    MEASURE_OPTIONS,
    MEASURES,
    GramSpec,
    gram_spec,
    resolve_measures,
    resolve_options,
)

__all__ = [
    "CCA_MEASURES",
    "GRAM_MEASURES",
    "MEASURES",
    "MEASURE_OPTIONS",
    "GramSpec",
    "gram_spec",
    "resolve_measures",
    "resolve_options",
]
