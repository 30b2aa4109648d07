"""Tests of RepresentationSimilarity: real ``Trainer.fit`` runs on CPU with tiny models.

TensorBoard content is read back from the event files with tensorboard's EventAccumulator, and
similarity values are recomputed from the snapshot store with :func:`linear_cka`.
"""

import csv
import math
import re
import shutil
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_repsim.callbacks import RepresentationSimilarity
from lightning_repsim.capture import capture
from lightning_repsim.errors import RepSimWarning
from lightning_repsim.functional import linear_cka
from lightning_repsim.store import SnapshotStore, open_store

N_IN = 6
N_TRAIN = 64
BATCH = 16
STEPS_PER_EPOCH = N_TRAIN // BATCH  # 4
LAYERS = ["body", "mid", "head"]  # execution order; Net declares head first


# ----------------------------------------------------------------------------- models and data
# (module level, so that ddp_spawn can pickle them)


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_IN, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return x, y


PROBE = make_data(32, seed=1)[0]


def train_loader(n=N_TRAIN):
    return DataLoader(TensorDataset(*make_data(n, seed=0)), batch_size=BATCH)


class Net(pl.LightningModule):
    """Three linear layers; ``head`` is declared first, so declaration order != execution order."""

    def __init__(self, width=8, lr=0.5):
        super().__init__()
        self.head = nn.Linear(width, 2)
        self.body = nn.Linear(N_IN, width)
        self.mid = nn.Linear(width, width)
        self.lr = lr
        self.train_steps_run = 0

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.body(x)))))

    def training_step(self, batch, batch_idx):
        self.train_steps_run += 1
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class NaNNet(Net):
    """``head`` gets NaN inputs (so outputs NaN) from global step 2 on; ``body`` is wider than the probe (p > n)."""

    def __init__(self):
        super().__init__(width=40)

    def forward(self, x):
        h = self.mid(torch.tanh(self.body(x)))
        if self._trainer is not None and self.global_step >= 2:
            h = h * float("nan")
        return self.head(torch.tanh(h))


