"""Every Lightning logger gets the similarity curves: CSV, MLflow (local file store), W&B (its API, faked)
and TensorBoard; ``trainer.callback_metrics`` holds them, so EarlyStopping can monitor a similarity;
several named monitors share one Trainer."""

from __future__ import annotations

import csv
import math
import warnings

import numpy as np
import pytest
import torch
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_repsim.errors import RepSimValueError, RepSimWarning
from lightning_repsim.report import LoggerSink
from lightning_repsim.store import open_store
from tests.callbacks.test_similarity import PROBE, Net, make_trainer, monitor, read_events, scalars

TAGS = ["repsim/linear_cka/init/00_body", "repsim/linear_cka/init/01_mid", "repsim/linear_cka/init/02_head"]


def _csv_metrics(path):
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    series = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and value not in ("", None):
                series.setdefault(key, {})[int(row["step"])] = float(value)
    return series


def test_csv_logger_gets_every_layer_scalar_at_every_logging_point(tmp_path):
    callback = monitor(reference=["init", "final"])
    trainer = make_trainer(tmp_path, [callback], logger=CSVLogger(str(tmp_path), name="csv", version=0))
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(Net(), train_dataloaders=_loader())
    messages = [str(w.message) for w in records if issubclass(w.category, RepSimWarning)]
    assert len(messages) == 1 and "no logger that stores images" in messages[0]  # said once, not per point
    series = _csv_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    for tag in TAGS:
        assert sorted(series[tag]) == [0, 4, 8]
        assert series[tag][0] == pytest.approx(1.0, abs=1e-6)  # the network at init against itself
    final = [key for key in series if key.startswith("repsim/linear_cka/final/")]
    assert len(final) == 3 and all(sorted(series[key]) == [0, 4, 8] for key in final)
    assert all(series[key][8] == pytest.approx(1.0) for key in final)  # the final snapshot against itself
    store = open_store(callback.store_path)
    assert store.steps == [0, 4, 8]


def test_callback_metrics_hold_the_last_values_and_equal_tensorboard(tmp_path):
    callback = monitor(reference="init")
    trainer = make_trainer(tmp_path, [callback])
    trainer.fit(Net(), train_dataloaders=_loader())
    events = read_events(tmp_path / "run" / "version_0")
    for tag in TAGS:
        assert tag in trainer.callback_metrics
        assert float(trainer.callback_metrics[tag]) == pytest.approx(scalars(events, tag)[8], abs=1e-6)


def test_early_stopping_monitors_a_similarity(tmp_path):
    # stop as soon as the head's similarity to init drops below 0.9999: a few epochs, not 20
    stopper = EarlyStopping(
        monitor="repsim/linear_cka/init/02_head", mode="max", divergence_threshold=0.9999, check_on_train_epoch_end=True
    )
    trainer = make_trainer(tmp_path, [monitor(reference="init"), stopper], max_epochs=20)
    trainer.fit(Net(), train_dataloaders=_loader())
    assert trainer.should_stop and trainer.current_epoch < 19
    assert float(trainer.callback_metrics["repsim/linear_cka/init/02_head"]) < 0.9999


def test_early_stopping_on_a_misspelt_similarity_names_the_available_ones(tmp_path):
    stopper = EarlyStopping(monitor="repsim/linear_cka/init/head", check_on_train_epoch_end=True)
    trainer = make_trainer(tmp_path, [monitor(reference="init"), stopper])
    with pytest.raises(RuntimeError, match="repsim/linear_cka/init/02_head"):
        trainer.fit(Net(), train_dataloaders=_loader())


