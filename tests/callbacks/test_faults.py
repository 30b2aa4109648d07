"""Fault injection: a monitor's I/O failure never stops a fit, never changes its weights, and never
loses what was stored before it.

Each write path of the monitor -- opening a file, writing to it, renaming it into place (the one
atomic writer of ``lightning_repsim._io``), serialising a safetensors step file or the probe saved
with the store, and TensorBoard's event writer -- is made to raise ENOSPC, EROFS or EIO from its
k-th call on (a full or read-only disk stays so), for every k the run reaches. The fit must end
with the same weights as without the callback, and every step the store lists must read back.
"""

from __future__ import annotations

import errno
import itertools
import os
import warnings

import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.tensorboard.writer import FileWriter

import lightning_repsim._io as io_module
import lightning_repsim.store.format as store_format
from lightning_repsim import RepresentationSimilarity
from lightning_repsim.errors import RepSimWarning
from lightning_repsim.store import open_store, run_store_dirs
from tests.callbacks.test_similarity import LAYERS, PROBE, Net, make_trainer, train_loader

PATHS = ("open", "write", "rename", "safetensors", "tensorboard")
ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EIO)
# the calls per path of the run below, without faults (the counting test fails first when the run changes)
# (the probe saved with the store: 2 opens of files, 2 of the directory to fsync it, 2 writes, 2 renames, 1 safetensors)
REACH = {"open": 28, "write": 31, "rename": 19, "safetensors": 4, "tensorboard": 26}


class Faults:
    """Counts the calls of each write path and, once armed, raises from the k-th call of one path on."""

    def __init__(self):
        self.calls = dict.fromkeys(PATHS, 0)
        self.path, self.k, self.code = None, None, None

    def arm(self, path, k, code):
        self.path, self.k, self.code = path, k, code

    def hit(self, path):
        self.calls[path] += 1
        if path == self.path and self.calls[path] >= self.k:
            raise OSError(self.code, f"{os.strerror(self.code)} (injected at {path} call {self.calls[path]})")


class _Handle:
    def __init__(self, handle, faults):
        self._handle, self._faults = handle, faults

    def write(self, data):
        self._faults.hit("write")
        return self._handle.write(data)

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._handle, name)


class _Os:
    """``os`` as the atomic writer sees it, with faults on open, write and rename."""

    def __init__(self, faults):
        self._faults = faults

    def __getattr__(self, name):
        return getattr(os, name)

    def open(self, *args, **kwargs):
        self._faults.hit("open")
        return os.open(*args, **kwargs)

    def fdopen(self, *args, **kwargs):
        return _Handle(os.fdopen(*args, **kwargs), self._faults)

    def replace(self, *args, **kwargs):
        self._faults.hit("rename")
        return os.replace(*args, **kwargs)


@pytest.fixture
def faults(monkeypatch):
    injected = Faults()
    monkeypatch.setattr(io_module, "os", _Os(injected))
    serialise = store_format._safetensors_bytes

    def safetensors_bytes(*args, **kwargs):
        injected.hit("safetensors")
        return serialise(*args, **kwargs)

    monkeypatch.setattr(store_format, "_safetensors_bytes", safetensors_bytes)
    add_event = FileWriter.add_event

    def tensorboard_event(self, *args, **kwargs):
        injected.hit("tensorboard")
        return add_event(self, *args, **kwargs)

    monkeypatch.setattr(FileWriter, "add_event", tensorboard_event)
    return injected


def _fit(root, with_monitor=True):
    callbacks = []
    if with_monitor:
        callbacks.append(
            RepresentationSimilarity(
                probe=PROBE, reference=["init", "final"], measures=("linear_cka",), every_n_train_steps=2
            )
        )
    logger = TensorBoardLogger(str(root), name="run", version=0)
    trainer = make_trainer(root, callbacks, logger=logger, max_epochs=1)
    torch.manual_seed(0)
    model = Net()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(model, train_loader())
    messages = [str(w.message) for w in records if issubclass(w.category, RepSimWarning)]
    return model, trainer, messages


@pytest.fixture(scope="module")
def plain_weights(tmp_path_factory):
    model, _, _ = _fit(tmp_path_factory.mktemp("plain"), with_monitor=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _check_run(root, model, trainer, plain_weights):
    assert trainer.global_step == 4
    for name, value in model.state_dict().items():
        assert torch.equal(value, plain_weights[name]), name
    for directory in run_store_dirs(root / "run" / "version_0"):
        store = open_store(directory)  # what was stored before the fault reads back, every byte
        assert set(store.steps) <= {0, 2, 4}
        for step in store.steps:
            for layer in LAYERS:
                assert torch.isfinite(store.get(step, layer)).all()


def test_the_monitor_changes_no_weight_and_counts_the_write_paths(tmp_path, faults, plain_weights):
    model, trainer, messages = _fit(tmp_path)
    assert not messages
    _check_run(tmp_path, model, trainer, plain_weights)
    assert open_store(tmp_path / "run" / "version_0" / "repsim").steps == [0, 2, 4]
    assert faults.calls == REACH


def _cases():
    """(path, k, errno) for every k that the run reaches on each path, the errors taken in turn."""
    codes = itertools.cycle(ERRNOS)
    return [(path, k, next(codes)) for path in PATHS for k in range(1, REACH[path] + 1)]


@pytest.mark.parametrize(("path", "k", "code"), _cases())
def test_a_write_fault_at_any_call_never_stops_the_fit(tmp_path, faults, plain_weights, path, k, code):
    faults.arm(path, k, code)
    model, trainer, messages = _fit(tmp_path)
    _check_run(tmp_path, model, trainer, plain_weights)
    assert faults.calls[path] >= k, f"{path} reached only {faults.calls[path]} calls"
    switched = [m for m in messages if "switched off for the rest of this fit" in m]
    assert switched and len(messages) <= 4, messages  # one warning per output that failed, not one per step
    assert os.strerror(code) in switched[0]
