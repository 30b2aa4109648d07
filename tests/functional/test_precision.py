"""The measures change no process-wide state (issue 12): the TF32 / matmul-precision flags are read,
never written (not even for the duration of a call: the callback computes on a worker thread while
training runs); the newer ``fp32_precision`` API set by the user raises nothing; autocast around a
call does not lower the precision of its products. All on CPU; the CUDA side is in test_cuda.py."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lightning_repsim import functional as F
from lightning_repsim.functional._validation import gemm_dtype, reduced_float32_matmul


def _read(getter: Callable[[], object]) -> object:
    try:
        return getter()
    except RuntimeError:  # torch refuses to read the legacy flags once the new API was used
        return "unreadable"


def precision_state() -> dict[str, object]:
    """Every process-wide setting that decides float32 matmul precision, as far as it can be read."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    state = {
        "matmul.allow_tf32": _read(lambda: matmul.allow_tf32),
        "cudnn.allow_tf32": _read(lambda: cudnn.allow_tf32),
        "float32_matmul_precision": _read(torch.get_float32_matmul_precision),
    }
    for name, owner in (
        ("matmul", matmul),
        ("cudnn", cudnn),
        ("mkldnn.matmul", getattr(torch.backends.mkldnn, "matmul", None)),
        ("backends", torch.backends),
    ):
        if hasattr(owner, "fp32_precision"):
            state[f"{name}.fp32_precision"] = _read(lambda owner=owner: owner.fp32_precision)
    return state


class StateRecorder(TorchFunctionMode):
    """Records the precision state at every torch call made inside it: a change the library makes
    and undoes before returning still shows."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, object]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if len(self.seen) < 2000:
            self.seen.append(precision_state())
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def legacy_flags(matmul: bool, cudnn: bool, precision: str) -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[2])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]


@contextlib.contextmanager
def new_api(value: str) -> Iterator[None]:
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    saved = matmul.fp32_precision
    matmul.fp32_precision = value
    try:
        yield
    finally:
        matmul.fp32_precision = saved


def _layers(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 24, generator=g) + 2.0
    return {
        k: v.to(dtype) for k, v in {"a": x, "b": torch.tanh(x @ torch.randn(24, 16, generator=g)), "c": x**2}.items()
    }


def _every_route(layers: dict[str, torch.Tensor]) -> None:
    for measure in ("linear_cka", "debiased_cka", "rbf_cka", "rv2", "svcca"):
        for method in ("features", "gram") if measure != "rbf_cka" and measure != "svcca" else ("auto",):
            F.similarity_matrix(layers, measure=measure, method=method, product_dtype=torch.float32)
            F.similarity_matrix(layers, {"b": layers["b"]}, measure=measure, method=method)
    F.gram_linear(layers["a"])
    F.gram_rbf(layers["a"])
    F.minibatch_cka(layers["a"], layers["b"], 16)
    F.linear_cka(layers["a"].requires_grad_(), layers["b"]).backward()
    layers["a"].requires_grad_(False)


@pytest.mark.parametrize(("matmul", "cudnn", "precision"), [(True, True, "high"), (False, False, "highest")])
def test_legacy_flags_are_never_written(matmul, cudnn, precision):
    with legacy_flags(matmul, cudnn, precision):
        before = precision_state()
        recorder = StateRecorder()
        with recorder:
            _every_route(_layers())
        assert recorder.seen, "the recorder saw no torch call"
        assert all(state == before for state in recorder.seen), "a flag changed during a call"
        assert precision_state() == before


@pytest.mark.parametrize("value", ["tf32", "ieee"])
def test_new_fp32_precision_api_raises_nothing_and_is_never_written(value):
    layers = _layers()
    expected = F.similarity_matrix({k: v.double() for k, v in layers.items()}, measure="linear_cka")
    with new_api(value):
        before = precision_state()
        recorder = StateRecorder()
        with recorder:
            got = F.similarity_matrix(layers, measure="linear_cka", product_dtype=torch.float32)
            _every_route(layers)
        assert all(state == before for state in recorder.seen)
        assert precision_state() == before
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_reduced_precision_settings_are_read_and_float32_products_upcast():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with legacy_flags(False, False, "highest"):
        assert not reduced_float32_matmul(cpu) and not reduced_float32_matmul(cuda)
        assert gemm_dtype(cuda) == torch.float32 and gemm_dtype(cpu, "float32") == torch.float32
    with legacy_flags(True, True, "high"):
        assert reduced_float32_matmul(cuda)
        assert gemm_dtype(cuda) == torch.float64  # TF32 may be on: float64 products, flags untouched
        assert gemm_dtype(cuda, torch.float64) == torch.float64
    with new_api("tf32"):
        assert reduced_float32_matmul(cuda) and gemm_dtype(cuda, torch.float32) == torch.float64


@pytest.mark.parametrize("product_dtype", [None, torch.float32, torch.float64])
@pytest.mark.parametrize("measure", ["linear_cka", "debiased_cka", "rbf_cka", "rv", "rv2", "svcca", "pwcca"])
def test_values_inside_bf16_autocast_equal_those_outside(measure, product_dtype):
    layers = _layers()
    outside = F.similarity_matrix(layers, measure=measure, product_dtype=product_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = F.similarity_matrix(layers, measure=measure, product_dtype=product_dtype)
        assert torch.is_autocast_enabled("cpu")  # switched off only inside the call
    torch.testing.assert_close(inside, outside, atol=1e-6, rtol=0)


def test_single_pair_functions_and_gradients_inside_bf16_autocast():
    layers = _layers()
    x, y = layers["a"], layers["b"]
    outside = (F.linear_cka(x, y), F.rbf_cka(x, y), F.rv2(x, y), F.gram_linear(x), F.gram_rbf(x))
    student = x.clone().requires_grad_()
    F.linear_cka(student, y).backward()
    grad_outside = student.grad
    student.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = (F.linear_cka(x, y), F.rbf_cka(x, y), F.rv2(x, y), F.gram_linear(x), F.gram_rbf(x))
        F.linear_cka(student, y).backward()
    for a, b in zip(inside, outside):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(student.grad, grad_outside, atol=1e-6, rtol=1e-5)
