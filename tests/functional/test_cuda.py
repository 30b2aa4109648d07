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


def _fit_and_check_callback(tmp_path, accelerator: str) -> None:
    """RepresentationSimilarity end to end under bf16-mixed with its worker thread on: the process's
    TF32 / matmul-precision settings are the same at every training step and after fit as the user set
    them, and the logged similarities equal a CPU float64 computation on the stored features."""
    from lightning_repsim.callbacks import RepresentationSimilarity
    from lightning_repsim.store import open_store
    from tests.callbacks.test_similarity import PROBE, Net, make_trainer, train_loader
    from tests.functional.test_precision import precision_state

    class Recording(Net):
        def __init__(self):
            super().__init__()
            self.states: list[dict[str, object]] = []

        def training_step(self, batch, batch_idx):
            self.states.append(precision_state())
            return super().training_step(batch, batch_idx)

    measures = ("linear_cka", "debiased_cka", "rbf_cka", "rv2")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True  # the user's choice
    try:
        before = precision_state()
        callback = RepresentationSimilarity(
            probe=PROBE, reference="init", measures=measures, background=True, write_files=False
        )
        model = Recording()
        trainer = make_trainer(
            tmp_path, [callback], logger=False, accelerator=accelerator, precision="bf16-mixed", max_epochs=2
        )
        trainer.fit(model, train_loader())
        after = precision_state()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert model.states and all(state == before for state in model.states), "a flag changed during training"
    assert after == before
    store = open_store(callback.store_path)
    init, last = store.get(store.steps[0]), store.get(store.steps[-1])
    checked = 0
    for measure in measures:
        prefix = f"repsim/{measure}/init/"
        for tag, value in trainer.callback_metrics.items():
            if not tag.startswith(prefix):
                continue
            layer = tag[len(prefix) :].split("_", 1)[1]  # "02_head" -> "head"
            expected = F.similarity_matrix([last[layer].double().cpu()], [init[layer].double().cpu()], measure)
            assert abs(float(value) - float(expected)) < 1e-5, (tag, float(value), float(expected))
            checked += 1
    assert checked == len(measures) * len(store.layers)


def test_callback_end_to_end_bf16_mixed_worker_thread_on_cuda(tmp_path):
    _fit_and_check_callback(tmp_path, "gpu")
