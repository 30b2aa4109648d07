"""Probe specifications of RepresentationSimilarity: ``"val:N"``, ``"train:N"`` and ``probe=None``.

Each spec is resolved at fit start from the Trainer's own dataloaders. Real ``Trainer.fit`` runs
on CPU (one training batch) check which examples became the probe: the store's probe hash must
equal that of a :class:`~lightning_repsim.capture.Probe` of the expected tensor, and ``n`` its
length.
"""

import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_repsim.callbacks import RepresentationSimilarity
from lightning_repsim.capture import Probe
from lightning_repsim.errors import RepSimValueError
from lightning_repsim.store import open_store

N_IN = 6
N_TRAIN, N_VAL = 64, 40


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_IN, generator=g)
    return x, (x[:, 0] > 0).long()


X_TRAIN, Y_TRAIN = make_data(N_TRAIN, seed=0)
X_VAL, Y_VAL = make_data(N_VAL, seed=1)


def loader(x, y, batch_size):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(N_IN, 8)
        self.head = nn.Linear(8, 2)
        self.train_steps_run = 0

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))

    def training_step(self, batch, batch_idx):
        self.train_steps_run += 1
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NetWithLoaders(Net):
    """Dataloaders from the LightningModule's hooks instead of fit() arguments."""

    def train_dataloader(self):
        return loader(X_TRAIN, Y_TRAIN, 16)

    def val_dataloader(self):
        return loader(X_VAL, Y_VAL, 16)


def fit(tmp_path, probe, model=None, **loaders):
    """One training batch with a monitor on ``probe``; returns (callback, model)."""
    model = Net() if model is None else model
    callback = RepresentationSimilarity(probe=probe, reference="init", measures=("linear_cka",), write_files=False)
    trainer = pl.Trainer(
        default_root_dir=str(tmp_path),
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no TensorBoardLogger, few batches: not what is tested here
        trainer.fit(model, **loaders)
    return callback, model


def assert_probe(callback, expected):
    """The run's probe, as recorded by the store, is exactly the examples ``expected``."""
    store = open_store(callback.store_path)
    assert store.n == len(expected)
    assert store.probe_hash == Probe(expected).hash
    assert store.probe_hash != Probe(expected[:-1]).hash  # the hash tells one example apart


def test_val_n_takes_the_first_n_validation_examples(tmp_path):
    callback, model = fit(
        tmp_path, "val:32", train_dataloaders=loader(X_TRAIN, Y_TRAIN, 16), val_dataloaders=loader(X_VAL, Y_VAL, 12)
    )  # 32 is not a multiple of the batch
    assert_probe(callback, X_VAL[:32])
    assert model.train_steps_run == 1


def test_val_n_larger_than_the_validation_set_takes_all_of_it(tmp_path):
    callback, _ = fit(
        tmp_path, "val:512", train_dataloaders=loader(X_TRAIN, Y_TRAIN, 16), val_dataloaders=loader(X_VAL, Y_VAL, 16)
    )
    assert_probe(callback, X_VAL)  # 40, not 512


def test_train_n_takes_the_first_n_training_examples(tmp_path):
    callback, _ = fit(
        tmp_path, "train:24", train_dataloaders=loader(X_TRAIN, Y_TRAIN, 16), val_dataloaders=loader(X_VAL, Y_VAL, 16)
    )
    assert_probe(callback, X_TRAIN[:24])


def test_specs_read_the_modules_own_dataloader_hooks(tmp_path):
    callback, _ = fit(tmp_path / "val", "val:20", model=NetWithLoaders())
    assert_probe(callback, X_VAL[:20])
    callback, _ = fit(tmp_path / "train", "train:20", model=NetWithLoaders())
    assert_probe(callback, X_TRAIN[:20])


def test_none_is_val_512(tmp_path):
    callback, _ = fit(
        tmp_path, None, train_dataloaders=loader(X_TRAIN, Y_TRAIN, 16), val_dataloaders=loader(X_VAL, Y_VAL, 16)
    )
    assert_probe(callback, X_VAL[:512])


def test_none_without_validation_data_falls_back_to_training_data(tmp_path):
    callback, model = fit(tmp_path, None, train_dataloaders=loader(X_TRAIN, Y_TRAIN, 16))
    assert_probe(callback, X_TRAIN)  # all 64 (< 512) training examples, in loader order
    assert model.train_steps_run == 1


def test_val_n_without_validation_data_is_an_error_before_training(tmp_path):
    model = Net()
    with pytest.raises(RepSimValueError, match=r"probe='val:32' needs a val dataloader, and the Trainer has none"):
        fit(tmp_path, "val:32", model=model, train_dataloaders=loader(X_TRAIN, Y_TRAIN, 16))
    assert model.train_steps_run == 0  # no fallback to training data for an explicit "val:N"


@pytest.mark.parametrize("spec", ["val:abc", "test:5", "val:", ":5", "val:-3", "val:5 ", "VAL:5", "val:5:6"])
def test_malformed_spec_is_refused_at_construction(spec):
    with pytest.raises(
        RepSimValueError,
        match=r"probe string must look like 'val:512' or 'train:512' \(a split and "
        r"a number of examples, at least 4\); got ",
    ) as info:
        RepresentationSimilarity(probe=spec)
    assert repr(spec) in str(info.value)


@pytest.mark.parametrize("spec", ["val:0", "train:00", "val:2", "train:3"])
def test_spec_of_fewer_than_four_examples_is_refused_at_construction(spec):
    count = int(spec.split(":")[1])
    with pytest.raises(
        RepSimValueError, match=rf"probe={spec!r} has {count} example\(s\); similarity measures need at least 4"
    ) as info:
        RepresentationSimilarity(probe=spec)
    assert "every similarity is exactly 1" in str(info.value) and "Pass probe= with more examples" in str(info.value)


@pytest.mark.parametrize("measures", [("linear_cka",), ("rv2", "svcca"), ("rbf_cka",)])
@pytest.mark.parametrize("n", [2, 3])
def test_probe_of_fewer_than_four_examples_is_refused_before_training(tmp_path, n, measures):
    # With 2 examples every centred Gram has rank 1: every linear CKA / RV2 cell would be exactly 1.
    model = Net()
    callback = RepresentationSimilarity(probe=X_VAL[:n], reference="init", measures=measures, write_files=False)
    trainer = pl.Trainer(
        default_root_dir=str(tmp_path), max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False,
        callbacks=[callback], enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    with pytest.raises(RepSimValueError, match=rf"the probe has {n} example\(s\); .*at least 4.*Pass probe="):
        trainer.fit(model, train_dataloaders=loader(X_TRAIN, Y_TRAIN, 16))
    assert model.train_steps_run == 0


def test_probe_of_four_examples_is_accepted(tmp_path):
    callback, model = fit(tmp_path, X_VAL[:4], train_dataloaders=loader(X_TRAIN, Y_TRAIN, 16))
    assert_probe(callback, X_VAL[:4])
    assert model.train_steps_run == 1
