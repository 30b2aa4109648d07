"""The probe recorded during Lightning's own validation pass: real ``Trainer.fit`` runs on CPU.

At every logging point the recorded features are compared with a separate probe pass over the same
weights (to 1e-6); the fallbacks (validation that does not cover the probe, in another order, with
other inputs, or not at the logging point) must run the probe pass instead.
"""

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_repsim.callbacks import RepresentationSimilarity

N_VAL = 50


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 6, 6, generator=g)
    return x, (x.mean((1, 2, 3)) > 0).long()


class ConvNet(pl.LightningModule):
    """Conv, BatchNorm (eval mode matters), dropout (so does it) and a linear head; validation runs ``self(x)``."""

    def __init__(self, scale_val_inputs=1.0, direct=False):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4 * 6 * 6, 2)
        self.scale_val_inputs = scale_val_inputs
        self.direct = direct

    def forward(self, x):
        return self.head(self.drop(F.relu(self.bn(self.conv(x)))).flatten(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        x = batch[0] * self.scale_val_inputs
        if self.direct:  # the layers called one by one, not through forward
            logits = self.head(self.drop(F.relu(self.bn(self.conv(x)))).flatten(1))
        else:
            logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Checked(RepresentationSimilarity):
    """Notes, at each logging point after step 0, where the features came from and how far they are
    from a separate probe pass over the same weights."""

    def __init__(self, **kwargs):
        super().__init__(reference="init", measures=("linear_cka",), write_files=False, verbose=False, **kwargs)
        self.sources: list[str] = []
        self.errors: list[float] = []

    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        runner, self.passes = self._runner, 0
        trained = runner.trained

        def counted(*args, **kwargs):
            self.passes += 1
            return trained(*args, **kwargs)

        runner.trained = counted

    def _features(self, trainer, pl_module):
        before = self.passes
        features = super()._features(trainer, pl_module)
        self.sources.append("probe pass" if self.passes > before else "validation")
        separate = type(self._runner).features(self._runner, pl_module, trainer=trainer)
        assert list(features) == list(separate)
        self.errors.append(max(float((features[k] - separate[k]).abs().max()) for k in features))
        assert all(not x.is_inference() and x.shape[0] == len(self._runner.probe) for x in features.values())
        return features


def fit(tmp_path, monitor, model=None, val_loader=None, **trainer_options):
    pl.seed_everything(0, verbose=False)
    model = model or ConvNet()
    train = DataLoader(TensorDataset(*data(64, 0)), batch_size=16, shuffle=True)
    val = val_loader or DataLoader(TensorDataset(*data(N_VAL, 1)), batch_size=10)
    options = dict(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    options.update(trainer_options)
    trainer = pl.Trainer(callbacks=[monitor], **options)
    trainer.fit(model, train, val)
    return trainer, model


@pytest.mark.parametrize("probe", ["val:25", "val:20", "val:50", None])
def test_logging_points_use_the_validation_pass_with_the_values_of_a_probe_pass(tmp_path, probe):
    monitor = Checked(probe=probe)
    _, model = fit(tmp_path, monitor)
    assert monitor.sources == ["validation"] * 3  # epochs 0, 1, 2; the last step is epoch 2's
    assert monitor.passes == 0  # no probe pass after the step-0 snapshot of on_fit_start
    assert max(monitor.errors) <= 1e-6
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert monitor._store.steps == [0, 4, 8, 12]


def test_the_recorded_snapshots_are_those_of_a_monitor_without_it(tmp_path, monkeypatch):
    """The same numbers in the store as a monitor that runs a probe pass at every point."""
    riding = Checked(probe="val:25")
    fit(tmp_path / "a", riding)
    separate = Checked(probe="val:25")
    monkeypatch.setattr(separate, "on_validation_epoch_start", lambda trainer, pl_module: None)
    fit(tmp_path / "b", separate)
    assert separate.sources == ["probe pass"] * 3 and riding.sources == ["validation"] * 3
    assert riding._store.steps == separate._store.steps
    for step in riding._store.steps:
        a, b = riding._store.get(step), separate._store.get(step)
        assert list(a) == list(b)
        assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


@pytest.mark.parametrize(
    "case",
    ["shuffled", "fewer examples", "other inputs", "layers called directly", "not every epoch", "every_n_train_steps"],
)
def test_falls_back_to_the_probe_pass(tmp_path, case):
    model, val, options, kwargs = ConvNet(), None, {}, {}
    expected = ["probe pass"] * 3
    if case == "shuffled":
        val = DataLoader(TensorDataset(*data(N_VAL, 1)), batch_size=10, shuffle=True)
    elif case == "fewer examples":
        options["limit_val_batches"] = 2  # 20 examples for a probe of 25
    elif case == "other inputs":
        model = ConvNet(scale_val_inputs=2.0)
    elif case == "layers called directly":
        model = ConvNet(direct=True)
    elif case == "not every epoch":
        options["check_val_every_n_epoch"] = 2  # validation after epoch 1 only
        expected = ["probe pass", "validation", "probe pass"]
    elif case == "every_n_train_steps":
        kwargs = {"every_n_train_steps": 4}
    monitor = Checked(probe="val:25", **kwargs)
    fit(tmp_path, monitor, model=model, val_loader=val, **options)
    assert monitor.sources == expected
    assert max(monitor.errors) <= 1e-6
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_recording_that_fails_never_stops_validation(tmp_path, monkeypatch):
    from lightning_repsim.capture import recorder

    record = recorder._Recorder.record
    validating = []

    def broken(self, *args, **kwargs):
        if validating and validating[0].validating:  # Lightning's validation, not the probe pass
            raise RuntimeError("boom")
        return record(self, *args, **kwargs)

    monkeypatch.setattr(recorder._Recorder, "record", broken)
    monitor = Checked(probe="val:25")
    on_fit_start = monitor.on_fit_start
    monkeypatch.setattr(
        monitor, "on_fit_start", lambda trainer, m: (validating.append(trainer), on_fit_start(trainer, m))
    )
    trainer, model = fit(tmp_path, monitor, max_epochs=2)
    assert trainer.state.finished and "val_loss" in trainer.callback_metrics
    assert monitor.sources == ["probe pass"] * 2 and max(monitor.errors) <= 1e-6
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