class Other(nn.Module):
    """A different architecture with two layers, for reference=<nn.Module>."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(N_IN, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def make_trainer(root, callbacks, logger="tb", **kwargs):
    if logger == "tb":
        logger = TensorBoardLogger(str(root), name="run", version=0)
    options = dict(
        default_root_dir=str(root),
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def monitor(**kwargs):
    options = dict(probe=PROBE, reference="init", measures=("linear_cka",), write_files=False)
    options.update(kwargs)
    return RepresentationSimilarity(**options)


def read_events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    """step -> value of a layer's scalar (the last write wins); ``tag`` is a logged tag or ``<prefix>/<layer>``,
    logged as ``<prefix>/<NN>_<layer>`` (the depth index sorts the layers as they run)."""
    if tag in acc.Tags()["scalars"]:
        return {e.step: e.value for e in acc.Scalars(tag)}
    prefix, layer = tag.rsplit("/", 1)
    logged = [t for t in acc.Tags()["scalars"] if re.fullmatch(rf"{re.escape(prefix)}/\d+_{re.escape(layer)}", t)]
    assert len(logged) == 1, f"{tag}: {logged} among {acc.Tags()['scalars']}"
    return {e.step: e.value for e in acc.Scalars(logged[0])}


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def repsim_warnings(records, text=""):
    return [str(w.message) for w in records if issubclass(w.category, RepSimWarning) and text in str(w.message)]


def fit_recording(trainer, model, train_dataloaders=None, **kwargs):
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(model, train_dataloaders or train_loader(), **kwargs)
    return records


# ----------------------------------------------------------------------------- one full run, shared

MEASURES = ("linear_cka", "rv2")
FULL_STEPS = [0, 4, 8]  # step 0, the end of each of 2 epochs


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """2 epochs of 4 steps, references init / previous / final, two measures, files on."""
    root = tmp_path_factory.mktemp("full")
    torch.manual_seed(0)
    callback = RepresentationSimilarity(probe=PROBE, reference=["init", "previous", "final"], measures=MEASURES)
    trainer = make_trainer(root, [callback], max_epochs=2)
    records = fit_recording(trainer, Net())
    log_dir = Path(trainer.logger.log_dir)
    return {
        "callback": callback,
        "log_dir": log_dir,
        "events": read_events(log_dir),
        "store": open_store(log_dir / "repsim"),
        "warnings": records,
        "trainer": trainer,
    }


def test_full_run_has_no_monitor_warnings(full_run):
    assert repsim_warnings(full_run["warnings"]) == []
    assert full_run["trainer"].global_step == 8


def test_layer_names_in_execution_order(full_run):
    assert full_run["callback"].layer_names == LAYERS
    assert full_run["store"].layers == LAYERS
    tags = full_run["events"].Tags()["scalars"]
    for depth, layer in enumerate(LAYERS):  # the depth index makes TensorBoard's alphabetical order the layers'
        assert f"repsim/linear_cka/init/{depth:02d}_{layer}" in tags
    assert sorted(t for t in tags if t.startswith("repsim/linear_cka/init/")) == [
        f"repsim/linear_cka/init/{depth:02d}_{layer}" for depth, layer in enumerate(LAYERS)
    ]


def test_snapshot_store_steps(full_run):
    assert full_run["store"].steps == FULL_STEPS
    assert full_run["callback"].store_path == full_run["log_dir"] / "repsim"


def test_tensorboard_heatmap_images(full_run):
    acc = full_run["events"]
    images = acc.Tags()["images"]
    for measure in MEASURES:
        init = acc.Images(f"repsim/{measure}/init/heatmap")
        assert [e.step for e in init] == FULL_STEPS
        previous = acc.Images(f"repsim/{measure}/previous/heatmap")
        assert [e.step for e in previous] == FULL_STEPS[1:]  # nothing to compare with at step 0
        assert all(e.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" for e in init + previous)
        assert all(e.width > 50 and e.height > 50 for e in init)
        assert f"repsim/{measure}/final/convergence_map" in images
        assert f"repsim/{measure}/final/curves" in images


def test_tensorboard_layer_scalars(full_run):
    acc = full_run["events"]
    for measure in MEASURES:
        for layer in LAYERS:
            assert sorted(scalars(acc, f"repsim/{measure}/init/{layer}")) == FULL_STEPS
            assert sorted(scalars(acc, f"repsim/{measure}/previous/{layer}")) == FULL_STEPS[1:]


def test_tensorboard_probe_text(full_run):
    acc = full_run["events"]
    assert "repsim/probe/text_summary" in acc.Tags()["tensors"]
    (event,) = acc.Tensors("repsim/probe/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert full_run["callback"]._probe.hash in text
    assert "32" in text  # the number of examples


def test_init_scalars_are_one_at_step_zero(full_run):
    acc = full_run["events"]
    for measure in MEASURES:
        for layer in LAYERS:
            values = scalars(acc, f"repsim/{measure}/init/{layer}")
            assert values[0] == pytest.approx(1.0, abs=1e-5)
    # and training moved the layers away from init
    assert scalars(acc, "repsim/linear_cka/init/body")[8] < 0.999


def test_init_scalars_match_store(full_run):
    acc, store = full_run["events"], full_run["store"]
    init = store.get(0)
    for step in FULL_STEPS:
        snapshot = store.get(step)
        for layer in LAYERS:
            expected = float(linear_cka(snapshot[layer], init[layer]))
            assert scalars(acc, f"repsim/linear_cka/init/{layer}")[step] == pytest.approx(expected, abs=1e-5)


def test_previous_scalars_are_cka_of_consecutive_snapshots(full_run):
    acc, store = full_run["events"], full_run["store"]
    for before, step in zip(FULL_STEPS, FULL_STEPS[1:]):
        a, b = store.get(step), store.get(before)
        for layer in LAYERS:
            expected = float(linear_cka(a[layer], b[layer]))
            logged = scalars(acc, f"repsim/linear_cka/previous/{layer}")[step]
            assert logged == pytest.approx(expected, abs=1e-5)
            assert logged < 1.0 - 1e-7  # really consecutive snapshots, not a snapshot with itself


def test_final_scalars_text_and_values(full_run):
    acc, store = full_run["events"], full_run["store"]
    last = store.get(FULL_STEPS[-1])
    for measure in MEASURES:
        (summary,) = acc.Tensors(f"repsim/{measure}/final/convergence_summary/text_summary")
        assert summary.step == FULL_STEPS[-1]
        text = summary.tensor_proto.string_val[0].decode()
        assert all(layer in text for layer in LAYERS)
        for layer in LAYERS:
            values = scalars(acc, f"repsim/{measure}/final/{layer}")
            assert sorted(values) == FULL_STEPS
            assert values[FULL_STEPS[-1]] == pytest.approx(1.0, abs=1e-5)
    for step in FULL_STEPS:
        snapshot = store.get(step)
        for layer in LAYERS:
            expected = float(linear_cka(snapshot[layer], last[layer]))
            assert scalars(acc, f"repsim/linear_cka/final/{layer}")[step] == pytest.approx(expected, abs=1e-5)


def test_png_and_csv_files_per_logging_point(full_run):
    figures = full_run["log_dir"] / "repsim" / "figures"
    folders = sorted(p.name for p in figures.iterdir() if p.name.startswith("step-"))
    assert folders == [f"step-{step:08d}" for step in FULL_STEPS]
    for step in FULL_STEPS:
        folder = figures / f"step-{step:08d}"
        references = ["init"] if step == 0 else ["init", "previous"]
        expected = {f"{m}__{r}.{ext}" for m in MEASURES for r in references for ext in ("png", "csv")}
        assert {p.name for p in folder.iterdir()} == expected
        for name in expected:
            if name.endswith(".png"):
                assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rows = read_csv(folder / "linear_cka__init.csv")
        assert rows[0] == ["", *LAYERS]
        assert [row[0] for row in rows[1:]] == LAYERS
        if step == 0:
            assert [float(rows[i + 1][i + 1]) for i in range(3)] == pytest.approx([1.0] * 3, abs=1e-5)
    final = figures / "final"
    for measure in MEASURES:
        for name in (f"{measure}__convergence_map.png", f"{measure}__curves.png"):
            assert (final / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rows = read_csv(final / f"{measure}__final.csv")
        assert rows[0] == ["layer", *(str(s) for s in FULL_STEPS)]
        assert [row[0] for row in rows[1:]] == LAYERS
        assert [float(row[-1]) for row in rows[1:]] == pytest.approx([1.0] * 3, abs=1e-5)
        assert (final / f"{measure}__convergence.txt").exists()


# ----------------------------------------------------------------------------- cadence


@pytest.mark.parametrize(
    "options, max_epochs, expected",
    [
        (dict(every_n_epochs=2), 3, [0, 8, 12]),  # the end of epoch 2, then the final step
        (dict(every_n_train_steps=3), 2, [0, 3, 6, 8]),  # every 3 optimizer steps, then the final step
    ],
)
def test_cadence(tmp_path, options, max_epochs, expected):
    callback = monitor(**options)
    trainer = make_trainer(tmp_path, [callback], max_epochs=max_epochs)
    trainer.fit(Net(), train_loader())
    assert trainer.global_step == expected[-1]
    assert open_store(callback.store_path).steps == expected
    acc = read_events(trainer.logger.log_dir)
    assert sorted(scalars(acc, "repsim/linear_cka/init/mid")) == expected


# ----------------------------------------------------------------------------- module and checkpoint references


def test_reference_module_with_other_architecture(tmp_path):
    torch.manual_seed(0)
    callback = monitor(reference=Other(), write_files=True)
    trainer = make_trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(Net(), train_loader())
    acc = read_events(trainer.logger.log_dir)
    heatmaps = acc.Images("repsim/linear_cka/model/heatmap")
    assert [e.step for e in heatmaps] == [0, 4]
    rows = read_csv(Path(trainer.logger.log_dir) / "repsim/figures/step-00000004/linear_cka__model.csv")
    assert rows[0] == ["", "a", "b"]  # L_a x L_b: our 3 layers against the reference's 2
    assert [row[0] for row in rows[1:]] == LAYERS
    assert all(0.0 <= float(v) <= 1.0 + 1e-9 for row in rows[1:] for v in row[1:])
    assert not any(
        tag.startswith("repsim/linear_cka/model/") and not tag.endswith("heatmap") for tag in acc.Tags()["scalars"]
    )  # no layer of the same name or count to pair


def test_reference_checkpoint(tmp_path):
    torch.manual_seed(0)
    first = Net()
    trainer = make_trainer(tmp_path / "a", [], logger=False, max_epochs=1)
    trainer.fit(first, train_loader())
    path = tmp_path / "ref.ckpt"
    trainer.save_checkpoint(path)

    second = Net()
    second.load_state_dict(first.state_dict())  # start from the reference's weights
    callback = monitor(reference=str(path))
    assert callback.references == ["ref"]
    trainer = make_trainer(tmp_path / "b", [callback], max_epochs=2)
    trainer.fit(second, train_loader())
    acc = read_events(trainer.logger.log_dir)
    assert [e.step for e in acc.Images("repsim/linear_cka/ref/heatmap")] == [0, 4, 8]
    for layer in LAYERS:
        values = scalars(acc, f"repsim/linear_cka/ref/{layer}")
        assert sorted(values) == [0, 4, 8]
        assert values[0] == pytest.approx(1.0, abs=1e-5)
    assert scalars(acc, "repsim/linear_cka/ref/body")[8] < 0.9999  # the model moved on


# ----------------------------------------------------------------------------- no TensorBoardLogger


@pytest.mark.parametrize("logger", ["none", "csv"])
def test_without_tensorboard_logger(tmp_path, logger):
    callback = monitor(reference=["init", "final"], write_files=True)
    trainer = make_trainer(
        tmp_path, [callback], logger=False if logger == "none" else CSVLogger(str(tmp_path)), max_epochs=1
    )
    records = fit_recording(trainer, Net())
    messages = repsim_warnings(records)
    assert len(messages) == 1 and "TensorBoardLogger" in messages[0]
    assert not list(tmp_path.rglob("events.out.tfevents*"))
    store_path = callback.store_path
    assert store_path is not None and Path(tmp_path) in store_path.parents
    assert open_store(store_path).steps == [0, 4]
    figures = store_path / "figures"
    assert (figures / "step-00000000" / "linear_cka__init.png").exists()
    assert (figures / "step-00000004" / "linear_cka__init.csv").exists()
    assert (figures / "final" / "linear_cka__convergence_map.png").exists()
    assert (figures / "final" / "linear_cka__final.csv").exists()


# ----------------------------------------------------------------------------- resume


def _resume_run(tmp_path, max_epochs, ckpt_path=None):
    callback = monitor(reference=["init", "previous"])
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = make_trainer(
        tmp_path, [callback, checkpoint], logger=logger, max_epochs=max_epochs, enable_checkpointing=True
    )
    torch.manual_seed(max_epochs)  # a different fresh model each time
    trainer.fit(Net(), train_loader(), ckpt_path=ckpt_path)
    return callback, trainer


def test_resume_continues_store_and_keeps_init(tmp_path):
    first, trainer = _resume_run(tmp_path, max_epochs=2)
    assert open_store(first.store_path).steps == [0, 4, 8]
    init_before = {k: v.clone() for k, v in first._reference("init").features.items()}

    second, trainer = _resume_run(tmp_path, max_epochs=4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 16
    assert second.store_path == first.store_path
    store = open_store(second.store_path)
    assert store.steps == [0, 4, 8, 12, 16]  # strictly increasing, no duplicate, none lost

    # "init" is still the original network at init, not the resumed one
    init_after = second._reference("init").features
    for layer in LAYERS:
        assert torch.equal(init_after[layer].cpu(), init_before[layer].cpu())
        assert torch.allclose(store.get(0, layer), init_after[layer].float().cpu())
    acc = read_events(Path(tmp_path) / "run" / "version_0")
    for layer in LAYERS:
        init_values = scalars(acc, f"repsim/linear_cka/init/{layer}")
        previous_values = scalars(acc, f"repsim/linear_cka/previous/{layer}")
        assert sorted(init_values) == [0, 4, 8, 12, 16]
        for step in (12, 16):
            expected = float(linear_cka(store.get(step, layer), store.get(0, layer)))
            assert init_values[step] == pytest.approx(expected, abs=1e-5)
        # "previous" continues across the resume: step 12 is compared with step 8
        expected = float(linear_cka(store.get(12, layer), store.get(8, layer)))
        assert previous_values[12] == pytest.approx(expected, abs=1e-5)


def test_resume_with_the_default_probe_and_a_shuffling_train_loader(tmp_path):
    # no validation loader: the default probe comes from the training data, which the loader shuffles
    def shuffled():
        return DataLoader(TensorDataset(*make_data(N_TRAIN, seed=0)), batch_size=BATCH, shuffle=True)

    def run(max_epochs, ckpt_path=None):
        callback = RepresentationSimilarity(reference=["init", "final"], measures=("linear_cka",), write_files=False)
        checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
        logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
        trainer = make_trainer(
            tmp_path, [callback, checkpoint], logger=logger, max_epochs=max_epochs, enable_checkpointing=True
        )
        records = fit_recording(trainer, Net(), train_dataloaders=shuffled(), ckpt_path=ckpt_path)
        return callback, records

    first, _ = run(2)
    second, records = run(3, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert not repsim_warnings(records)
    assert second.probe.hash == first.probe.hash
    assert torch.equal(second.probe.inputs, make_data(N_TRAIN, seed=0)[0])  # the dataset's examples, in order
    assert open_store(second.store_path).steps == [0, 4, 8, 12]


class _Preempted(Callback):
    """Kills fit at the end of epoch ``epoch``, after the monitor has logged it: a crash or a preemption."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("preempted")


