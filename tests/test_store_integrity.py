"""Tests of the snapshot store's integrity checks (format 2) and of the probe saved with it.

A step file must carry its store's probe hash and run id, and every tensor read must match the
CRC-32 recorded when it was written; a store of format 1 (no run id, no checksums) still reads.
"""

import json
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from lightning_repsim.errors import RepSimError, RepSimIntegrityError, RepSimValueError, RepSimWarning
from lightning_repsim.store import FORMAT_NAME, MANIFEST_NAME, PROBE_FILE, SnapshotStore, open_store

N = 6
LAYERS = ("conv", "fc")
STEP_10 = "step-0000000010.safetensors"


def snapshot(step):
    g = torch.Generator().manual_seed(step)
    return {"conv": torch.randn(N, 4, generator=g), "fc": torch.randn(N, 2, generator=g)}


def make(path, probe_hash="probe-a", steps=(0, 10), **kwargs):
    store = SnapshotStore.create(path, probe_hash=probe_hash, n=N, **kwargs)
    for step in steps:
        store.add(step, snapshot(step))
    return store


def manifest(path):
    return json.loads((Path(path) / MANIFEST_NAME).read_text())


def one_line_error(info, *fragments):
    text = str(info.value)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text, text
    return text


# ---------------------------------------------------------------- foreign step files


def test_a_step_file_of_another_probe_is_refused_naming_the_file_and_both_probes(tmp_path):
    ours = make(tmp_path / "ours")
    theirs = make(tmp_path / "theirs", probe_hash="probe-b")
    shutil.copy(theirs.path / STEP_10, ours.path / STEP_10)  # same size: same layers and shapes
    with pytest.raises(RepSimIntegrityError) as info:
        open_store(ours.path)
    one_line_error(info, str(ours.path / STEP_10), "'probe-b'", "'probe-a'", "another run or probe set")
    with pytest.raises(RepSimIntegrityError):  # reading through an already open store, too
        ours.get(10)


def test_a_step_file_of_another_run_on_the_same_probe_is_refused(tmp_path):
    ours = make(tmp_path / "ours")
    theirs = make(tmp_path / "theirs")  # the same probe, the same steps: only the run id differs
    assert ours.run_id != theirs.run_id
    (ours.path / STEP_10).unlink()
    (ours.path / STEP_10).symlink_to(theirs.path / STEP_10)
    with pytest.raises(RepSimIntegrityError) as info:
        open_store(ours.path)
    one_line_error(info, str(ours.path / STEP_10), repr(theirs.run_id), repr(ours.run_id), "another run")


def test_the_run_id_can_be_given_and_is_checked(tmp_path):
    store = make(tmp_path / "a", run_id="run-1")
    assert store.run_id == open_store(store.path).run_id == "run-1"
    copy = make(tmp_path / "b", run_id="run-1")  # a run's own copy (e.g. a resumed fit's seed) reads
    shutil.copy(copy.path / STEP_10, store.path / STEP_10)
    assert open_store(store.path).steps == [0, 10]
    with pytest.raises(RepSimValueError, match="run_id must be a non-empty str"):
        SnapshotStore.create(tmp_path / "c", probe_hash="p", n=N, run_id="")


# ---------------------------------------------------------------- damaged bytes


def flip_a_bit_of(path, layer="conv", row=2, col=1):
    """Flip the lowest mantissa bit of one float32 in a step file: the value stays finite, the size the same."""
    data = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    start = 8 + header_len + header[layer]["data_offsets"][0]
    at = start + 4 * (row * header[layer]["shape"][1] + col)
    before = struct.unpack("<f", data[at : at + 4])[0]
    data[at] ^= 1
    after = struct.unpack("<f", data[at : at + 4])[0]
    assert before != after and abs(after - before) < 1e-5 * abs(before)
    path.write_bytes(bytes(data))


def test_a_flipped_byte_that_stays_finite_is_a_checksum_error_on_read(tmp_path):
    store = make(tmp_path / "repsim")
    flip_a_bit_of(store.path / STEP_10)
    reader = open_store(store.path)  # the header is intact: opening reads headers only
    with pytest.raises(RepSimIntegrityError) as info:
        reader.get(10)
    one_line_error(info, str(store.path / STEP_10), "'conv'", "fails its checksum", "damaged")
    assert torch.isfinite(reader.get(10, "fc")).all()  # the other tensor of that file is intact
    assert torch.equal(reader.get(0, "conv"), snapshot(0)["conv"])
    (problem,) = reader.verify()
    assert problem.startswith(str(store.path / STEP_10)) and "fails its checksum" in problem


