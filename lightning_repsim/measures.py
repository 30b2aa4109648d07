"""The catalogue of similarity measures: their names, options, and how each Gram-based one is built.

One place validates a measure name and its options (:func:`resolve_options`) and a list of measures
with per-measure options (:func:`resolve_measures`); every caller (the functional API, the Metric,
the callbacks, the analysis functions and the CLI) goes through it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_repsim.errors import RepSimValueError

GRAM_MEASURES = ("linear_cka", "debiased_cka", "rbf_cka", "rv", "rv2")
CCA_MEASURES = ("svcca", "pwcca")
MEASURES = GRAM_MEASURES + CCA_MEASURES

#: Options each measure accepts, with their defaults.
MEASURE_OPTIONS: dict[str, dict[str, object]] = {
    "linear_cka": {"debiased": False},
    "debiased_cka": {},
    "rbf_cka": {"sigma": 0.8, "debiased": False},
    "rv": {"center": True},
    "rv2": {"center": True},
    "svcca": {"keep": 0.99},
    "pwcca": {},
}


@dataclass(frozen=True)
class GramSpec:
    """How one Gram-based measure turns features into a transformed Gram matrix."""

    measure: str
    kernel: str  # "linear" | "rbf"
    center_features: bool
    transform: str  # "none" | "center" | "unbiased" | "zero_diag"
    sigma: float = 0.8

    @property
    def min_examples(self) -> int:
        return 4 if self.transform == "unbiased" else 2

    def hsic_scale(self, n: int) -> float:
        """Factor turning our inner products into the HSIC estimator's own normalisation."""
        if self.transform == "unbiased":
            return 1.0 / (n * (n - 3))
        if self.transform == "center" or (self.kernel == "linear" and self.center_features):
            return 1.0 / (n - 1) ** 2
        return 1.0


def resolve_options(measure: str, options: Mapping[str, object]) -> dict[str, object]:
    """Validate a measure name and its options; return the options with defaults filled in."""
    if measure not in MEASURE_OPTIONS:
        raise RepSimValueError(f"unknown measure {measure!r}; choose one of {', '.join(MEASURES)}.")
    allowed = MEASURE_OPTIONS[measure]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) if allowed else "no options"
        raise RepSimValueError(f"{measure} takes {takes}; got unexpected option(s) {', '.join(unknown)}.")
    return {**allowed, **options}


def resolve_measures(
    measures: str | Sequence[str], measure_options: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Validate a measure name or list of names and their per-measure options.

    Returns ``{measure: options with defaults filled in}`` in the order given, duplicates removed.

    Raises:
        RepSimValueError: no measure, an unknown measure or option, or options for a measure that is
            not among ``measures``.

    Example:
        >>> resolve_measures("rbf_cka", {"rbf_cka": {"sigma": 0.5}})
        {'rbf_cka': {'sigma': 0.5, 'debiased': False}}
    """
    names = [measures] if isinstance(measures, str) else list(dict.fromkeys(measures))
    if not names:
        raise RepSimValueError("measures is empty: name at least one, e.g. measures=('linear_cka',).")
    given = dict(measure_options or {})
    stray = sorted(set(given) - set(names))
    if stray:
        raise RepSimValueError(f"measure_options names {stray}, which are not among measures {names}.")
    return {m: resolve_options(m, given.get(m, {})) for m in names}


def gram_spec(measure: str, **options: object) -> GramSpec:
    """The :class:`GramSpec` of a Gram-based measure (``linear_cka`` with ``debiased=True`` included)."""
    opts = resolve_options(measure, options)
    if measure == "linear_cka":
        return GramSpec(
            "debiased_cka" if opts["debiased"] else "linear_cka",
            "linear",
            True,
            "unbiased" if opts["debiased"] else "none",
        )
    if measure == "debiased_cka":
        return GramSpec(measure, "linear", True, "unbiased")
    if measure == "rbf_cka":
        sigma = float(opts["sigma"])  # type: ignore[arg-type]
        if not sigma > 0:
            raise RepSimValueError(f"rbf_cka needs sigma > 0; got sigma = {sigma}.")
        # Distances ignore translation, so centring first only removes cancellation.
        return GramSpec(measure, "rbf", True, "unbiased" if opts["debiased"] else "center", sigma)
    if measure in ("rv", "rv2"):
        return GramSpec(measure, "linear", bool(opts["center"]), "zero_diag" if measure == "rv2" else "none")
    raise RepSimValueError(f"{measure} is not a Gram-based measure; use similarity_matrix for it.")