def _autoversion_run(tmp_path, callbacks, max_epochs, ckpt_path=None, seed=0):
    logger = TensorBoardLogger(str(tmp_path), name="run")  # the default: a new version_N for every fit
    trainer = make_trainer(tmp_path, callbacks, logger=logger, max_epochs=max_epochs, enable_checkpointing=True)
    torch.manual_seed(seed)
    return trainer, fit_recording(trainer, Net(), ckpt_path=ckpt_path)


def test_mid_run_resumes_with_new_logger_versions_each_get_a_whole_store_and_leave_the_first_as_it_is(tmp_path):
    references = ["init", "previous", "final"]
    first = monitor(reference=references, write_files=True)
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_epochs=1, save_top_k=-1)
    with pytest.raises(RuntimeError, match="preempted"):
        _autoversion_run(tmp_path, [first, _Preempted(epoch=2), checkpoints], max_epochs=4)
    first_dir = tmp_path / "run" / "version_0" / "repsim"
    assert first.store_path == first_dir and open_store(first_dir).steps == [0, 4, 8, 12]
    before = _files(first_dir)  # the crashed fit's step 12 included
    init_before = {k: v.clone() for k, v in first._reference("init").features.items()}

    # two fits resume the end of epoch 1 (step 8): a preempted job's restart, and a second branch of a sweep
    for version, seed in (("version_1", 1), ("version_2", 2)):
        second = monitor(reference=references, write_files=True)
        trainer, records = _autoversion_run(
            tmp_path, [second], max_epochs=4, seed=seed, ckpt_path=str(tmp_path / "ckpt" / "epoch=1-step=8.ckpt")
        )
        new_dir = Path(trainer.logger.log_dir)
        assert new_dir.name == version and second.store_path == new_dir / "repsim"
        (message,) = repsim_warnings(records)
        assert str(first_dir) in message and str(second.store_path) in message and "up to step 8" in message
        assert "version='version_0'" in message

        # every step once, in this fit's own store beside its events: the earlier ones copied, bit for bit
        store = open_store(second.store_path)
        assert store.steps == [0, 4, 8, 12, 16]
        first_store = open_store(first_dir)
        for step in (0, 4, 8):
            for layer in LAYERS:
                assert torch.equal(store.get(step, layer), first_store.get(step, layer))
        init_after = second._reference("init").features
        for layer in LAYERS:
            assert torch.equal(init_after[layer].cpu(), init_before[layer].cpu())
            assert torch.equal(store.get(0, layer), init_before[layer].float().cpu())
        # the final map covers the whole run, in this fit's events and files
        acc = read_events(new_dir)
        for layer in LAYERS:
            final = scalars(acc, f"repsim/linear_cka/final/{layer}")
            assert sorted(final) == [0, 4, 8, 12, 16]
            assert final[4] == pytest.approx(float(linear_cka(store.get(4, layer), store.get(16, layer))), abs=1e-5)
            assert sorted(scalars(acc, f"repsim/linear_cka/init/{layer}")) == [12, 16]  # the resumed part
        rows = read_csv(second.store_path / "figures" / "final" / "linear_cka__final.csv")
        assert rows[0] == ["layer", "0", "4", "8", "12", "16"]
        for step in (4, 16):
            assert (second.store_path / "figures" / f"step-{step:08d}" / "linear_cka__init.png").exists()
        assert _files(first_dir) == before  # nothing of the first fit changed, nor was lost


