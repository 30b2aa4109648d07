"""``similarity_matrix``: every layer against every layer, for any measure (the public front).

Validates the inputs and the measure, then hands the Gram-based measures to the Gram engine
(:mod:`lightning_repsim.functional._engine`) and SVCCA / PWCCA to :mod:`lightning_repsim.functional.cca`.
"""

from __future__ import annotations

import warnings

import torch

from lightning_repsim.errors import RepSimValueError, RepSimWarning
from lightning_repsim.functional._autograd import differentiable_matrix
from lightning_repsim.functional._engine import Representations, gram_similarity
from lightning_repsim.functional._validation import (
    MIN_MEANINGFUL_EXAMPLES,
    Layers,
    check_examples,
    few_examples_message,
    gemm_dtype,
    needs_grad,
    no_autocast,
    refuse_grad,
    warn_degenerate,
)
from lightning_repsim.functional.cca import cca_matrix
from lightning_repsim.measures import CCA_MEASURES, gram_spec, resolve_options

__all__ = ["similarity_matrix"]


def similarity_matrix(
    xs: Layers | Representations,
    ys: Layers | Representations | None = None,
    measure: str = "linear_cka",
    *,
    method: str = "auto",
    warn: bool = True,
    product_dtype: torch.dtype | str | None = None,
    **options: object,
) -> torch.Tensor:
    r"""Similarity of every layer in ``xs`` with every layer in ``ys``: a (len(xs), len(ys)) tensor.

    Rows are examples in every representation, and all of them describe the same n examples in the
    same order. ``ys=None`` compares ``xs`` with itself and computes one triangle only.

    Args:
        xs: a list of (n, p_i) tensors, a dict layer name -> tensor (names appear in warnings), or
            :class:`Representations` to reuse its prepared statistics across calls.
        ys: the same for the other side, or None.
        measure: ``linear_cka``, ``debiased_cka``, ``rbf_cka``, ``rv``, ``rv2``, ``svcca`` or ``pwcca``.
        method: ``auto`` (by flop count), ``features`` or ``gram``: the route for the Gram-based measures.
            Both give the same numbers; the option exists for benchmarks and tests.
        warn: issue the :class:`RepSimWarning` about degenerate layers (``False`` for callers that
            report them themselves; the NaN cells are the same).
        product_dtype: precision of the large products (Grams, ``Xᵀ Y``) of the Gram-based measures;
            everything else, centring and every sum over products included, stays in float64.
            ``None``: float64 on CPU, float32 on accelerators. ``torch.float32``
            on CPU is about twice as fast and agrees with float64 to about 1e-7 (float32 peers:
            1e-4); ``torch.float64`` on an accelerator buys the last digits. Layers are scaled by
            powers of two into float32's safe range first. Where the process lets float32 matmuls run
            at reduced precision (TF32, ``torch.set_float32_matmul_precision("high")``, the
            ``fp32_precision`` API), float32 products are done in float64 instead: the library reads
            those settings and never changes them. SVCCA and PWCCA (SVDs) and inputs that require
            grad (float64 throughout) ignore it. Autocast is off inside: a bf16 step gives the same
            values as a float32 one.
        **options: the measure's options (``debiased``, ``sigma``, ``center``, ``keep``).

    Returns:
        float64 tensor on the inputs' device; entry (i, j) equals the single-pair function on
        ``(xs[i], ys[j])``. Degenerate layers give NaN rows/columns and one :class:`RepSimWarning`.
        When an input requires grad (and autograd is recording), the Gram-based measures propagate
        gradients to it (CKA as a loss term); otherwise the result has no graph. Fewer than 4
        examples give one :class:`RepSimWarning`: with 2 every centred Gram has rank 1 and every
        similarity is 1, with 3 the values say little more.

    Raises:
        RepSimValueError: unknown measure or option, inputs that are not 2-D, different numbers of
            examples, too few examples, inputs on different devices, or an input that requires grad
            with SVCCA or PWCCA (not differentiable here: detach it, or use a CKA).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(100, 8, generator=g)
        >>> layers = {"a": x, "b": 2 * x + 1, "c": torch.randn(100, 4, generator=g)}
        >>> m = similarity_matrix(layers, measure="linear_cka")
        >>> m.shape, round(float(m[0, 1]), 6)
        (torch.Size([3, 3]), 1.0)
    """
    options = resolve_options(measure, options)
    reps_x = xs if isinstance(xs, Representations) else Representations(xs, max_cache_bytes=0, name="xs")
    symmetric = ys is None or ys is xs
    if ys is None or symmetric:
        reps_y = reps_x
    else:
        reps_y = ys if isinstance(ys, Representations) else Representations(ys, max_cache_bytes=0, name="ys")
    names_x, mats_x, names_y, mats_y = reps_x.names, reps_x.matrices, reps_y.names, reps_y.matrices
    devices = {m.device for m in mats_x + mats_y}
    if len(devices) > 1:
        raise RepSimValueError(
            f"all representations must be on one device; got {sorted(map(str, devices))}. "
            "Move them with .to(device) first."
        )
    device = devices.pop()
    gemm_dtype(device, product_dtype)  # validated for every measure, though only Gram products use it
    shapes = {name: m.shape for name, m in zip(names_x + names_y, mats_x + mats_y)}
    other = None if symmetric else (names_y, mats_y)
    differentiable = needs_grad(*mats_x, *mats_y)

    with no_autocast(device):
        if measure in CCA_MEASURES:
            refuse_grad(measure, *mats_x, *mats_y)
            n = check_examples(shapes, 2, measure)
            result, problems = cca_matrix(names_x, mats_x, other, n, measure, **options)
            label = measure
        else:
            spec = gram_spec(measure, **options)
            label = spec.measure
            n = check_examples(
                shapes,
                spec.min_examples,
                label.replace("_", " ") if spec.transform != "unbiased" else f"{label} (unbiased HSIC)",
            )
            if differentiable:
                result, problems = differentiable_matrix(names_x, mats_x, other, spec)
            else:
                result, problems = gram_similarity(
                    reps_x, None if symmetric else reps_y, spec, n, device, method, product_dtype
                )
    if warn and n < MIN_MEANINGFUL_EXAMPLES:
        warnings.warn(few_examples_message(label, n), RepSimWarning, stacklevel=2)
    if warn:
        warn_degenerate(problems, label)
    return result
