"""Pure tensor functions for representational similarity.

Every function takes 2-D tensors whose rows are examples and whose columns are neurons; x (n, p)
and y (n, q) must describe the same n examples in the same order. Results are float64 on the
inputs' device: CPU work runs in float64, CUDA products in float32 (float64 where the process allows
TF32: no global flag is ever changed) and every reduction in float64. Gram-based measures propagate
gradients to inputs that require grad.

Modules: :mod:`~lightning_repsim.functional.cka`, :mod:`~lightning_repsim.functional.rv` and
:mod:`~lightning_repsim.functional.cca` hold the single-pair measures, :mod:`~lightning_repsim.functional.gram`
the Gram matrices and HSIC, :mod:`~lightning_repsim.functional.matrix` the all-pairs front
:func:`similarity_matrix`; the Gram engine behind it (:class:`Representations`) is private.
:mod:`~lightning_repsim.functional.intervals` holds confidence intervals for the population similarity
(:func:`similarity_interval`, :func:`interval_matrix`) and :mod:`~lightning_repsim.functional.permutation`
the permutation test (:func:`permutation_test`).
"""

from lightning_repsim.functional._engine import Representations
from lightning_repsim.functional.cca import canonical_correlations, pwcca, svcca
from lightning_repsim.functional.cka import cka, linear_cka, minibatch_cka, rbf_cka
from lightning_repsim.functional.gram import center_gram, gram_linear, gram_rbf, hsic
from lightning_repsim.functional.intervals import (
    IntervalMatrix,
    SimilarityInterval,
    interval_matrix,
    similarity_interval,
)
from lightning_repsim.functional.matrix import similarity_matrix
from lightning_repsim.functional.permutation import PermutationTest, permutation_test
from lightning_repsim.functional.rv import rv, rv2
from lightning_repsim.measures import MEASURES

__all__ = [
    "IntervalMatrix",
    "MEASURES",
    "PermutationTest",
    "Representations",
    "SimilarityInterval",
    "canonical_correlations",
    "center_gram",
    "cka",
    "gram_linear",
    "gram_rbf",
    "hsic",
    "interval_matrix",
    "linear_cka",
    "minibatch_cka",
    "permutation_test",
    "pwcca",
    "rbf_cka",
    "rv",
    "rv2",
    "similarity_interval",
    "similarity_matrix",
    "svcca",
]