def test_mid_run_resume_into_the_same_run_directory_sets_the_interrupted_steps_aside(tmp_path):
    def fit(callbacks, ckpt_path=None):
        logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
        trainer = make_trainer(tmp_path, callbacks, logger=logger, max_epochs=4, enable_checkpointing=True)
        torch.manual_seed(0)
        return trainer, fit_recording(trainer, Net(), ckpt_path=ckpt_path)

    first = monitor(reference=["init", "final"], write_files=True)
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_epochs=1, save_top_k=-1)
    with pytest.raises(RuntimeError, match="preempted"):
        fit([first, _Preempted(epoch=2), checkpoints])
    crashed_12 = open_store(first.store_path).get(12)

    second = monitor(reference=["init", "final"], write_files=True)
    trainer, records = fit([second], ckpt_path=str(tmp_path / "ckpt" / "epoch=1-step=8.ckpt"))
    assert second.store_path == first.store_path  # continued in place
    assert open_store(second.store_path).steps == [0, 4, 8, 12, 16]
    aside = first.store_path / "superseded" / "after-step-00000008"
    (message,) = repsim_warnings(records)
    assert "steps [12]" in message and str(aside) in message
    crashed = open_store(aside / "store")  # the interrupted fit's own step 12, kept, readable, with its figures
    assert crashed.steps == [12]
    for layer in LAYERS:
        assert torch.equal(crashed.get(12, layer), crashed_12[layer])
    assert (aside / "figures" / "step-00000012" / "linear_cka__init.png").exists()


