"""Input checks, working precision and degenerate-input reporting shared by the functional API.

Conventions used everywhere: rows are examples (n), columns are neurons/features (p).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from lightning_repsim.errors import RepSimValueError, RepSimWarning

TensorLike = torch.Tensor | np.ndarray
Layers = Sequence[TensorLike] | Mapping[str, TensorLike]

# A representation is treated as constant when its centred spread is below 1e-10 of its raw
# magnitude: float64 centring leaves residues near 1e-16, real data sits many orders above.
# The self-similarity terms compared here are fourth powers of the data's scale, hence 1e-40.
_RELATIVE_ZERO = 1e-40


def as_matrix(x: TensorLike, name: str) -> torch.Tensor:
    """Return ``x`` as a 2-D floating tensor (n examples, p features) or raise a clear error."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise RepSimValueError(f"{name} must be a torch.Tensor or numpy array of shape (n, p); got {type(x).__name__}.")
    if x.is_complex():
        raise RepSimValueError(f"{name} is complex ({x.dtype}); similarity measures need real features.")
    if x.ndim != 2:
        hint = (
            f"use {name}[:, None] for one feature per example"
            if x.ndim == 1
            else "reshape it to (n, p) with x.flatten(1), or pool conv maps first (rows must be examples)"
        )
        raise RepSimValueError(f"{name} must be 2-D (n examples, p features); got shape {tuple(x.shape)}: {hint}.")
    if x.shape[1] == 0:
        raise RepSimValueError(f"{name} has shape {tuple(x.shape)}: it has no features (p = 0).")
    if not x.is_floating_point():
        x = x.to(torch.float64)
    return x  # not detached: the single-pair measures propagate gradients (the engine detaches itself)


def needs_grad(*mats: torch.Tensor) -> bool:
    """Whether autograd is recording and any of ``mats`` requires grad."""
    return torch.is_grad_enabled() and any(m.requires_grad for m in mats)


def refuse_grad(measure: str, *mats: torch.Tensor) -> None:
    """Raise for a measure that cannot propagate gradients when an input requires grad (rather than
    silently detaching it)."""
    if needs_grad(*mats):
        raise RepSimValueError(
            f"{measure} does not propagate gradients, and an input requires grad; pass x.detach() to "
            "measure it, or use linear_cka, debiased CKA or rbf_cka as a loss term."
        )


def check_examples(shapes: Mapping[str, torch.Size], min_n: int, what: str) -> int:
    """Check that every representation has the same number of rows ``n >= min_n``; return n."""
    ns = {name: s[0] for name, s in shapes.items()}
    n = next(iter(ns.values()))
    if any(v != n for v in ns.values()):
        listed = ", ".join(f"{name} {tuple(shapes[name])}" for name in shapes)
        raise RepSimValueError(
            f"all representations must have the same number of examples (rows, n): got {listed}. "
            "Pass the same probe examples, in the same order, to every layer."
        )
    if n < min_n:
        raise RepSimValueError(f"{what} needs at least {min_n} examples (rows); got n = {n}.")
    return n


#: Below this many examples every similarity is (nearly) 1 whatever the representations: with 2 every
#: centred Gram has rank 1 (all centred Grams are multiples of one matrix), with 3 rank <= 2.
MIN_MEANINGFUL_EXAMPLES = 4


def few_examples_message(measure: str, n: int) -> str:
    """The warning for an estimate from fewer than :data:`MIN_MEANINGFUL_EXAMPLES` examples."""
    return (
        f"{measure} from n = {n} examples is trivially (close to) 1 whatever the representations: "
        f"with n = 2 every centred Gram matrix has rank 1. Use at least {MIN_MEANINGFUL_EXAMPLES} "
        "examples (a probe of hundreds for stable estimates)."
    )


def too_small_probe(n: int, what: str = "the probe") -> str:
    """The configuration error for a probe of fewer than 4 examples (the callbacks and ``compare()``)."""
    return (
        f"{what} has {n} example(s); similarity measures need at least {MIN_MEANINGFUL_EXAMPLES}: with 2 "
        "every centred Gram matrix has rank 1 and every similarity is exactly 1, with 3 they say little "
        f"more. Pass probe= with more examples (e.g. 'val:512', or a tensor of >= {MIN_MEANINGFUL_EXAMPLES}; "
        "hundreds give stable estimates)."
    )


def named_layers(layers: Layers, default_prefix: str) -> tuple[list[str], list[torch.Tensor]]:
    """Split a list or a name→tensor mapping into (names, 2-D tensors)."""
    if isinstance(layers, Mapping):
        names = [str(k) for k in layers]
        mats = [as_matrix(v, f"layer {k!r}") for k, v in layers.items()]
    elif isinstance(layers, (torch.Tensor, np.ndarray)):
        raise RepSimValueError(
            f"{default_prefix} must be a list of (n, p_i) tensors or a dict name -> tensor, not a single tensor; "
            f"wrap it: [{default_prefix}]."
        )
    else:
        layers = list(layers)
        names = [f"{default_prefix}[{i}]" for i in range(len(layers))]
        mats = [as_matrix(v, name) for name, v in zip(names, layers)]
    if not mats:
        raise RepSimValueError(f"{default_prefix} is empty: pass at least one (n, p) representation.")
    return names, mats


