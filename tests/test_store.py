"""Tests of the snapshot store: format, atomicity and crash recovery, budget thinning, errors."""

import json
import os
import pickle
import random
import re
import signal
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import lightning_repsim
from lightning_repsim.errors import RepSimError, RepSimValueError, RepSimWarning
from lightning_repsim.store import (
    DEFAULT_MAX_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SnapshotStore,
    default_store_dir,
    open_store,
    run_store_dirs,
)
from lightning_repsim.store.format import encode_snapshot as _encode_snapshot
from lightning_repsim.store.thinning import plan_thinning as _plan_thinning

N = 6
LAYERS = ("conv", "block.0", "fc")  # deliberately not alphabetical: order must be kept


def snapshot(step, n=N, widths=(5, 3, 2)):
    """Deterministic tensors for a step, so a reopened store can be checked value by value."""
    g = torch.Generator().manual_seed(step)
    return {name: torch.randn(n, r, generator=g) for name, r in zip(LAYERS, widths)}


def bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def make(tmp_path, steps=(), **kwargs):
    kwargs.setdefault("probe_hash", "probe-abc")
    kwargs.setdefault("n", N)
    store = SnapshotStore.create(tmp_path / "repsim", **kwargs)
    for step in steps:
        store.add(step, snapshot(step))
    return store


def step_files(path):
    return sorted(p.name for p in Path(path).iterdir() if p.name.startswith("step-"))


def manifest(path):
    return json.loads((Path(path) / MANIFEST_NAME).read_text())


def recorded_warnings():
    return warnings.catch_warnings(record=True)


# ---------------------------------------------------------------- round trip and format


def test_round_trip_bit_exact(tmp_path):
    store = make(tmp_path)
    special = torch.tensor([[float("nan"), float("inf")], [-0.0, 1e-45]] * 3)  # NaN, Inf, -0, subnormal
    inputs = {
        0: {"conv": torch.randn(N, 7), "block.0": special, "fc": torch.randn(N, 1)},
        10: {
            "conv": torch.randn(N, 7, dtype=torch.float64),
            "block.0": torch.randn(N, 4).T.T,
            "fc": torch.randn(2 * N, 3)[::2],
        },
    }
    store.add(0, inputs[0], {"block.0": "gram_factor"})
    store.add(10, inputs[10])
    for reader in (store, open_store(store.path)):
        assert reader.steps == [0, 10]
        assert reader.layers == list(LAYERS)
        assert reader.kinds == {"conv": "features", "block.0": "gram_factor", "fc": "features"}
        for step, tensors in inputs.items():
            got = reader.get(step)
            assert list(got) == list(LAYERS)
            for name in LAYERS:
                assert bits_equal(got[name], tensors[name].float().contiguous()), (step, name)
                assert bits_equal(reader.get(step, name), got[name])
        assert bits_equal(reader.get("last", "conv"), inputs[10]["conv"].float())


def test_same_tensor_for_two_layers_and_views_are_stored(tmp_path):
    store = make(tmp_path)
    x = torch.randn(N, 3)
    store.add(0, {"conv": x, "block.0": x, "fc": x[:, :2]})
    assert bits_equal(open_store(store.path).get(0, "fc"), x[:, :2].contiguous())


def test_manifest_content(tmp_path):
    settings = {"reduction": "mean", "select": ["conv", "fc"], "nested": {"k": 1.5}}
    store = make(tmp_path, settings=settings, max_bytes=123_456_789)
    store.add(0, snapshot(0), {"fc": "gram_factor"})
    store.add(1500, snapshot(1500))
    m = manifest(store.path)
    assert m["format"] == FORMAT_NAME == "lightning_repsim.store"
    assert m["format_version"] == FORMAT_VERSION == 2
    assert m["library_version"] == lightning_repsim.__version__
    assert m["probe_hash"] == "probe-abc"
    assert re.fullmatch(r"[0-9a-f]{16}", m["run_id"]) and m["run_id"] == store.run_id
    assert m["probe"] is None and not store.has_probe
    assert m["n"] == N
    assert m["dtype"] == "float32"
    assert m["layers"] == list(LAYERS)
    assert m["kinds"] == {"conv": "features", "block.0": "features", "fc": "gram_factor"}
    assert m["settings"] == settings
    assert m["max_bytes"] == 123_456_789
    assert [s["step"] for s in m["steps"]] == [0, 1500]
    assert [s["file"] for s in m["steps"]] == ["step-0000000000.safetensors", "step-0000001500.safetensors"]
    assert [s["format_version"] for s in m["steps"]] == [2, 2]
    for entry in m["steps"]:
        file = store.path / entry["file"]
        assert entry["nbytes"] == file.stat().st_size
        with safe_open(str(file), framework="pt") as f:
            assert set(f.keys()) == set(LAYERS)
            meta = f.metadata()
            assert meta["step"] == str(entry["step"])
            assert meta["format"] == FORMAT_NAME and meta["probe_hash"] == "probe-abc"
            assert meta["format_version"] == "2" and meta["run_id"] == m["run_id"]
            crc = json.loads(meta["crc32"])  # the CRC-32 of each tensor's raw bytes
            assert crc == {name: f"{zlib.crc32(f.get_tensor(name).numpy().tobytes()):08x}" for name in LAYERS}
    assert m["thinned"]["stride"] == 1 and m["thinned"]["dropped_steps"] == []
    assert "rule" in m["thinned"]
    assert m["lost_steps"] == []
    assert store.nbytes == sum(e["nbytes"] for e in m["steps"])
    assert store.settings == settings and open_store(store.path).settings == settings