def test_resume_when_the_recorded_store_is_gone_starts_a_new_one(tmp_path):
    first = monitor(reference=["init", "final"])
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    _autoversion_run(tmp_path, [first, checkpoint], max_epochs=2)
    shutil.rmtree(first.store_path)

    second = monitor(reference=["init", "final"])
    trainer, records = _autoversion_run(
        tmp_path, [second], max_epochs=4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert trainer.global_step == 16
    (message,) = repsim_warnings(records)
    assert str(first.store_path) in message and str(second.store_path) in message and "up to step 8" in message
    assert second.store_path == Path(trainer.logger.log_dir) / "repsim"
    assert open_store(second.store_path).steps == [12, 16]
    assert sorted(scalars(read_events(trainer.logger.log_dir), "repsim/linear_cka/final/mid")) == [12, 16]


def test_resume_with_a_read_only_recorded_store_leaves_it_and_starts_a_whole_new_one(tmp_path, monkeypatch):
    def fit(callbacks, max_epochs, ckpt_path=None):
        logger = TensorBoardLogger(str(tmp_path), name="run", version=0)  # the same run directory
        trainer = make_trainer(tmp_path, callbacks, logger=logger, max_epochs=max_epochs, enable_checkpointing=True)
        return trainer, fit_recording(trainer, Net(), ckpt_path=ckpt_path)

    first = monitor(reference=["init", "final"], write_files=True)
    fit([first, ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)], max_epochs=2)
    before = _files(first.store_path)
    from lightning_repsim.callbacks import _outputs as similarity_module

    real = similarity_module._writable  # an archived run: the tests run as root, where chmod cannot tell
    monkeypatch.setattr(similarity_module, "_writable", lambda d: d != first.store_path and real(d))
    second = monitor(reference=["init", "final"], write_files=True)
    trainer, records = fit([second], max_epochs=4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 16 and repsim_warnings(records, "failed") == []
    (message,) = repsim_warnings(records)
    assert "read-only" in message and str(first.store_path) in message and "up to step 8" in message
    assert second.store_path == first.store_path.parent / "repsim-1"
    assert open_store(second.store_path).steps == [0, 4, 8, 12, 16]
    assert _files(first.store_path) == before  # untouched, figures/final included


def test_resume_whose_copy_fails_still_trains_and_monitors(tmp_path, monkeypatch):
    first = monitor(reference=["init", "final"], write_files=True)
    _autoversion_run(tmp_path, [first, ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)], max_epochs=2)
    before = _files(first.store_path)

    def disk_full(self, path, step):
        Path(path).mkdir(parents=True)
        (Path(path) / "step-0000000000.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SnapshotStore, "copy_until", disk_full)
    second = monitor(reference=["init", "final"], write_files=True)
    trainer, records = _autoversion_run(
        tmp_path, [second], max_epochs=4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert trainer.global_step == 16
    assert any("could not copy" in m and "No space left" in m for m in repsim_warnings(records))
    assert open_store(second.store_path).steps == [12, 16]  # this fit's own steps, no partial copy
    assert _files(first.store_path) == before


def test_resume_in_a_copy_of_the_run_directory_continues_the_copy(tmp_path):
    first = monitor(reference=["init", "final"])
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    logger = TensorBoardLogger(str(tmp_path), name="run", version="original")
    make_trainer(tmp_path, [first, checkpoint], logger=logger, max_epochs=2, enable_checkpointing=True).fit(
        Net(), train_loader()
    )
    shutil.copytree(tmp_path / "run" / "original", tmp_path / "run" / "copy")
    before = _files(first.store_path)

    second = monitor(reference=["init", "final"])
    logger = TensorBoardLogger(str(tmp_path), name="run", version="copy")
    trainer = make_trainer(tmp_path, [second], logger=logger, max_epochs=4)
    records = fit_recording(trainer, Net(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.store_path == tmp_path / "run" / "copy" / "repsim" and repsim_warnings(records) == []
    assert open_store(second.store_path).steps == [0, 4, 8, 12, 16]
    assert _files(first.store_path) == before


def test_resume_after_moving_the_run_directory_finds_the_store_by_its_run_id(tmp_path):
    first = monitor(reference=["init", "final"])
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "a" / "ckpt"), save_last=True)
    trainer = make_trainer(tmp_path / "a", [first, checkpoint], enable_checkpointing=True)
    trainer.fit(Net(), train_loader())
    shutil.move(tmp_path / "a", tmp_path / "b")  # the recorded path is gone; the store is where the logger points

    second = monitor(reference=["init", "final"])
    trainer = make_trainer(tmp_path / "b", [second], max_epochs=3)
    records = fit_recording(trainer, Net(), ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert repsim_warnings(records) == []
    assert second.store_path == tmp_path / "b" / "run" / "version_0" / "repsim"
    assert open_store(second.store_path).steps == [0, 4, 8, 12]


@pytest.mark.parametrize("version", [0, None])
def test_checkpoint_without_the_store_location_still_resumes(tmp_path, version):
    """A checkpoint of state version 1 (no output_dir / run_id): the store is looked for in the run directory."""
    first = monitor(reference=["init", "final"])
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = make_trainer(
        tmp_path,
        [first, checkpoint],
        logger=TensorBoardLogger(str(tmp_path), "run", version=0),
        enable_checkpointing=True,
    )
    trainer.fit(Net(), train_loader())
    old = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    state = old["callbacks"][first.state_key]
    del state["output_dir"], state["run_id"]
    state["version"] = 1
    torch.save(old, tmp_path / "old.ckpt")

    second = monitor(reference=["init", "final"])
    trainer = make_trainer(
        tmp_path, [second], logger=TensorBoardLogger(str(tmp_path), "run", version=version), max_epochs=3
    )
    records = fit_recording(trainer, Net(), ckpt_path=str(tmp_path / "old.ckpt"))
    assert trainer.global_step == 12
    if version == 0:  # found where it always was: continued, as before
        assert repsim_warnings(records) == []
        assert second.store_path == first.store_path and open_store(second.store_path).steps == [0, 4, 8, 12]
    else:  # not to be found: a new store, and a warning that the earlier snapshots are not in it
        (message,) = repsim_warnings(records, "older lightning_repsim")
        assert str(second.store_path.parent) in message and "up to step 8" in message
        assert second.store_path.parent.name == "version_1" and open_store(second.store_path).steps == [12]
        assert open_store(first.store_path).steps == [0, 4, 8]


def _files(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("logger, probe", [("tb", "same"), ("tb", "other"), ("none", "same")])
def test_a_second_fresh_fit_into_the_same_run_directory_gets_its_own_store(tmp_path, logger, probe):
    """A fixed logger version (or logger=False and the same default_root_dir): a re-run notebook cell."""
    probes = {"same": PROBE, "other": make_data(24, seed=5)[0]}

    def fresh_fit(probe, seed):
        callback = monitor(reference=["init", "final"], probe=probe, write_files=True)
        tb = TensorBoardLogger(str(tmp_path), name="run", version="v1") if logger == "tb" else False
        trainer = make_trainer(tmp_path, [callback], logger=tb, max_epochs=2)
        torch.manual_seed(seed)
        return callback, trainer, fit_recording(trainer, Net())

    first, trainer, _ = fresh_fit(PROBE, seed=0)
    run_dir = Path(trainer.log_dir)
    assert first.store_path == run_dir / "repsim"
    before = _files(first.store_path)
    events_before = set(run_dir.glob("events.out.tfevents*"))

    second, trainer, records = fresh_fit(probes[probe], seed=1)
    assert repsim_warnings(records, "failed") == []
    (message,) = repsim_warnings(records, "already holds")
    assert str(first.store_path) in message and str(second.store_path) in message
    assert second.store_path == run_dir / "repsim-1"
    assert _files(first.store_path) == before  # byte for byte, nothing added

    store = open_store(second.store_path)
    assert store.steps == [0, 4, 8]
    assert (store.probe_hash == open_store(first.store_path).probe_hash) == (probe == "same")
    assert store.run_id != open_store(first.store_path).run_id
    assert (second.store_path / "figures" / "step-00000008" / "linear_cka__init.csv").exists()
    assert (second.store_path / "figures" / "final" / "linear_cka__final.csv").exists()
    if logger == "tb":  # the second fit's own event file holds its heatmaps and scalars
        (events,) = set(run_dir.glob("events.out.tfevents*")) - events_before
        acc = read_events(events)
        assert [e.step for e in acc.Images("repsim/linear_cka/init/heatmap")] == [0, 4, 8]
        for layer in LAYERS:
            expected = float(linear_cka(store.get(8, layer), store.get(0, layer)))
            assert scalars(acc, f"repsim/linear_cka/init/{layer}")[8] == pytest.approx(expected, abs=1e-5)
            assert sorted(scalars(acc, f"repsim/linear_cka/final/{layer}")) == [0, 4, 8]

    third, _, _ = fresh_fit(PROBE, seed=2)
    assert third.store_path == run_dir / "repsim-2" and open_store(third.store_path).steps == [0, 4, 8]
    assert _files(first.store_path) == before


def test_a_callback_object_reused_for_a_second_fit_monitors_it_afresh(tmp_path):
    callback = monitor(reference=["init", "previous"], write_files=True)
    stores = []
    for seed in (0, 1):
        trainer = make_trainer(tmp_path, [callback], logger=TensorBoardLogger(str(tmp_path), "run", version=0))
        torch.manual_seed(seed)
        records = fit_recording(trainer, Net())
        assert repsim_warnings(records, "failed") == []
        stores.append(open_store(callback.store_path))
    assert [s.path.name for s in stores] == ["repsim", "repsim-1"]
    assert stores[0].steps == stores[1].steps == [0, 4, 8]
    init = callback._reference("init").features  # the second model's init, not the first's
    for layer in LAYERS:
        assert torch.equal(stores[1].get(0, layer), init[layer].float())
        assert not torch.equal(stores[0].get(0, layer), stores[1].get(0, layer))


def test_figures_only_fits_do_not_overwrite_each_other(tmp_path):
    for seed in (0, 1):
        callback = monitor(store=False, write_files=True)
        trainer = make_trainer(tmp_path, [callback], logger=TensorBoardLogger(str(tmp_path), "run", version=0))
        torch.manual_seed(seed)
        fit_recording(trainer, Net())
        if seed == 0:
            before = _files(tmp_path / "run" / "version_0" / "repsim")
    assert _files(tmp_path / "run" / "version_0" / "repsim") == before
    assert (tmp_path / "run" / "version_0" / "repsim-1" / "figures" / "step-00000008" / "linear_cka__init.csv").exists()


# ----------------------------------------------------------------------------- background worker


def _run_with(tmp_path, background, name):
    torch.manual_seed(0)
    callback = monitor(
        reference=["init", "previous", "final"], measures=("linear_cka", "rv2"), background=background, write_files=True
    )
    logger = TensorBoardLogger(str(tmp_path), name=name, version=0)
    trainer = make_trainer(tmp_path, [callback], logger=logger, max_epochs=2)
    trainer.fit(Net(), train_loader())
    return callback, Path(trainer.logger.log_dir)


def test_background_work_runs_off_the_training_thread_and_changes_nothing(tmp_path, monkeypatch):
    threads = []
    original = RepresentationSimilarity._compare_and_write

    def recording(self, *args, **kwargs):
        threads.append(threading.current_thread())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RepresentationSimilarity, "_compare_and_write", recording)
    _, async_dir = _run_with(tmp_path, True, "async")
    assert len(threads) == 3 and threading.main_thread() not in threads
    threads.clear()
    _, sync_dir = _run_with(tmp_path, False, "sync")
    assert threads == [threading.main_thread()] * 3
    threads.clear()
    _run_with(tmp_path, None, "default")
    assert threads == [threading.main_thread()] * 3  # the default on CPU: training already uses every core

    a, b = open_store(async_dir / "repsim"), open_store(sync_dir / "repsim")
    assert a.steps == b.steps == [0, 4, 8]
    for step in a.steps:
        for layer in LAYERS:
            assert torch.equal(a.get(step, layer), b.get(step, layer))
    events_a, events_b = read_events(async_dir), read_events(sync_dir)
    tags = sorted(t for t in events_b.Tags()["scalars"] if t.startswith("repsim/"))
    assert tags == sorted(t for t in events_a.Tags()["scalars"] if t.startswith("repsim/")) and len(tags) == 18
    for tag in tags:
        assert scalars(events_a, tag) == pytest.approx(scalars(events_b, tag), abs=1e-12, nan_ok=True), tag
    for tag in events_b.Tags()["images"]:
        assert [e.step for e in events_a.Images(tag)] == [e.step for e in events_b.Images(tag)]
    files = sorted(p.relative_to(sync_dir) for p in (sync_dir / "repsim" / "figures").rglob("*.*"))
    assert files == sorted(p.relative_to(async_dir) for p in (async_dir / "repsim" / "figures").rglob("*.*"))


class _StoreAtCheckpoint(Callback):
    """Records, whenever a checkpoint is taken, the monitor's last step and what its store holds then."""

    def __init__(self):
        self.seen = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        cb = next(c for c in trainer.callbacks if isinstance(c, RepresentationSimilarity))
        state = checkpoint["callbacks"][cb.state_key]
        self.seen.append((state["last_logged_step"], open_store(cb.store_path).steps))


def test_checkpoint_waits_until_the_store_holds_the_logged_step(tmp_path, monkeypatch):
    from lightning_repsim.store import SnapshotStore

    original = SnapshotStore.add

    def slow_add(self, *args, **kwargs):
        time.sleep(0.3)  # a slow disk: without the wait the checkpoint would run ahead of the store
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SnapshotStore, "add", slow_add)
    recorder = _StoreAtCheckpoint()
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_epochs=1, save_top_k=-1)
    trainer = make_trainer(
        tmp_path, [monitor(background=True), checkpoint, recorder], max_epochs=3, enable_checkpointing=True
    )
    trainer.fit(Net(), train_loader())
    assert [last for last, _ in recorder.seen] == [4, 8, 12]
    for last, steps in recorder.seen:
        assert steps[-1] == last


# ----------------------------------------------------------------------------- DDP


class DDPChecks(Callback):
    """Runs in each spawned process: assertions here fail the fit (child exceptions come back)."""

    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, RepresentationSimilarity))
        assert trainer.world_size == 2
        assert cb.layer_names == LAYERS
        assert cb._last_logged_step == trainer.global_step
        if trainer.is_global_zero:
            assert cb.store_path is not None
            assert open_store(cb.store_path).steps == [0, 2, 4]
        else:
            assert cb.store_path is None and cb._sink is None


