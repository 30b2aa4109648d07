"""The probe saved with the snapshot store: written when the store is made, used on resume.

Real ``Trainer.fit`` runs on CPU, resumed with ``ckpt_path``. A resumed fit whose default probe
(``"val:N"``) now yields other examples takes the saved one and says so; a probe given as data that
changed is the clear configuration error it always was; a failed write of the probe never stops
the fit.
"""

import json
import logging

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_repsim.callbacks import RepresentationSimilarity
from lightning_repsim.capture import Probe
from lightning_repsim.errors import RepSimError
from lightning_repsim.store import MANIFEST_NAME, PROBE_FILE, SnapshotStore, open_store
from tests.callbacks.test_similarity import PROBE, Net, fit_recording, make_data, make_trainer, repsim_warnings
from tests.test_store_integrity import as_format_1

N_VAL = 24


class ValNet(Net):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


def val_loader(seed):
    return DataLoader(TensorDataset(*make_data(N_VAL, seed=seed)), batch_size=8)


def run(tmp_path, max_epochs, val_seed=5, ckpt_path=None, **options):
    """A fit of ``max_epochs`` (4 steps each) into run/version_0 saving last.ckpt: the callback and the warnings."""
    options = {"reference": ["init", "final"], "measures": ("linear_cka",), "write_files": False, **options}
    callback = RepresentationSimilarity(**options)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = make_trainer(
        tmp_path, [callback, checkpoint], logger=logger, max_epochs=max_epochs, enable_checkpointing=True
    )
    torch.manual_seed(max_epochs)
    records = fit_recording(trainer, ValNet(), val_dataloaders=val_loader(val_seed), ckpt_path=ckpt_path)
    return callback, records


def last(tmp_path):
    return str(tmp_path / "ckpt" / "last.ckpt")


def test_a_new_store_keeps_the_probe_it_was_recorded_on(tmp_path):
    callback, records = run(tmp_path, 1, probe=PROBE)
    assert repsim_warnings(records) == []
    store = open_store(callback.store_path)
    assert store.has_probe and store.verify() == []
    assert torch.equal(store.load_probe(), PROBE) and Probe(store.load_probe()).hash == store.probe_hash


def test_a_resumed_fit_whose_default_probe_changed_uses_the_saved_probe(tmp_path, caplog):
    first, _ = run(tmp_path, 2, val_seed=5)  # probe "val:512": the 24 validation examples
    assert torch.equal(first.probe.inputs, make_data(N_VAL, seed=5)[0])
    with caplog.at_level(logging.INFO):
        second, records = run(tmp_path, 3, val_seed=6, ckpt_path=last(tmp_path))  # other validation data now
    assert repsim_warnings(records) == []
    assert second.probe.hash == first.probe.hash
    assert torch.equal(second.probe.inputs, make_data(N_VAL, seed=5)[0])
    (message,) = [r.getMessage() for r in caplog.records if "saved with its snapshot store" in r.getMessage()]
    assert "'val:512'" in message and str(first.store_path) in message
    store = open_store(second.store_path)
    assert second.store_path == first.store_path and store.steps == [0, 4, 8, 12] and store.verify() == []


def test_a_resumed_fit_given_other_probe_data_is_refused_with_the_fix(tmp_path):
    run(tmp_path, 1, probe=PROBE)
    with pytest.raises(RepSimError, match=r"the probe set changed since the checkpoint .* same probe= data"):
        run(tmp_path, 2, probe=PROBE + 1, ckpt_path=last(tmp_path))


def test_a_changed_default_probe_without_a_saved_one_is_refused_with_the_fix(tmp_path):
    first, _ = run(tmp_path, 1, val_seed=5)
    manifest = first.store_path / MANIFEST_NAME
    recorded = json.loads(manifest.read_text())
    recorded["probe"] = None  # as a store of an older lightning_repsim
    manifest.write_text(json.dumps(recorded))
    with pytest.raises(RepSimError, match=r"'val:512' now yields other examples .* no probe saved .* as probe="):
        run(tmp_path, 2, val_seed=6, ckpt_path=last(tmp_path))


def test_resuming_into_a_format_1_store_upgrades_it_and_saves_the_probe(tmp_path):
    first, _ = run(tmp_path, 2, probe=PROBE)
    written = open_store(first.store_path)
    run_id = written.run_id
    (first.store_path / PROBE_FILE).unlink()
    as_format_1(written, run_id=run_id)  # the callback kept its run id in the settings then
    second, records = run(tmp_path, 3, probe=PROBE, ckpt_path=last(tmp_path))
    assert repsim_warnings(records) == []
    store = open_store(second.store_path)
    assert second.store_path == first.store_path and store.steps == [0, 4, 8, 12]
    assert store.run_id == run_id and store.has_probe and torch.equal(store.load_probe(), PROBE)
    assert store.verify() == []


def test_a_failed_write_of_the_probe_is_one_warning_and_the_fit_goes_on(tmp_path, monkeypatch):
    def full_disk(self, inputs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SnapshotStore, "save_probe", full_disk)
    callback, records = run(tmp_path, 1, probe=PROBE)
    (message,) = repsim_warnings(records)
    assert "the probe saved with the snapshot store" in message and "No space left on device" in message
    store = open_store(callback.store_path)
    assert store.steps == [0, 4] and not store.has_probe