def test_reader_properties_and_iteration(tmp_path):
    store = make(tmp_path, steps=[0, 5, 9])
    reader = open_store(store.path, probe_hash="probe-abc")
    assert list(reader) == [0, 5, 9] and len(reader) == 3
    assert 5 in reader and 6 not in reader
    assert reader.probe_hash == "probe-abc" and reader.n == N
    assert reader.nbytes == sum((store.path / f).stat().st_size for f in step_files(store.path))
    assert "steps=3" in repr(reader)
    assert [float(reader.get(s, "fc").sum()) for s in reader] == [float(snapshot(s)["fc"].sum()) for s in (0, 5, 9)]


def test_default_store_dir(tmp_path):
    assert default_store_dir(tmp_path / "version_0") == tmp_path / "version_0" / "repsim"
    assert default_store_dir(str(tmp_path)) == tmp_path / "repsim"
    assert default_store_dir(tmp_path, 0) == tmp_path / "repsim"
    assert default_store_dir(tmp_path, 12) == tmp_path / "repsim-12"
    with pytest.raises(RepSimValueError, match="index must be >= 0"):
        default_store_dir(tmp_path, -1)


def test_run_store_dirs_lists_the_stores_of_a_run_in_index_order(tmp_path):
    assert run_store_dirs(tmp_path) == [] and run_store_dirs(tmp_path / "missing") == []
    for index in (10, 2, 0):
        SnapshotStore.create(default_store_dir(tmp_path, index), probe_hash="p", n=N)
    (tmp_path / "repsim-3" / "figures").mkdir(parents=True)  # figures only: no store
    for name in ("repsim-01", "repsim-", "repsim-1x", "repsimple"):  # not names a fit gets
        SnapshotStore.create(tmp_path / name, probe_hash="p", n=N)
    assert run_store_dirs(tmp_path) == [tmp_path / "repsim", tmp_path / "repsim-2", tmp_path / "repsim-10"]
    assert run_store_dirs(str(tmp_path))[0] == tmp_path / "repsim"
    # a named monitor's stores (several monitors in one Trainer) follow the unnamed ones, by name then index
    for index in (1, 0):
        SnapshotStore.create(default_store_dir(tmp_path, index, name="val_probe"), probe_hash="p", n=N)
    assert [p.name for p in run_store_dirs(tmp_path)] == [
        "repsim",
        "repsim-2",
        "repsim-10",
        "repsim-val_probe",
        "repsim-val_probe-1",
    ]


# ---------------------------------------------------------------- no pickle