def test_ddp_spawn_two_cpu_processes(tmp_path):
    # No TensorBoardLogger: the callback falls back to trainer.log_dir, a broadcast from rank 0
    # that every rank must join (a rank-0-only call hangs the run).
    callback = monitor(every_n_train_steps=2, reference=["init", "previous"], write_files=True)
    trainer = make_trainer(
        tmp_path, [callback, DDPChecks()], logger=False, max_epochs=2, devices=2, strategy="ddp_spawn"
    )
    trainer.fit(Net(), train_loader())  # 4 steps: 64 examples / 2 ranks / batch 16, times 2 epochs
    stores = list(Path(tmp_path).rglob("manifest.json"))
    assert stores == [Path(tmp_path) / "repsim" / "manifest.json"]  # one store, written by rank 0
    store = open_store(stores[0].parent)
    assert store.steps == [0, 2, 4] and store.layers == LAYERS
    figures = Path(tmp_path) / "repsim" / "figures"
    assert sorted(p.name for p in figures.iterdir()) == ["step-00000000", "step-00000002", "step-00000004"]
    assert sorted(p.name for p in (figures / "step-00000004").iterdir()) == [
        "linear_cka__init.csv",
        "linear_cka__init.png",
        "linear_cka__previous.csv",
        "linear_cka__previous.png",
    ]
    rows = read_csv(figures / "step-00000000" / "linear_cka__init.csv")
    assert [float(rows[i + 1][i + 1]) for i in range(3)] == pytest.approx([1.0] * 3, abs=1e-5)
    assert not list(Path(tmp_path).rglob("events.out.tfevents*"))


def test_ddp_spawn_numbers_equal_one_process_and_tensorboard_is_written_once(tmp_path):
    torch.manual_seed(3)
    model = Net()
    initial = Net()
    initial.load_state_dict(model.state_dict())
    callback = monitor(every_n_train_steps=2, reference=["init", "final"])
    trainer = make_trainer(tmp_path, [callback, DDPChecks()], max_epochs=2, devices=2, strategy="ddp_spawn")
    trainer.fit(model, train_loader())  # ddp_spawn copies rank 0's trained weights back into `model`
    events = list(Path(tmp_path).rglob("events.out.tfevents*"))
    assert len(events) == 1  # rank 0 alone writes TensorBoard events
    store = open_store(Path(tmp_path) / "run" / "version_0" / "repsim")
    # one process, same weights: the snapshots are the same features ...
    for step, net in ((0, initial), (4, model)):
        expected = capture(net, PROBE)
        for name in LAYERS:
            torch.testing.assert_close(store.get(step, name), expected[name], rtol=1e-6, atol=1e-6)
    # ... and the logged similarities are the same numbers
    acc = read_events(events[0].parent)
    start, end = capture(initial, PROBE), capture(model, PROBE)
    for name in LAYERS:
        logged = scalars(acc, f"repsim/linear_cka/init/{name}")
        assert sorted(logged) == [0, 2, 4]
        assert logged[4] == pytest.approx(float(linear_cka(end[name], start[name])), abs=1e-6)
        final = scalars(acc, f"repsim/linear_cka/final/{name}")
        assert final[0] == pytest.approx(float(linear_cka(start[name], end[name])), abs=1e-6)


# ----------------------------------------------------------------------------- token sequences, outputs

VOCAB, TOKENS, DIM = 12, 5, 8


