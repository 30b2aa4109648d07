"""On a GPU: results on CUDA tensors agree with the float64 CPU computation to 1e-5 whatever the user's
TF32 settings (the library reads them and upcasts, never writes them); the callback end to end.

Skipped without CUDA; run it where a GPU is available (``pytest tests/functional/test_cuda.py``).
"""

import pytest
import torch

from lightning_repsim import functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("measure", F.MEASURES)
@pytest.mark.parametrize("shape", [(512, 64), (256, 2048)])
def test_cuda_matches_float64_cpu(measure, shape):
    g = torch.Generator().manual_seed(0)
    n, p = shape
    x = torch.randn(n, p, generator=g) + 3.0
    layers = {"a": x, "b": torch.tanh(x @ torch.randn(p, 96, generator=g) / p**0.5), "c": x[:, : p // 4] ** 2}
    torch.backends.cuda.matmul.allow_tf32 = True  # the library must not be affected by it, nor change it
    try:
        cpu = F.similarity_matrix({k: v.double() for k, v in layers.items()}, measure=measure)
        gpu = F.similarity_matrix({k: v.cuda() for k, v in layers.items()}, measure=measure)
        assert torch.backends.cuda.matmul.allow_tf32  # still the user's setting
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float64
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_is_upcast(dtype):
    x = torch.randn(300, 40, device="cuda").to(dtype)
    y = (x.float() @ torch.randn(40, 30, device="cuda")).to(dtype)
    value = F.linear_cka(x, y)
    expected = F.linear_cka(x.double().cpu(), y.double().cpu())
    assert torch.isfinite(value) and abs(value.item() - expected.item()) < 1e-5


@pytest.mark.parametrize("measure", ["linear_cka", "debiased_cka", "rv2", "rbf_cka"])
def test_cuda_float64_products_match_cpu_to_the_last_digits(measure):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 300, generator=g, dtype=torch.float64) + 3.0
    layers = [x, torch.tanh(x[:, :120]), x[:, :50] ** 2]
    cpu = F.similarity_matrix(layers, measure=measure)
    gpu = F.similarity_matrix([m.cuda() for m in layers], measure=measure, product_dtype=torch.float64)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-12, rtol=0)


@pytest.mark.parametrize("measure", ["linear_cka", "debiased_cka", "rv2", "rbf_cka"])
def test_cuda_intervals_and_permutation_tests_match_cpu(measure):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 40, generator=g, dtype=torch.float64)
    layers = {"a": x, "b": torch.tanh(x @ torch.randn(40, 30, generator=g, dtype=torch.float64)), "c": x[:, :10] ** 2}
    cpu = F.interval_matrix(layers, measure=measure)
    gpu = F.interval_matrix({k: v.cuda() for k, v in layers.items()}, measure=measure)
    for a, b in ((gpu.value, cpu.value), (gpu.low, cpu.low), (gpu.high, cpu.high)):
        torch.testing.assert_close(a.cpu(), b, atol=1e-7, rtol=0, equal_nan=True)  # float64 sums in another order
    one_cpu = F.similarity_interval(layers["a"], layers["b"], measure)
    one_gpu = F.similarity_interval(layers["a"].cuda(), layers["b"].cuda(), measure)
    assert abs(one_gpu.low - one_cpu.low) < 1e-7 and abs(one_gpu.high - one_cpu.high) < 1e-7
    test_cpu = F.permutation_test(layers["a"], layers["c"], measure, n_permutations=99, seed=0)
    test_gpu = F.permutation_test(layers["a"].cuda(), layers["c"].cuda(), measure, n_permutations=99, seed=0)
    assert test_gpu.p_value == test_cpu.p_value and abs(test_gpu.null_mean - test_cpu.null_mean) < 1e-7


def test_callback_end_to_end_bf16_mixed_worker_thread_on_cuda(tmp_path):
    from tests.callbacks.test_similarity_precision import fit_and_check_precision_state

    fit_and_check_precision_state(tmp_path, "gpu")