def test_no_pickle_anywhere(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle-based serialisation used")

    class ForbiddenPickler:
        def __init__(self, *args, **kwargs):
            forbidden()

    for name in ("dump", "dumps", "load", "loads"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(pickle, "Pickler", ForbiddenPickler)
    monkeypatch.setattr(pickle, "Unpickler", ForbiddenPickler)
    monkeypatch.setattr(torch, "save", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(np, "load", forbidden)
    monkeypatch.setattr(np, "save", forbidden)

    store = make(tmp_path, steps=[0, 1])
    reader = open_store(store.path)
    reader.get(1)
    for name in step_files(store.path):
        raw = (store.path / name).read_bytes()
        assert not raw.startswith(b"PK\x03\x04") and not raw.startswith(b"\x80")  # torch.save zip / pickle
        (header_len,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + header_len])
        assert set(header) == set(LAYERS) | {"__metadata__"}
        assert all(header[layer]["dtype"] == "F32" for layer in LAYERS)


class _Exploit:
    sentinel = None

    def __reduce__(self):
        return (Path.touch, (Path(self.sentinel),))


def test_opening_a_pickle_disguised_as_a_step_file_runs_no_code(tmp_path):
    store = make(tmp_path, steps=[0])
    sentinel = tmp_path / "pwned"
    _Exploit.sentinel = str(sentinel)
    payload = pickle.dumps(_Exploit())
    file = store.path / step_files(store.path)[0]
    file.write_bytes(payload)
    m = manifest(store.path)
    m["steps"][0]["nbytes"] = len(payload)
    (store.path / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(RepSimError, match=r"step-0000000000\.safetensors: not a readable safetensors file"):
        open_store(store.path)
    assert not sentinel.exists()


# ---------------------------------------------------------------- atomic writes and crashes


def test_write_protocol_tempfile_fsync_replace(tmp_path, monkeypatch):
    store = make(tmp_path)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store.add(0, snapshot(0))
    replaces = [e for e in events if e[0] == "replace"]
    assert [Path(dst).name for _, _, dst in replaces] == ["step-0000000000.safetensors", MANIFEST_NAME]
    for _, src, dst in replaces:
        assert Path(src).parent == Path(dst).parent == store.path  # same directory: a rename
        assert Path(src).name.startswith(".") and src.endswith(".tmp")
        i = events.index(("replace", src, dst))
        if os.path.exists("/proc/self/fd"):
            assert ("fsync", src) in events[:i], "temporary file not fsynced before os.replace"
        else:
            assert any(e[0] == "fsync" for e in events[:i])


@pytest.mark.parametrize("fail_on", ["step file", "manifest"])
def test_crash_in_os_replace_leaves_previous_store(tmp_path, monkeypatch, fail_on):
    store = make(tmp_path, steps=[0, 10])
    real_replace = os.replace

    def replace(src, dst):
        is_manifest = Path(dst).name == MANIFEST_NAME
        if is_manifest == (fail_on == "manifest"):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        store.add(20, snapshot(20))
    monkeypatch.setattr(os, "replace", real_replace)

    assert store.steps == [0, 10]  # the in-memory view follows the manifest on disk
    assert not [p for p in store.path.iterdir() if p.name.endswith(".tmp")]
    reader = open_store(store.path)
    assert reader.steps == [0, 10]
    assert bits_equal(reader.get(10, "conv"), snapshot(10)["conv"])
    if fail_on == "manifest":  # the step file landed but is not listed: ignored
        assert "step-0000000020.safetensors" in step_files(store.path)
    store.add(20, snapshot(20))
    assert open_store(store.path).steps == [0, 10, 20]
    assert bits_equal(open_store(store.path).get(20, "fc"), snapshot(20)["fc"])


def test_debris_ignored_by_readers_and_removed_by_writers(tmp_path):
    store = make(tmp_path, steps=[0, 10])
    (store.path / ".step-0000000020.safetensors.123.abcd.tmp").write_bytes(b"half a file")
    (store.path / ".manifest.json.123.abcd.tmp").write_bytes(b'{"format": "lightning_repsim.st')
    (store.path / "step-0000000030.safetensors").write_bytes(b"orphan")
    (store.path / "notes.txt").write_text("not ours")
    with recorded_warnings() as caught:
        warnings.simplefilter("always")
        reader = open_store(store.path)
    assert not caught
    assert reader.steps == [0, 10]
    assert len(list(store.path.iterdir())) == 7  # read-only: nothing deleted
    SnapshotStore.open(store.path, mode="a")
    assert sorted(p.name for p in store.path.iterdir()) == [
        MANIFEST_NAME,
        "notes.txt",
        "step-0000000000.safetensors",
        "step-0000000010.safetensors",
    ]


def test_missing_or_truncated_step_file_dropped_with_warning(tmp_path):
    store = make(tmp_path, steps=[0, 10, 20, 30])
    data = (store.path / "step-0000000010.safetensors").read_bytes()
    (store.path / "step-0000000010.safetensors").write_bytes(data[: len(data) // 2])
    (store.path / "step-0000000030.safetensors").unlink()

    with pytest.warns(RepSimWarning, match=r"step 10 \(truncated.*step 30 \(missing\)") as caught:
        reader = open_store(store.path)
    assert len(caught) == 1
    assert reader.steps == [0, 20]
    assert bits_equal(reader.get(20, "conv"), snapshot(20)["conv"])
    assert manifest(store.path)["lost_steps"] == []  # read-only: manifest untouched

    with pytest.warns(RepSimWarning, match="dropping 2 snapshot"):
        writer = SnapshotStore.open(store.path, mode="a")
    assert manifest(store.path)["lost_steps"] == [10, 30]
    assert [s["step"] for s in manifest(store.path)["steps"]] == [0, 20]
    assert step_files(store.path) == ["step-0000000000.safetensors", "step-0000000020.safetensors"]
    with recorded_warnings() as caught:
        warnings.simplefilter("always")
        assert open_store(store.path).steps == [0, 20]
    assert not caught
    writer.add(30, snapshot(30))  # the lost step can be written again
    assert open_store(store.path).steps == [0, 20, 30]
    assert manifest(store.path)["lost_steps"] == [10]


def test_crash_at_every_point_of_a_thinning_add(tmp_path, monkeypatch):
    """Fail each os.replace of an add that thins; the store on disk stays valid every time."""
    size = make(tmp_path / "size", steps=[10]).nbytes
    real_replace = os.replace
    # os.replace calls: 0 manifest without the thinned steps, 1 the new step file, 2 manifest with it
    expected_after_crash = {0: [10, 11, 12, 13], 1: [10, 12], 2: [10, 12]}
    for fail_at, expected in expected_after_crash.items():
        store = make(tmp_path / str(fail_at), steps=[10, 11, 12, 13], max_bytes=int(4.5 * size))
        calls = []

        def replace(src, dst, calls=calls, fail_at=fail_at):
            calls.append(dst)
            if len(calls) - 1 == fail_at:
                raise OSError("simulated crash")
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(OSError, match="simulated crash"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            store.add(14, snapshot(14))
        monkeypatch.setattr(os, "replace", real_replace)
        reader = open_store(store.path)
        assert reader.steps == store.steps == expected, fail_at
        for step in reader:
            assert bits_equal(reader.get(step, "conv"), snapshot(step)["conv"])
        assert reader.nbytes <= store.max_bytes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            store.add(14, snapshot(14))  # the writer carries on after the failure
        assert open_store(store.path).steps == [10, 12, 14]


_KILL_CHILD = r"""
import sys, torch
from lightning_repsim.store import SnapshotStore
path, step = sys.argv[1], int(sys.argv[2])
store = SnapshotStore.create(path, probe_hash="killed", n=128, exist_ok=True)
for step in range(step, step + 400):
    g = torch.Generator().manual_seed(step)
    store.add(step, {f"l{i}": torch.randn(128, 256, generator=g) for i in range(4)})
    print(step, flush=True)
"""


def _expected(step):
    g = torch.Generator().manual_seed(step)
    return {f"l{i}": torch.randn(128, 256, generator=g) for i in range(4)}


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_during_write_loop_keeps_every_completed_snapshot(tmp_path):
    path = tmp_path / "repsim"
    env = dict(os.environ, PYTHONPATH=str(Path(lightning_repsim.__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(path), "0"], stdout=subprocess.PIPE, env=env)
    completed = []
    while len(completed) < 8:
        line = proc.stdout.readline()
        assert line, f"writer exited early with {proc.wait()}"
        completed.append(int(line))
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.03))  # land anywhere in a write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    completed += [int(line) for line in proc.stdout.read().split()]
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "the writer finished before it was killed"

    reader = open_store(path)
    assert set(completed) <= set(reader.steps)
    assert reader.steps == list(range(len(reader.steps)))  # no holes, no duplicates
    assert len(reader.steps) - len(completed) in (0, 1)  # at most the one in flight
    for step in reader.steps:
        got, want = reader.get(step), _expected(step)
        assert all(bits_equal(got[k], want[k]) for k in want), step

    # the resumed run appends to the killed run's store; the kill's debris is removed
    writer = SnapshotStore.create(path, probe_hash="killed", n=128, exist_ok=True)
    listed = {e["file"] for e in manifest(path)["steps"]}
    assert set(os.listdir(path)) == listed | {MANIFEST_NAME}
    resume = reader.steps[-1] + 1
    writer.add(resume, _expected(resume))
    assert open_store(path).steps == list(range(resume + 1))
    assert bits_equal(open_store(path).get("last", "l3"), _expected(resume)["l3"])


# ---------------------------------------------------------------- disk budget


def test_budget_thinning_keeps_first_last_evenly_with_one_warning(tmp_path):
    probe = make(tmp_path / "size", steps=[10 * 99])
    size = probe.nbytes
    budget = int(10.5 * size)  # room for 10 snapshots
    store = make(tmp_path, max_bytes=budget)
    added, caught = [], []
    for i in range(30):
        step = 10 * i
        with warnings.catch_warnings(record=True) as now:
            warnings.simplefilter("always")
            store.add(step, snapshot(step))
        caught += [w for w in now if issubclass(w.category, RepSimWarning)]
        added.append(step)

        disk = sum((store.path / f).stat().st_size for f in step_files(store.path))
        assert disk == store.nbytes <= budget
        kept = store.steps
        assert kept[0] == 0 and kept[-1] == step
        stride = store.thinned["stride"]
        assert kept[:-1] == list(range(0, step, 10 * stride)), f"not evenly spaced: {kept}"
        assert len(kept) >= 5 or len(added) < 5, "thinned more than needed"
        assert sorted(kept + store.thinned["dropped_steps"]) == added
        assert step_files(store.path) == [f"step-{s:010d}.safetensors" for s in kept]

    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"max_bytes={budget}" in message and "RepresentationSimilarity(max_store_bytes=...)" in message
    assert store.thinned["stride"] > 2  # thinned repeatedly, warned once
    m = manifest(store.path)
    assert m["thinned"]["dropped_steps"] == store.thinned["dropped_steps"]
    assert m["thinned"]["stride"] == store.thinned["stride"]
    reader = open_store(store.path)
    assert reader.steps == store.steps
    assert bits_equal(reader.get(0, "fc"), snapshot(0)["fc"])

    # a reopened writer does not warn again
    writer = SnapshotStore.open(store.path, mode="a")
    with warnings.catch_warnings(record=True) as now:
        warnings.simplefilter("always")
        for step in range(300, 350, 10):
            writer.add(step, snapshot(step))
    assert not now and writer.nbytes <= budget and writer.steps[0] == 0


def test_thinning_keeps_the_first_surviving_snapshot(tmp_path):
    store = make(tmp_path, steps=[0, 1, 2, 3])
    size = store.nbytes // 4
    (store.path / "step-0000000000.safetensors").unlink()  # step 0 lost: step 1 is now the first
    with pytest.warns(RepSimWarning, match="dropping 1 snapshot"):
        store = SnapshotStore.open(store.path, mode="a", max_bytes=int(4.5 * size))
    with pytest.warns(RepSimWarning, match="disk budget"):
        for step in range(4, 12):
            store.add(step, snapshot(step))
            assert store.steps[0] == 1 and store.steps[-1] == step and store.nbytes <= store.max_bytes


def test_plan_thinning_even_grid():
    kept_idx, sizes, stride = [], [], 1
    for new in range(200):
        idx = kept_idx + [new]
        mask, stride = _plan_thinning(idx, sizes + [1], stride, max_bytes=16)
        kept_idx = [i for i, k in zip(idx, mask) if k]
        sizes = [1] * len(kept_idx)
        assert len(kept_idx) <= 16 and kept_idx[0] == 0 and kept_idx[-1] == new
        assert kept_idx[:-1] == list(range(0, new, stride))
        assert new < 16 or len(kept_idx) >= 8  # between half and all of the budget used
    assert stride == 16


def test_default_budget_holds_20_layers_1024_rows_30_snapshots_at_r400(tmp_path):
    assert DEFAULT_MAX_BYTES == 1_000_000_000
    assert SnapshotStore.create(tmp_path / "s", probe_hash="p", n=1024).max_bytes == DEFAULT_MAX_BYTES
    # the exact bytes add() writes for such a snapshot (a long step id: the largest header)
    tensors = {f"model.layer{i:02d}.block.conv": torch.zeros(1024, 400) for i in range(20)}
    per_snapshot = len(_encode_snapshot(10**12, "f" * 64, tensors))
    assert 20 * 1024 * 400 * 4 <= per_snapshot < 20 * 1024 * 400 * 4 + 4096
    assert 30 * per_snapshot <= DEFAULT_MAX_BYTES
    mask, stride = _plan_thinning(list(range(30)), [per_snapshot] * 30, 1, DEFAULT_MAX_BYTES)
    assert all(mask) and stride == 1


def test_snapshot_larger_than_budget_is_refused_and_changes_nothing(tmp_path):
    store = make(tmp_path, steps=[0], max_bytes=10_000)
    before = manifest(store.path)
    with pytest.raises(RepSimValueError, match=r"max_bytes=10000; raise max_bytes"):
        store.add(1, {name: torch.zeros(N, 1000) for name in LAYERS})
    assert manifest(store.path) == before and store.steps == [0]
    assert step_files(store.path) == ["step-0000000000.safetensors"]


# ---------------------------------------------------------------- writer errors and resume


def test_add_mismatches_raise_with_precise_messages(tmp_path):
    store = make(tmp_path, steps=[0])
    bad_layers = {"conv": torch.zeros(N, 2), "block.0": torch.zeros(N, 2), "extra": torch.zeros(N, 2)}
    with pytest.raises(RepSimValueError, match=r"missing \['fc'\], unexpected \['extra'\]"):
        store.add(1, bad_layers)
    with pytest.raises(RepSimValueError, match=r"layer 'fc'.*n=6 rows, got shape \(5, 2\)"):
        store.add(1, {**snapshot(1), "fc": torch.zeros(5, 2)})
    with pytest.raises(RepSimValueError, match=r"layer 'conv'.*2-D.*got shape \(6,\)"):
        store.add(1, {**snapshot(1), "conv": torch.zeros(N)})
    with pytest.raises(RepSimValueError, match=r"floating-point tensor, got torch.int64"):
        store.add(1, {**snapshot(1), "conv": torch.zeros(N, 2, dtype=torch.long)})
    with pytest.raises(RepSimValueError, match=r"kind 'gram_factor' differs from the stored kind 'features'"):
        store.add(1, snapshot(1), {"fc": "gram_factor"})
    with pytest.raises(RepSimValueError, match=r"kinds names layer 'nope'"):
        store.add(1, snapshot(1), {"nope": "features"})
    with pytest.raises(RepSimValueError, match=r"step 0 is already stored.*truncate_after.*overwrite=True"):
        store.add(0, snapshot(0))
    store.add(5, snapshot(5))
    with pytest.raises(RepSimValueError, match=r"step 3 is before the last step 5.*truncate_after"):
        store.add(3, snapshot(3))
    with pytest.raises(RepSimValueError, match=r"step must be >= 0, got -1"):
        store.add(-1, snapshot(1))
    with pytest.raises(RepSimValueError, match=r"non-empty dict"):
        store.add(6, {})
    assert open_store(store.path).steps == [0, 5]  # nothing half-written


def test_first_add_validates_layer_names_and_create_arguments(tmp_path):
    store = make(tmp_path)
    with pytest.raises(RepSimValueError, match="__metadata__"):
        store.add(0, {"__metadata__": torch.zeros(N, 1)})
    with pytest.raises(RepSimValueError, match="probe_hash must be a non-empty str"):
        SnapshotStore.create(tmp_path / "x", probe_hash="", n=3)
    with pytest.raises(RepSimValueError, match=r"n \(probe examples\) must be an int >= 1"):
        SnapshotStore.create(tmp_path / "x", probe_hash="p", n=0)
    with pytest.raises(RepSimValueError, match="max_bytes must be an int >= 1"):
        SnapshotStore.create(tmp_path / "x", probe_hash="p", n=3, max_bytes=0)
    with pytest.raises(RepSimValueError, match="settings must be JSON-serialisable"):
        SnapshotStore.create(tmp_path / "x", probe_hash="p", n=3, settings={"f": object()})


def test_read_only_store_refuses_writes(tmp_path):
    store = make(tmp_path, steps=[0])
    reader = open_store(store.path)
    with pytest.raises(RepSimError, match=r"read-only; use SnapshotStore.open\(path, mode='a'\)"):
        reader.add(1, snapshot(1))
    with pytest.raises(RepSimError, match="read-only"):
        reader.truncate_after(0)
    assert open_store(store.path).steps == [0]


def test_truncate_after_can_move_the_dropped_steps_into_a_store_of_their_own(tmp_path):
    store = make(tmp_path / "s", steps=[0, 10, 20, 30])
    aside = tmp_path / "aside"
    assert store.truncate_after(15, move_to=aside) == [20, 30]
    assert store.steps == [0, 10] and step_files(store.path) == [f"step-{s:010d}.safetensors" for s in (0, 10)]
    moved = open_store(aside)  # nothing deleted: the dropped snapshots read back bit for bit
    assert moved.steps == [20, 30] and moved.probe_hash == store.probe_hash and moved.layers == store.layers
    for step in (20, 30):
        assert bits_equal(moved.get(step, "conv"), snapshot(step)["conv"])
    assert store.truncate_after(15, move_to=tmp_path / "unused") == [] and not (tmp_path / "unused").exists()
    store.add(20, snapshot(20))
    with pytest.raises(RepSimValueError, match=r"move_to=.*aside' is not empty; give a new directory"):
        store.truncate_after(15, move_to=aside)  # never over another store's manifest and files
    assert store.steps == [0, 10, 20] and open_store(aside).steps == [20, 30]


def test_copy_until_carries_the_thinning_on_as_the_store_itself_would(tmp_path):
    size = make(tmp_path / "size", steps=[990]).nbytes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RepSimWarning)
        source = make(tmp_path / "a", max_bytes=int(6.5 * size), steps=range(0, 200, 10))
        assert source.thinned["stride"] > 1
        copy = source.copy_until(tmp_path / "copy", 120)
        assert copy.steps == [s for s in source.steps if s <= 120]
        assert copy.max_bytes == source.max_bytes and copy.thinned["stride"] == source.thinned["stride"]
        assert copy.thinned["dropped_steps"] == [s for s in source.thinned["dropped_steps"] if s <= 120]
        for step in copy.steps:
            assert bits_equal(copy.get(step, "conv"), snapshot(step)["conv"])
        # the copy goes on exactly as the source resumed in place at step 120 would
        in_place = make(tmp_path / "b", max_bytes=int(6.5 * size), steps=range(0, 200, 10))
        in_place.truncate_after(120)
        for step in range(130, 400, 10):
            copy.add(step, snapshot(step))
            in_place.add(step, snapshot(step))
        assert copy.steps == in_place.steps and copy.thinned == in_place.thinned
    assert source.steps == open_store(source.path).steps  # the source is left as it is
    with pytest.raises(RepSimValueError, match="is not empty; give a new directory"):
        source.copy_until(tmp_path / "copy", 50)


def test_truncate_after(tmp_path):
    store = make(tmp_path, steps=[0, 10, 20, 30, 40, 50])
    assert store.truncate_after(25) == [30, 40, 50]
    assert store.steps == [0, 10, 20]
    assert step_files(store.path) == [f"step-{s:010d}.safetensors" for s in (0, 10, 20)]
    assert [e["step"] for e in manifest(store.path)["steps"]] == [0, 10, 20]
    assert store.truncate_after(25) == []
    store.add(30, snapshot(31))  # the resumed run writes new data for step 30
    reader = open_store(store.path)
    assert reader.steps == [0, 10, 20, 30]
    assert bits_equal(reader.get(30, "conv"), snapshot(31)["conv"])
    assert store.truncate_after(-1) == [0, 10, 20, 30] and open_store(store.path).steps == []
    assert open_store(store.path).layers == list(LAYERS)  # the layer set stays fixed


def test_truncate_after_forgets_later_thinning_records(tmp_path):
    size = make(tmp_path / "size", steps=[0]).nbytes
    store = make(tmp_path, max_bytes=int(4.5 * size))
    with pytest.warns(RepSimWarning):
        for step in range(8):
            store.add(step, snapshot(step))
    assert store.thinned["dropped_steps"]
    store.truncate_after(3)
    assert all(s <= 3 for s in store.thinned["dropped_steps"] + store.steps)
    assert manifest(store.path)["thinned"]["dropped_steps"] == store.thinned["dropped_steps"]


def test_overwrite_replaces_step_and_drops_later_ones(tmp_path):
    store = make(tmp_path, steps=[0, 10, 20])
    store.add(10, snapshot(99), overwrite=True)
    assert store.steps == [0, 10]
    reader = open_store(store.path)
    assert reader.steps == [0, 10]
    assert bits_equal(reader.get(10, "fc"), snapshot(99)["fc"])
    assert step_files(store.path) == ["step-0000000000.safetensors", "step-0000000010.safetensors"]
    store.add(20, snapshot(20), overwrite=True)  # a new step: plain append
    assert open_store(store.path).steps == [0, 10, 20]


def test_reopen_for_append(tmp_path):
    store = make(tmp_path, steps=[0, 10], settings={"a": 1})
    with pytest.raises(RepSimError, match="already exists here.*mode='a'"):
        make(tmp_path)
    with pytest.raises(RepSimError, match=r"made with probe hash 'probe-abc', expected 'other-probe'"):
        SnapshotStore.open(store.path, mode="a", probe_hash="other-probe")
    with pytest.raises(RepSimError, match=r"probe hash 'probe-abc', expected 'other-probe'"):
        open_store(store.path, probe_hash="other-probe")

    writer = SnapshotStore.open(store.path, mode="a", probe_hash="probe-abc", max_bytes=5_000_000)
    assert writer.layers == list(LAYERS) and writer.settings == {"a": 1}
    with pytest.raises(RepSimValueError, match=r"missing \['fc'\]"):
        writer.add(20, {"conv": torch.zeros(N, 1), "block.0": torch.zeros(N, 1)})
    writer.add(20, snapshot(20))
    assert manifest(store.path)["max_bytes"] == 5_000_000

    again = SnapshotStore.create(store.path, probe_hash="probe-abc", n=N, exist_ok=True, max_bytes=5_000_000)
    assert again.steps == [0, 10, 20] and again.mode == "a"
    again.add(30, snapshot(30))
    with pytest.raises(RepSimError, match="n=6 probe examples, not n=7"):
        SnapshotStore.create(store.path, probe_hash="probe-abc", n=7, exist_ok=True)
    reader = open_store(store.path)
    assert reader.steps == [0, 10, 20, 30]
    assert all(bits_equal(reader.get(s, "conv"), snapshot(s)["conv"]) for s in reader)
    with pytest.raises(RepSimValueError, match="mode must be 'r'"):
        SnapshotStore.open(store.path, mode="w")


# ---------------------------------------------------------------- reader errors and corruption


def test_get_errors(tmp_path):
    store = make(tmp_path)
    with pytest.raises(RepSimValueError, match="holds no steps yet"):
        store.get("last")
    for step in (0, 10, 20):
        store.add(step, snapshot(step))
    with pytest.raises(RepSimValueError, match=r"no step 15; stored steps: \[0, 10, 20\]"):
        store.get(15)
    with pytest.raises(RepSimValueError, match=r"step must be an int or 'last', got 'first'"):
        store.get("first")
    with pytest.raises(RepSimValueError, match=r"unknown layer 'head'.*\['conv', 'block.0', 'fc'\]"):
        store.get(10, "head")


def _corrupt(path, how):
    file = path / MANIFEST_NAME
    m = json.loads(file.read_text())
    if how == "bad json":
        file.write_text(json.dumps(m)[:-5])
        return
    if how == "wrong format":
        m["format"] = "something.else"
    elif how == "newer version":
        m["format_version"] = FORMAT_VERSION + 1
    elif how == "path traversal":
        m["steps"][0]["file"] = "../../etc/passwd"
    elif how == "unsorted steps":
        m["steps"] = m["steps"][::-1]
    elif how == "kinds incomplete":
        m["kinds"].pop("fc")
    file.write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("bad json", r"manifest\.json: not valid JSON \("),
        ("wrong format", r"manifest\.json: format is 'something.else', expected 'lightning_repsim.store'"),
        ("newer version", r"manifest\.json: format_version 3 .* is newer than the 2 .* upgrade lightning_repsim"),
        ("path traversal", r"manifest\.json: step 0: file must be 'step-0000000000\.safetensors'"),
        ("unsorted steps", r"manifest\.json: steps are not strictly increasing"),
        ("kinds incomplete", r"manifest\.json: kinds must map every layer"),
    ],
)
def test_corrupt_manifest_raises_one_line_error(tmp_path, how, match):
    store = make(tmp_path, steps=[0, 10])
    _corrupt(store.path, how)
    for opener in (open_store, lambda p: SnapshotStore.open(p, mode="a")):
        with pytest.raises(RepSimError, match=match) as info:
            opener(store.path)
        assert "\n" not in str(info.value)


def test_missing_manifest(tmp_path):
    with pytest.raises(RepSimError, match=r"manifest\.json: not found; .* is not a snapshot store"):
        open_store(tmp_path)


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("other layers", r"tensors do not match the manifest's layers \(missing \['fc'\], unexpected \['head'\]\)"),
        ("other step", r"holds step '99', the manifest says step 10"),
        ("other rows", r"layer 'conv' is F32 of shape \(3, 5\), expected F32 of shape \(6, r\)"),
        ("float64", r"layer 'conv' is F64"),
        ("longer file", r"\d+ bytes, the manifest says \d+"),
    ],
)
def test_step_file_not_matching_manifest(tmp_path, how, match):
    from safetensors.torch import save

    store = make(tmp_path, steps=[0, 10])
    file = store.path / "step-0000000010.safetensors"
    tensors, meta = snapshot(10), {"step": "10"}
    if how == "other layers":
        tensors["head"] = tensors.pop("fc")
    elif how == "other step":
        meta["step"] = "99"
    elif how == "other rows":
        tensors["conv"] = torch.zeros(3, 5)
    elif how == "float64":
        tensors["conv"] = tensors["conv"].double()
    blob = save(tensors, metadata=meta)
    if how == "longer file":
        blob = file.read_bytes() + b"\0" * 8
    file.write_bytes(blob)
    if how != "longer file":
        m = manifest(store.path)
        m["steps"][1]["nbytes"] = len(blob)
        (store.path / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(RepSimError, match=r"step-0000000010\.safetensors: " + match) as info:
        open_store(store.path)
    assert "\n" not in str(info.value)


def test_step_file_changed_after_open_is_an_error_on_get(tmp_path):
    store = make(tmp_path, steps=[0, 10])
    reader = open_store(store.path)
    (store.path / "step-0000000010.safetensors").unlink()
    with pytest.raises(RepSimError, match=r"step-0000000010\.safetensors: missing"):
        reader.get(10)
    data = (store.path / "step-0000000000.safetensors").read_bytes()
    (store.path / "step-0000000000.safetensors").write_bytes(data[:-4])
    with pytest.raises(RepSimError, match=r"step-0000000000\.safetensors: \d+ bytes, the manifest says"):
        reader.get(0)
