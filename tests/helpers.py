"""Shared test data and small assertions for the numerical tests (no similarity math here)."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import torch
from hypothesis import settings

from lightning_repsim.errors import RepSimWarning

#: Hypothesis settings for every property test: few examples, no deadline (2-core CI).
HYPOTHESIS = settings(max_examples=25, deadline=None)

#: Absolute tolerance against the float64 reference (every measure lies in [-1, 1]).
ATOL = 1e-10


def to_torch(a: np.ndarray) -> torch.Tensor:
    """Zero-copy float64 tensor of a NumPy array."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    """Seeded standard-normal float64 tensor of the given shape."""
    return to_torch(np.random.default_rng(seed).standard_normal(shape))


def correlated_pair(rng: np.random.Generator, n: int, p: int, q: int, noise: float = 1.0):
    """x (n, p) Gaussian and y (n, q) = x @ W + noise, so that every measure is well away from 0 and 1."""
    x = rng.standard_normal((n, p))
    y = x @ rng.standard_normal((p, q)) + noise * rng.standard_normal((n, q))
    return x, y


def _n_less_than_p(rng):
    return correlated_pair(rng, 12, 30, 20)


def _n_greater_than_p(rng):
    return correlated_pair(rng, 60, 10, 7)


def _p_much_greater_than_n(rng):
    return correlated_pair(rng, 20, 500, 300)


def _rank_deficient(rng):
    n = 40
    a = rng.standard_normal((n, 3))
    x = a @ rng.standard_normal((3, 15))  # rank 3, inner dimension 3
    b = a[:, :2] @ rng.standard_normal((2, 3)) + 0.5 * rng.standard_normal((n, 3))
    y = b @ rng.standard_normal((3, 10))  # rank 3, sharing two directions with x
    return x, y


def _constant_columns(rng):
    x, y = correlated_pair(rng, 40, 6, 5)
    x = np.hstack([x, np.full((40, 1), 5.0), np.zeros((40, 1)), np.full((40, 1), -2.5)])
    y = np.hstack([np.full((40, 1), 1.0), y, np.full((40, 1), 7.0)])
    return x, y


#: The shapes the issue asks every measure to be checked on, as seeded (x, y) pairs.
SHAPES = {
    "n<p": _n_less_than_p,
    "n>p": _n_greater_than_p,
    "p>>n": _p_much_greater_than_n,
    "rank_deficient": _rank_deficient,
    "constant_columns": _constant_columns,
}


def shape_pair(name: str, seed: int = 0):
    """The seeded (x, y) NumPy pair of a named shape."""
    return SHAPES[name](np.random.default_rng(seed))


def assert_scalar64(value: torch.Tensor) -> None:
    """A measure returns a 0-d float64 tensor."""
    assert isinstance(value, torch.Tensor), type(value)
    assert value.dim() == 0, value.shape
    assert value.dtype == torch.float64, value.dtype


def assert_close(got: torch.Tensor, expected: float, atol: float = ATOL, what: str = "") -> None:
    """|got - expected| <= atol, with both values in the message."""
    g = float(got)
    assert math.isfinite(g), f"{what}: got {g}, expected {expected!r}"
    e = float(expected)
    assert abs(g - e) <= atol, f"{what}: got {g!r}, expected {e!r}, diff {g - e:.3e}"


def call_recording(fn, *args, **kwargs):
    """Call ``fn`` and return (result, list of RepSimWarning messages) with every warning recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    messages = [str(w.message) for w in caught if issubclass(w.category, RepSimWarning)]
    return result, messages


def assert_nan_with_one_warning(fn, *args, names=(), **kwargs) -> None:
    """``fn`` returns a NaN 0-d tensor and emits exactly one RepSimWarning naming each of ``names``."""
    result, messages = call_recording(fn, *args, **kwargs)
    assert isinstance(result, torch.Tensor) and result.dim() == 0, result
    assert torch.isnan(result), f"expected NaN, got {float(result)}"
    assert len(messages) == 1, f"expected exactly one RepSimWarning, got {messages}"
    for name in names:
        assert re.search(rf"\b{re.escape(name)}\b", messages[0]), f"warning does not name {name!r}: {messages[0]}"