def test_mlflow_logger_gets_scalars_heatmaps_and_the_convergence_table(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from pytorch_lightning.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's local file store, as on a laptop
    uri = f"file:{tmp_path / 'mlruns'}"
    logger = MLFlowLogger(experiment_name="repsim", tracking_uri=uri)
    callback = monitor(reference=["init", "final"])
    trainer = make_trainer(tmp_path, [callback], logger=logger)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(Net(), train_dataloaders=_loader())
    assert not [w for w in records if issubclass(w.category, RepSimWarning)]  # MLflow stores images: no warning
    client = MlflowClient(uri)
    for tag in TAGS:
        history = {m.step: m.value for m in client.get_metric_history(logger.run_id, tag)}
        assert sorted(history) == [0, 4, 8] and history[0] == pytest.approx(1.0, abs=1e-6)
    heatmaps = [a.path for a in client.list_artifacts(logger.run_id, "repsim/linear_cka/init/heatmap")]
    assert [p.rsplit("/", 1)[1] for p in heatmaps] == [f"step-{s:08d}.png" for s in (0, 4, 8)]
    local = client.download_artifacts(logger.run_id, heatmaps[-1], str(tmp_path / "dl"))
    from PIL import Image

    with Image.open(local) as image:
        assert image.size[0] > 100 and image.size[1] > 100
    assert client.list_artifacts(logger.run_id, "repsim/linear_cka/final/convergence_summary")  # the table


class FakeWandb(WandbLogger):
    """A WandbLogger that records instead of talking to W&B (wandb is not installed here)."""

    def __init__(self):
        self.metrics, self.images = [], []

    @property
    def experiment(self):
        return self

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, step, [np.asarray(i) for i in images]))


def test_wandb_logger_gets_scalars_and_images_through_its_own_api():
    from lightning_repsim.report import encode_png

    fake = FakeWandb()
    sink = LoggerSink([fake])
    assert sink.kinds == ["wandb"] and sink.tensorboard is None
    picture = np.zeros((6, 5, 3), np.uint8)
    picture[1, 2] = (255, 0, 0)
    sink.log_scalars({"repsim/rv2/init/00_a": np.float32(0.5), "repsim/rv2/init/01_b": math.nan}, step=3)
    sink.log_png("repsim/rv2/init/heatmap", encode_png(picture), step=3)
    sink.log_text("repsim/probe", "text", step=0)  # W&B gets no text: nothing raises
    step, metrics = fake.metrics[0]
    assert step == 3 and metrics["repsim/rv2/init/00_a"] == 0.5 and math.isnan(metrics["repsim/rv2/init/01_b"])
    key, image_step, images = fake.images[0]
    assert key == "repsim/rv2/init/heatmap" and image_step == 3 and np.array_equal(images[0], picture)


# ----------------------------------------------------------------------------- several monitors


def test_two_named_monitors_with_different_probes_record_apart(tmp_path):
    first = monitor(reference=["init", "final"], name="a")
    second = monitor(reference=["init", "final"], name="b", probe=PROBE[:16] * 2)
    trainer = make_trainer(tmp_path, [first, second], enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(Net(), train_dataloaders=_loader())
    assert not [w for w in records if issubclass(w.category, RepSimWarning)]  # no false "earlier fit" warning
    assert first.state_key != second.state_key
    assert first.store_path.name == "repsim-a" and second.store_path.name == "repsim-b"
    assert open_store(first.store_path).probe_hash != open_store(second.store_path).probe_hash
    events = read_events(tmp_path / "run" / "version_0")
    for name in ("a", "b"):
        for tag in TAGS:
            assert sorted(scalars(events, tag.replace("repsim/", f"repsim-{name}/"))) == [0, 4, 8]
    assert not [t for t in events.Tags()["scalars"] if t.startswith("repsim/")]
    a = scalars(events, "repsim-a/linear_cka/init/02_head")[8]
    b = scalars(events, "repsim-b/linear_cka/init/02_head")[8]
    assert a != b  # other probes, other numbers
    checkpoint = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert {first.state_key, second.state_key} <= set(checkpoint["callbacks"])


def test_two_unnamed_monitors_are_refused_with_the_fix(tmp_path):
    trainer = make_trainer(tmp_path, [monitor(reference="init"), monitor(reference="final")])
    with pytest.raises(RepSimValueError, match="distinct name"):
        trainer.fit(Net(), train_dataloaders=_loader())


def _loader():
    from tests.callbacks.test_similarity import train_loader

    return train_loader()


def test_tensorboard_logger_and_csv_logger_together_each_get_the_scalars(tmp_path):
    loggers = [TensorBoardLogger(str(tmp_path), name="run", version=0), CSVLogger(str(tmp_path), name="csv", version=0)]
    trainer = make_trainer(tmp_path, [monitor(reference="init")], logger=loggers)
    trainer.fit(Net(), train_dataloaders=_loader())
    series = _csv_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
    events = read_events(tmp_path / "run" / "version_0")
    for tag in TAGS:
        tensorboard = scalars(events, tag)
        assert sorted(series[tag]) == sorted(tensorboard)
        for step, value in tensorboard.items():
            assert series[tag][step] == pytest.approx(value, abs=1e-6)