def gemm_dtype(device: torch.device, requested: torch.dtype | str | None = None) -> torch.dtype:
    """Precision of the large products: ``requested`` (float32 or float64) when given, else float64 on
    CPU and float32 on accelerators; float32 becomes float64 wherever the process lets float32
    matmuls run at reduced precision (TF32 or bf16, see :func:`reduced_float32_matmul`), since the
    library never changes those process-wide settings itself."""
    if requested is None:
        dtype = torch.float64 if device.type == "cpu" else torch.float32
    else:
        names = {"float32": torch.float32, "float64": torch.float64}
        dtype = names.get(requested, requested) if isinstance(requested, str) else requested  # type: ignore[arg-type]
        if dtype not in (torch.float32, torch.float64):
            raise RepSimValueError(
                f"product_dtype must be torch.float32, torch.float64 (or their names) or None for "
                f"the device's default; got {requested!r}."
            )
    if dtype == torch.float32 and reduced_float32_matmul(device):
        return torch.float64
    return dtype


def reduced_float32_matmul(device: torch.device) -> bool:
    """Whether float32 matmuls on ``device`` may run at reduced precision (TF32 on CUDA, bf16/TF32 in
    oneDNN on CPU) under the process's current settings. Read only: the ``fp32_precision`` API
    (torch >= 2.9, which also reflects ``allow_tf32`` and ``set_float32_matmul_precision``), else the
    legacy flags; a state torch refuses to read counts as reduced."""
    if device.type not in ("cpu", "cuda"):
        return False
    backend = torch.backends.cuda.matmul if device.type == "cuda" else getattr(torch.backends.mkldnn, "matmul", None)
    try:
        precisions = [getattr(backend, "fp32_precision", None), getattr(torch.backends, "fp32_precision", None)]
        if any(isinstance(p, str) for p in precisions):
            return any(isinstance(p, str) and p not in ("none", "ieee") for p in precisions)
        if device.type == "cpu":
            return False  # before the fp32_precision API, CPU float32 matmuls were always full precision
        return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:
        return True


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Autocast off for ``device``'s type inside (a thread-local setting, restored on exit): the
    products run in the dtype the engine chose, not in the bf16/fp16 of a surrounding mixed-precision
    step. Changes no process-wide state."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# Below this many multiply-adds a product stays in torch while torch runs several threads: waking
# NumPy's BLAS thread pool leaves its threads spinning for milliseconds against torch's OpenMP team
# (the training loop's too, when the callback computes between steps): 10x slower small calls.
_SYRK_MIN_WORK = 2e8


def use_numpy_blas(work: float) -> bool:
    """Whether a CPU product of ``work`` multiply-adds should go through NumPy's BLAS (SYRK for
    ``x @ x.T``): when it is large enough to amortise waking that pool, or when torch runs on one
    thread anyway (then there is no OpenMP team to fight)."""
    return work >= _SYRK_MIN_WORK or torch.get_num_threads() == 1


def self_product(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ x.T`` in x's dtype. CPU products that :func:`use_numpy_blas` go through NumPy, whose matmul
    recognises the transposed operand and calls BLAS SYRK: half the flops of torch's general product.

    ``out``: a contiguous CPU tensor of x's dtype to write the product into (returned).
    """
    cpu = x.device.type == "cpu" and not x.requires_grad
    if cpu and use_numpy_blas(x.shape[0] ** 2 * x.shape[1]):
        array = x.contiguous().numpy()
        if out is None:
            return torch.from_numpy(array @ array.T)
        np.matmul(array, array.T, out=out.numpy())
        return out
    with no_autocast(x.device):
        if out is not None and cpu:
            return torch.mm(x, x.T, out=out)
        product = x @ x.T
    return product if out is None else out.copy_(product)


def product_nt(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b.T`` for float64 CPU arrays, in NumPy or torch as :func:`use_numpy_blas` decides."""
    if use_numpy_blas(a.shape[0] * b.shape[0] * a.shape[1]):
        return a @ b.T
    return torch.from_numpy(a).mm(torch.from_numpy(b).T).numpy()


def finite_or_zero(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Return (x with non-finite entries zeroed, whether x had any)."""
    # A finite sum proves every entry finite without a full-size boolean temporary.
    bad = not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all())
    return (torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) if bad else x), bad


def warn_degenerate(problems: Mapping[str, str], measure: str) -> None:
    """One warning listing every degenerate representation and why its similarities are NaN."""
    if problems:
        listed = "; ".join(f"{name}: {why}" for name, why in problems.items())
        warnings.warn(f"{measure} is NaN for {listed}.", RepSimWarning, stacklevel=3)


def is_negligible(value: float, scale: float) -> bool:
    """Whether a fourth-power self-similarity ``value`` is zero relative to ``scale`` (same power)."""
    return value <= _RELATIVE_ZERO * scale