def token_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, TOKENS), generator=g)
    return x, (x[:, 0] < VOCAB // 2).long()


TOKEN_PROBE = token_data(16, seed=1)[0]


class TokenNet(pl.LightningModule):
    """A transformer's shapes in small: nn.Embedding, then an nn.Linear on (N, T, D), then a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(self.embed(x))).mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        return DataLoader(TensorDataset(*token_data(N_TRAIN, seed=0)), batch_size=BATCH)


def token_sequences(model, x):
    """The (N, T, D) outputs of ``model``'s embed and proj layers."""
    with torch.no_grad():
        embedded = model.embed(x)
        return {"embed": embedded, "proj": model.proj(embedded)}


@pytest.mark.parametrize(
    "token_reduction, reduce",
    [
        ("first", lambda h: h[:, 0]),
        ("mean", lambda h: h.mean(1)),
        ("last", lambda h: h[:, -1]),
    ],
)
def test_token_reduction_in_the_store_and_for_references(tmp_path, token_reduction, reduce):
    torch.manual_seed(0)
    model, other = TokenNet(), TokenNet()
    at_init = token_sequences(model, TOKEN_PROBE)
    callback = monitor(
        probe=TOKEN_PROBE,
        reference=["init", other],
        layers=["embed", "proj"],
        layout="tokens",
        token_reduction=token_reduction,
    )
    trainer = make_trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(model)
    store = open_store(callback.store_path)
    assert store.steps == [0, STEPS_PER_EPOCH]
    for layer, h in at_init.items():
        assert store.kinds[layer] == "features"
        assert store.get(0, layer).shape == (len(TOKEN_PROBE), DIM)  # tokens reduced, hidden units kept
        torch.testing.assert_close(store.get(0, layer), reduce(h))
    for layer, h in token_sequences(other, TOKEN_PROBE).items():
        torch.testing.assert_close(callback._reference("module").features[layer], reduce(h))
    settings = store.settings
    assert settings["layout"] == "tokens" and settings["token_reduction"] == token_reduction
    acc = read_events(trainer.logger.log_dir)
    (event,) = acc.Tensors("repsim/probe/text_summary")
    assert f"| token_reduction | `{token_reduction}` |" in event.tensor_proto.string_val[0].decode()


class PairOut(nn.Module):
    """A layer whose output is a pair, the second entry the representation of interest."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(N_IN, 4)

    def forward(self, x):
        h = self.linear(x)
        return h, torch.tanh(h)


class PairNet(Net):
    def __init__(self):
        super().__init__(width=4)
        self.body = PairOut()

    def forward(self, x):
        return self.head(self.mid(self.body(x)[1]))


def second(output):
    """A callable selector sees every selected layer's output, tensors included."""
    return output[1] if isinstance(output, tuple) else output


def doubled_probe(model, batch):
    return model(2 * batch)


def tokens_reversed(model, batch):
    return model(batch.flip(1))


@pytest.mark.parametrize("output_selector", [1, second])
def test_output_selector_and_forward_reach_every_capture(tmp_path, output_selector):
    torch.manual_seed(0)
    model, other = PairNet(), PairNet()
    callback = monitor(
        reference=["init", other], layers=["body", "mid"], output_selector=output_selector, forward=doubled_probe
    )
    with torch.no_grad():
        expected = torch.tanh(model.body.linear(2 * PROBE))
        expected_other = torch.tanh(other.body.linear(2 * PROBE))
    make_trainer(tmp_path, [callback], max_epochs=1).fit(model, train_loader())
    store = open_store(callback.store_path)
    torch.testing.assert_close(store.get(0, "body"), expected)
    torch.testing.assert_close(callback._reference("module").features["body"], expected_other)
    assert store.settings["output_selector"] == (1 if output_selector == 1 else f"{__name__}.second")
    assert store.settings["forward"] == f"{__name__}.doubled_probe"


# ----------------------------------------------------------------------------- LightningCLI


class CLINet(Net):
    """Net with a parameter-free ``act`` module (selected by type from YAML) and its own data."""

    def __init__(self):
        super().__init__()
        self.act = nn.Tanh()

    def forward(self, x):
        return self.head(self.act(self.mid(self.act(self.body(x)))))

    def train_dataloader(self):
        return train_loader()


def run_cli(tmp_path, callback_yaml, model_class=CLINet):
    """A real LightningCLI (run=False) from a YAML config file whose only callback is ``callback_yaml``."""
    config = tmp_path / "config.yaml"
    config.write_text(f"""
trainer:
  default_root_dir: {tmp_path}
  max_epochs: 1
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  log_every_n_steps: 1
  logger:
    class_path: pytorch_lightning.loggers.TensorBoardLogger
    init_args: {{save_dir: {tmp_path}, name: run, version: 0}}
  callbacks:
    - class_path: lightning_repsim.RepresentationSimilarity
      init_args:
{textwrap.indent(textwrap.dedent(callback_yaml).strip(), " " * 8)}
""")
    cli = LightningCLI(model_class, run=False, args=["--config", str(config)], save_config_kwargs={"overwrite": True})
    [callback] = [c for c in cli.trainer.callbacks if isinstance(c, RepresentationSimilarity)]
    dumped = yaml.safe_load(cli.parser.dump(cli.config))["trainer"]["callbacks"][0]["init_args"]
    return cli, callback, dumped


def test_lightning_cli_yaml_sets_every_argument_and_fit_runs(tmp_path):
    torch.manual_seed(0)
    cli, callback, dumped = run_cli(
        tmp_path,
        f"""
        probe: "train:32"
        reference: [init, previous, final, {{class_path: {__name__}.Other}}]
        measures: [linear_cka, svcca]
        layers: [torch.nn.Tanh, "m*"]
        reference_layers: torch.nn.Linear
        every_n_epochs: null
        every_n_train_steps: 2
        max_features: 64
        batch_size: 16
        measure_options: {{svcca: {{keep: 0.99}}}}
        threshold: 0.9
        store: true
        max_store_bytes: 100000000
        write_files: true
        strict: true
        background: false
    """,
    )
    assert callback.probe_source == "train:32"
    assert callback.references == ["init", "previous", "final", "model"]
    assert isinstance(callback._reference("module").source, Other)
    assert callback.measures == ("linear_cka", "svcca")
    assert callback.layers == ["torch.nn.Tanh", "m*"] and callback.reference_layers == "torch.nn.Linear"
    assert (callback.every_n_epochs, callback.every_n_train_steps) == (None, 2)
    assert (callback.max_features, callback.batch_size, callback.max_store_bytes) == (64, 16, 100_000_000)
    assert callback.options["svcca"] == {"keep": 0.99}
    assert (callback.threshold, callback.keep_store, callback.write_files) == (0.9, True, True)
    assert callback.strict is True and callback.background is False
    # --print_config shows lists as lists, not as their text
    assert dumped["reference"][:3] == ["init", "previous", "final"]
    assert dumped["reference"][3]["class_path"].endswith(".Other")
    assert dumped["layers"] == ["torch.nn.Tanh", "m*"] and dumped["measures"] == ["linear_cka", "svcca"]

    cli.trainer.fit(cli.model)
    assert callback.layer_names == ["act", "mid"]  # the Tanh by its import path, then the glob
    store = open_store(callback.store_path)
    assert store.steps == [0, 2, 4] and store.layers == ["act", "mid"]
    rows = read_csv(Path(cli.trainer.logger.log_dir) / "repsim/figures/step-00000004/svcca__model.csv")
    assert rows[0] == ["", "a", "b"] and [row[0] for row in rows[1:]] == ["act", "mid"]
    assert (Path(cli.trainer.logger.log_dir) / "repsim/figures/final/linear_cka__final.csv").is_file()


def test_lightning_cli_yaml_sets_token_reduction_output_selector_and_forward(tmp_path):
    torch.manual_seed(0)
    cli, callback, dumped = run_cli(
        tmp_path,
        f"""
        probe: "train:16"
        reference: init
        measures: linear_cka
        layers: [torch.nn.Embedding, proj]
        layout: {{embed: auto, proj: tokens}}
        token_reduction: first
        output_selector: 0
        forward: {__name__}.tokens_reversed
        write_files: false
    """,
        model_class=TokenNet,
    )
    assert callback.layout == {"embed": "auto", "proj": "tokens"} and callback.token_reduction == "first"
    assert callback.output_selector == 0 and callback.forward is tokens_reversed
    assert dumped["layout"] == {"embed": "auto", "proj": "tokens"} and dumped["forward"].endswith(".tokens_reversed")
    at_init = token_sequences(cli.model, token_data(N_TRAIN, seed=0)[0][:16])
    cli.trainer.fit(cli.model)
    store = open_store(callback.store_path)
    assert store.layers == ["embed", "proj"]
    for layer, h in at_init.items():  # the first token of the reversed sequence: the last one
        torch.testing.assert_close(store.get(0, layer), h[:, -1])


# ----------------------------------------------------------------------------- bad input


def test_layer_selector_matching_nothing_fails_before_training(tmp_path):
    model = Net()
    trainer = make_trainer(tmp_path, [monitor(layers=["mid", "nope"])])
    with pytest.raises(ValueError, match="nope") as info:
        trainer.fit(model, train_loader())
    assert "available layers" in str(info.value)
    assert all(repr(name) in str(info.value) for name in LAYERS)
    assert model.train_steps_run == 0


def test_probe_too_small_for_debiased_cka(tmp_path):
    model = Net()
    callback = monitor(probe=PROBE[:3], measure_options={"linear_cka": {"debiased": True}})
    with pytest.raises(ValueError, match="3 example.*at least 4"):
        make_trainer(tmp_path, [callback]).fit(model, train_loader())
    assert model.train_steps_run == 0


def test_reference_module_that_cannot_run_the_probe(tmp_path):
    model = Net()
    wrong = nn.Sequential(nn.Linear(N_IN + 1, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"reference 'model' \(Sequential\) cannot run the probe of shape \(32, 6\)"):
        make_trainer(tmp_path, [monitor(reference=wrong)]).fit(model, train_loader())
    assert model.train_steps_run == 0


def test_missing_checkpoint_reference(tmp_path):
    model = Net()
    callback = monitor(reference="foo")  # not a keyword: taken for a checkpoint path
    assert callback.references == ["foo"]
    with pytest.raises(ValueError, match="'foo' does not exist. A reference is one of 'init', 'previous', 'final'"):
        make_trainer(tmp_path, [callback]).fit(model, train_loader())
    assert model.train_steps_run == 0


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(every_n_epochs=0), "every_n_epochs must be a positive int"),
        (dict(every_n_train_steps=-1), "every_n_train_steps must be a positive int"),
        (dict(every_n_epochs=None), "set every_n_epochs or every_n_train_steps"),
        (dict(measures=("nope",)), "unknown measure 'nope'"),
        (dict(measures=()), "measures is empty"),
        (dict(measure_options={"rv2": {}}), "not among measures"),
        (dict(reference=[]), "reference is empty"),
        (dict(reference=["init", "init"]), "references repeat"),
        (dict(reference=3), "is not one of"),
        (dict(reference="final", store=False), "keep store=True"),
        (dict(threshold=0.0), "threshold"),
        (dict(probe="test:10"), "probe string"),
        (dict(max_features=0), "max_features must be a positive int"),
        (dict(layout="sequence"), r"layout must be one of \('auto', 'conv', 'tokens'\), got 'sequence'"),
        (dict(layout={"proj": "token"}), "layout must be one of .* got 'token'"),
        (dict(token_reduction="max"), "token_reduction must be one of .* got 'max'"),
        (dict(output_selector=1.5), "output_selector must be None, an int index, a str key or a callable"),
        (dict(forward="model"), "forward must be None or a callable"),
    ],
)
def test_invalid_constructor_arguments(options, match):
    with pytest.raises(ValueError, match=match):
        monitor(**options)