def test_skip_damaged_leaves_out_each_damaged_or_foreign_file_with_one_warning(tmp_path):
    store = make(tmp_path / "ours", steps=(0, 10, 20, 30))
    other = make(tmp_path / "other", probe_hash="probe-b", steps=(0, 10, 20, 30))
    flip_a_bit_of(store.path / STEP_10)
    shutil.copy(other.path / "step-0000000020.safetensors", store.path / "step-0000000020.safetensors")
    with pytest.raises(RepSimIntegrityError):
        open_store(store.path)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        reader = open_store(store.path, skip_damaged=True)
    messages = [str(w.message) for w in records if issubclass(w.category, RepSimWarning)]
    assert reader.steps == [0, 30]
    assert len(messages) == 2
    assert STEP_10 in messages[0] and "checksum" in messages[0]
    assert "step-0000000020.safetensors" in messages[1] and "'probe-b'" in messages[1]
    with pytest.raises(RepSimValueError, match="mode='r'"):
        SnapshotStore.open(store.path, mode="a", skip_damaged=True)


def test_verify_an_intact_store_and_a_manifest_run_id_that_is_not_a_string(tmp_path):
    store = make(tmp_path / "repsim")
    store.save_probe(torch.randn(N, 3))
    assert store.verify() == [] and open_store(store.path).verify() == []
    m = manifest(store.path)
    m["run_id"] = 7
    (store.path / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(RepSimError, match=r"manifest\.json: run_id must be a non-empty string, got 7"):
        open_store(store.path)


# ---------------------------------------------------------------- format 1 stays readable


def as_format_1(store, run_id="from-the-callback"):
    """Rewrite ``store`` as lightning_repsim wrote it before format 2: no run id, no checksums, no probe; the
    callback kept its ``run_id`` in the settings."""
    m = manifest(store.path)
    for entry in m["steps"]:
        file = store.path / entry["file"]
        with safe_open(str(file), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        meta = {"format": FORMAT_NAME, "format_version": "1", "step": str(entry["step"]), "probe_hash": m["probe_hash"]}
        blob = save(tensors, metadata=meta)
        file.write_bytes(blob)
        entry["nbytes"] = len(blob)
        del entry["format_version"]
    m["format_version"] = 1
    m["settings"]["run_id"] = run_id
    del m["run_id"], m["probe"]
    (store.path / MANIFEST_NAME).write_text(json.dumps(m))
    return store.path


def test_a_format_1_store_reads_and_appending_upgrades_it(tmp_path):
    path = as_format_1(make(tmp_path / "repsim"))
    old = open_store(path)
    assert old.run_id is None and not old.has_probe and old.verify() == []
    assert torch.equal(old.get(10, "conv"), snapshot(10)["conv"])

    store = SnapshotStore.open(path, mode="a")  # appending: the manifest becomes format 2
    assert store.run_id == "from-the-callback"
    store.add(20, snapshot(20))
    m = manifest(path)
    assert m["format_version"] == 2 and m["run_id"] == "from-the-callback"
    assert [e.get("format_version", 1) for e in m["steps"]] == [1, 1, 2]
    reader = open_store(path)
    assert reader.steps == [0, 10, 20] and reader.verify() == []
    assert all(torch.equal(reader.get(s, "fc"), snapshot(s)["fc"]) for s in (0, 10, 20))
    flip_a_bit_of(path / "step-0000000020.safetensors")  # the new step is checksummed
    assert "fails its checksum" in reader.verify()[0]


def test_a_format_1_step_file_must_still_be_of_the_stores_probe(tmp_path):
    path = as_format_1(make(tmp_path / "ours"))
    other = as_format_1(make(tmp_path / "other", probe_hash="probe-b"))
    shutil.copy(other / STEP_10, path / STEP_10)
    with pytest.raises(RepSimIntegrityError, match="recorded on probe 'probe-b'"):
        open_store(path)


def test_a_format_2_step_without_run_id_or_checksums_is_refused(tmp_path):
    store = make(tmp_path / "repsim")
    file = store.path / STEP_10
    meta = {"format": FORMAT_NAME, "format_version": "2", "step": "10", "probe_hash": "probe-a"}
    blob = save(snapshot(10), metadata=meta)
    file.write_bytes(blob)
    m = manifest(store.path)
    m["steps"][1]["nbytes"] = len(blob)
    (store.path / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(
        RepSimIntegrityError, match=r"step-0000000010\.safetensors: a step file without run_id or crc32"
    ):
        open_store(store.path)


# ---------------------------------------------------------------- the saved probe


@pytest.mark.parametrize(
    "inputs",
    [
        torch.randn(N, 3, 4, dtype=torch.bfloat16),
        torch.arange(N * 5).reshape(N, 5),
        torch.rand(N, 2) > 0.5,
        (torch.randn(N, 3), torch.arange(N)),
        {"input_ids": torch.arange(N * 7).reshape(N, 7), "mask": torch.ones(N, 7, dtype=torch.bool)},
    ],
    ids=["bf16", "int64", "bool", "tuple", "dict"],
)
def test_the_probe_saved_with_the_store_comes_back_bit_for_bit(tmp_path, inputs):
    store = make(tmp_path / "repsim")
    assert not store.has_probe
    store.save_probe(inputs)
    reader = open_store(store.path)
    assert reader.has_probe and manifest(store.path)["probe"]["file"] == PROBE_FILE
    loaded = reader.load_probe()
    if isinstance(inputs, torch.Tensor):
        assert loaded.dtype == inputs.dtype and torch.equal(loaded, inputs)
    elif isinstance(inputs, tuple):
        assert isinstance(loaded, tuple) and all(torch.equal(a, b) for a, b in zip(loaded, inputs, strict=True))
    else:
        assert set(loaded) == set(inputs) and all(torch.equal(loaded[k], inputs[k]) for k in inputs)


def test_a_saved_probe_that_is_damaged_foreign_or_missing(tmp_path):
    store = make(tmp_path / "ours")
    store.save_probe(torch.randn(N, 3))
    other = make(tmp_path / "other")
    other.save_probe(torch.randn(N, 3))
    probe_file = store.path / PROBE_FILE
    kept = probe_file.read_bytes()

    shutil.copy(other.path / PROBE_FILE, probe_file)  # same size, another run's
    with pytest.raises(RepSimIntegrityError, match=r"probe\.safetensors: a probe file written by run"):
        open_store(store.path).load_probe()

    data = bytearray(kept)
    data[-3] ^= 1
    probe_file.write_bytes(bytes(data))
    with pytest.raises(RepSimIntegrityError, match=r"probe\.safetensors: tensor 'inputs' fails its checksum"):
        open_store(store.path).load_probe()
    assert "fails its checksum" in open_store(store.path).verify()[0]

    probe_file.unlink()
    with pytest.warns(RepSimWarning, match="the saved probe is missing"):
        reader = open_store(store.path)
    assert not reader.has_probe
    with pytest.raises(RepSimError, match="no probe is saved with this store"):
        reader.load_probe()


def test_save_probe_refuses_what_it_cannot_save_and_a_read_only_store(tmp_path):
    store = make(tmp_path / "repsim")
    for bad in (["a", "b"], [1.0, 2.0], {"x": 1}, (), None):
        with pytest.raises(RepSimValueError, match="a probe is saved as a tensor"):
            store.save_probe(bad)
    assert not open_store(store.path).has_probe
    with pytest.raises(RepSimError, match="read-only"):
        open_store(store.path).save_probe(torch.zeros(N, 1))


def test_copies_and_set_aside_steps_keep_the_probe(tmp_path):
    store = make(tmp_path / "repsim", steps=(0, 10, 20))
    inputs = torch.randn(N, 3)
    store.save_probe(inputs)
    copy = store.copy_until(tmp_path / "copy", 10)
    assert copy.run_id == store.run_id and torch.equal(copy.load_probe(), inputs)
    store.truncate_after(10, move_to=tmp_path / "aside")
    aside = open_store(tmp_path / "aside")
    assert aside.steps == [20] and torch.equal(aside.load_probe(), inputs) and aside.verify() == []
    assert open_store(store.path).verify() == []
