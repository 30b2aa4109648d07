"""RepresentationSimilarity under the Trainer's precision settings and with probes the model cannot run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_repsim import functional as F
from lightning_repsim.callbacks import RepresentationSimilarity
from lightning_repsim.capture import capture
from lightning_repsim.errors import RepSimValueError
from lightning_repsim.store import open_store
from tests.callbacks.test_similarity import PROBE, Net, make_trainer, monitor, train_loader
from tests.functional.test_precision import precision_state


class AutocastRecorder(nn.Module):
    """Records whether CPU autocast was on and which dtype reached it, then passes its input on."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x):
        self.seen.append((torch.is_autocast_enabled("cpu"), x.dtype))
        return x


class RecordingNet(Net):
    def __init__(self):
        super().__init__()
        self.recorder = AutocastRecorder()

    def forward(self, x):
        return super().forward(self.recorder(x))


def _first_snapshot(trainer):
    store = open_store(trainer.callbacks[0].store_path)
    assert all(kind == "features" for kind in store.kinds.values())
    return store.get(store.steps[0])


def test_probe_pass_runs_under_mixed_precision_autocast(tmp_path):
    torch.manual_seed(0)
    model = RecordingNet()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(tmp_path, [monitor(layers=["body", "mid", "head"])], precision="bf16-mixed", max_epochs=1)
    trainer.fit(model, train_loader())
    probe_passes = [seen for seen in model.recorder.seen if seen[1] == PROBE.dtype]
    assert probe_passes and all(autocast for autocast, _ in probe_passes)
    # the step-0 snapshot equals a capture of the initial weights under the same autocast
    reference = Net()
    reference.load_state_dict({k: v for k, v in initial.items() if not k.startswith("recorder")})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = capture(reference, PROBE, ["body", "mid", "head"])
    stored = _first_snapshot(trainer)
    for name, features in expected.items():
        assert stored[name].dtype == torch.float32
        torch.testing.assert_close(stored[name], features, rtol=0, atol=0)


def test_true_half_precision_converts_the_probe_like_a_batch(tmp_path):
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [monitor(reference=["init", "final"])], precision="bf16-true", max_epochs=2)
    trainer.fit(Net(), train_loader())  # used to fail: a float32 probe into bfloat16 weights
    store = open_store(trainer.callbacks[0].store_path)
    assert store.steps == [0, 4, 8]
    features = store.get(8, "mid")
    assert features.dtype == torch.float32 and bool(torch.isfinite(features).all())


def test_probe_the_model_cannot_run_fails_at_setup_naming_the_probe(tmp_path):
    trainer = make_trainer(tmp_path, [monitor(probe=torch.randn(32, 5))])
    with pytest.raises(
        RepSimValueError,
        match=r"Net cannot run the probe of shape \(32, 5\) \(torch.float32\): "
        r"RuntimeError: .*Pass probe= inputs",
    ):
        trainer.fit(Net(), train_loader())


def fit_and_check_precision_state(tmp_path, accelerator: str) -> None:
    """RepresentationSimilarity end to end under bf16-mixed with its worker thread on: the process's
    TF32 / matmul-precision settings are the same at every training step and after fit as the user set
    them, and the logged similarities equal a CPU float64 computation on the stored features."""

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


def test_callback_changes_no_precision_flag_under_bf16_mixed_with_its_worker_thread(tmp_path):
    """CPU run of the check tests/functional/test_cuda.py makes on a GPU."""
    fit_and_check_precision_state(tmp_path, "cpu")