# ----------------------------------------------------------------------------- robustness


def test_nan_activations_warn_once_per_layer_and_training_continues(tmp_path):
    torch.manual_seed(0)
    callback = monitor(reference=["init", "previous", "final"], every_n_train_steps=2)
    trainer = make_trainer(tmp_path, [callback], max_epochs=2)
    records = fit_recording(trainer, NaNNet())
    assert trainer.global_step == 8  # training ran to the end
    nonfinite = repsim_warnings(records, "NaN/Inf activations")
    # head's input is NaN from step 2; the NaN loss makes every weight NaN after that step
    for layer in LAYERS:
        assert len([m for m in nonfinite if f"layer {layer!r}" in m]) == 1, nonfinite
    assert len(nonfinite) == 3
    assert len(repsim_warnings(records)) == 3, repsim_warnings(records)  # nothing else, e.g. from "final"
    assert repsim_warnings(records, "failed") == []  # every logging point went through
    store = open_store(callback.store_path)
    assert store.steps == [0, 2, 4, 6, 8]
    acc = read_events(trainer.logger.log_dir)
    head, mid = scalars(acc, "repsim/linear_cka/init/head"), scalars(acc, "repsim/linear_cka/init/mid")
    assert head[0] == pytest.approx(1.0, abs=1e-5) and math.isnan(head[2])
    assert not math.isnan(mid[2]) and math.isnan(mid[4])  # NaN cells only where due
    assert math.isnan(scalars(acc, "repsim/linear_cka/init/body")[4])  # the wide (p > n) layer too
    assert [e.step for e in acc.Images("repsim/linear_cka/final/convergence_map")] == [8]


def _raise(*args, **kwargs):
    raise RuntimeError("boom")


def test_exception_in_monitor_does_not_kill_fit(tmp_path, monkeypatch):
    monkeypatch.setattr("lightning_repsim.callbacks._reporting.similarity_matrix", _raise)
    callback = monitor(reference=["init", "final"], every_n_train_steps=2)
    trainer = make_trainer(tmp_path, [callback], max_epochs=1)
    records = fit_recording(trainer, NaNNet())
    assert trainer.global_step == STEPS_PER_EPOCH
    failures = repsim_warnings(records, "failed")
    for step in (0, 2, 4):
        assert any(f"global step {step}" in m and "RuntimeError: boom" in m for m in failures), failures
    # a warning raised before the failure at the same logging point is still shown
    assert len(repsim_warnings(records, "layer 'head' produced NaN/Inf activations at step 2")) == 1


def test_exception_in_monitor_is_raised_when_strict(tmp_path, monkeypatch):
    monkeypatch.setattr("lightning_repsim.callbacks._reporting.similarity_matrix", _raise)
    model = Net()
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(tmp_path, [monitor(strict=True)], max_epochs=1).fit(model, train_loader())
    assert model.train_steps_run == 0  # raised at the step-0 snapshot


class _DeadLayerNet(pl.LightningModule):
    """The middle layer's weights and bias are zero and never trained: its output is constant."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 16)
        self.dead = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)
        for p in self.dead.parameters():
            nn.init.zeros_(p)
            p.requires_grad_(False)

    def forward(self, x):
        return self.head(self.dead(torch.relu(self.first(x))) + self.first(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_dead_layer_warns_once_and_gives_nan(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_repsim.errors import RepSimWarning

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 2, (64,), generator=g))
    monitor = RepresentationSimilarity(
        probe=torch.randn(32, 8, generator=g),
        reference="init",
        measures=("linear_cka",),
        write_files=False,
        store=False,
    )
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_DeadLayerNet(), DataLoader(data, batch_size=16))
    dead = [w for w in caught if issubclass(w.category, RepSimWarning) and "'dead'" in str(w.message)]
    assert len(dead) == 1 and "constant over the probe" in str(dead[0].message)
    assert trainer.current_epoch == 3
