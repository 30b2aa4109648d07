"""Tests of the ``lightning-repsim`` command line (lightning_repsim.cli).

Stores are built directly with :class:`~lightning_repsim.store.SnapshotStore` (random tensors, no
training); one end-to-end test trains two tiny runs with ``RepresentationSimilarity`` and compares
them. Every value the CLI writes is checked against :func:`similarity_matrix` recomputed from the
stores.
"""

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from lightning_repsim.callbacks import RepresentationSimilarity
from lightning_repsim.cli import main, open_run
from lightning_repsim.functional import similarity_matrix
from lightning_repsim.store import SnapshotStore, open_store

N = 40
STEPS = [0, 5, 10]
LAYERS = ["conv", "block.0", "block.1", "fc"]
WIDTHS = {"conv": 6, "block.0": 5, "block.1": 8, "fc": 3}
FACTOR = "block.1"  # stored as a Gram factor: pwcca is NaN for it


def make_store(run_dir, probe_hash, seed, settings=None, name="repsim"):
    """A run directory ``run_dir`` with a store at ``run_dir/<name>``: 4 layers, 3 steps."""
    g = torch.Generator().manual_seed(seed)
    store = SnapshotStore.create(Path(run_dir) / name, probe_hash=probe_hash, n=N, settings=settings)
    base = {name: torch.randn(N, p, generator=g) for name, p in WIDTHS.items()}
    for k, step in enumerate(STEPS):  # drifting towards the last step, so convergence is visible
        tensors = {
            name: x + (len(STEPS) - 1 - k) * torch.randn(N, WIDTHS[name], generator=g) for name, x in base.items()
        }
        store.add(step, tensors, kinds={FACTOR: "gram_factor"})
    return Path(run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {
        "a": make_store(
            root / "seed0" / "version_0",
            "probe-1",
            seed=0,
            settings={"measures": ["linear_cka", "rv2"], "options": {"rv2": {"center": False}}},
        ),
        "b": make_store(root / "seed1" / "version_0", "probe-1", seed=1),
        "other": make_store(root / "other" / "version_0", "probe-2", seed=2),
        "root": root,
    }


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def same(x, y):
    """Equal as floats, NaN equal to NaN (values are written with repr: exact)."""
    return (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-12)


def expected_matrix(store_a, store_b, step_a, step_b, measure, **options):
    xs, ys = store_a.get(step_a), store_b.get(step_b)
    if measure != "pwcca":
        return similarity_matrix(xs, ys, measure, **options)
    out = torch.full((len(xs), len(ys)), float("nan"), dtype=torch.float64)
    for i, a in enumerate(xs):
        for j, b in enumerate(ys):
            if store_a.kinds[a] == "features" and store_b.kinds[b] == "features":
                out[i, j] = similarity_matrix([xs[a]], [ys[b]], "pwcca")[0, 0]
    return out


def assert_csv_matrix(path, expected):
    """The values of a labelled matrix CSV equal ``expected`` (NaN where it is NaN)."""
    got = torch.tensor([[float(v) for v in r[1:]] for r in read_csv(path)[1:]], dtype=torch.float64)
    expected = expected.to(torch.float64)
    assert got.shape == expected.shape
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.allclose(got.nan_to_num(), expected.nan_to_num(), rtol=0, atol=1e-12)


def check_error(capsys, argv, *fragments):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lightning-repsim: error: ")
    assert "Traceback" not in captured.err + captured.out
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- compare


def test_compare_writes_heatmaps_csv_and_tensorboard(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [
        "compare",
        str(runs["a"]),
        str(runs["b"]),
        "--measure",
        "linear_cka",
        "--measure",
        "rv2,pwcca",
        "--out",
        str(out),
        "--tensorboard",
        "--quiet",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "seed0/version_0" in printed and "seed1/version_0" in printed
    assert "same layer in both runs" in printed and "pwcca is NaN" in printed
    store_a, store_b = open_store(runs["a"] / "repsim"), open_store(runs["b"] / "repsim")
    for measure, options in [("linear_cka", {}), ("rv2", {"center": False}), ("pwcca", {})]:  # a's options
        assert (out / f"{measure}.png").stat().st_size > 1000
        rows = read_csv(out / f"{measure}.csv")
        assert rows[0][1:] == LAYERS and [r[0] for r in rows[1:]] == LAYERS
        assert_csv_matrix(out / f"{measure}.csv", expected_matrix(store_a, store_b, 10, 10, measure, **options))
        diagonal = [float(rows[1 + i][1 + i]) for i in range(len(LAYERS))]
        assert any(f"{d:.4f}" in printed for d in diagonal if not math.isnan(d))
    assert math.isnan(float(read_csv(out / "pwcca.csv")[1 + LAYERS.index(FACTOR)][1]))
    summary = json.loads((out / "compare.json").read_text())
    assert summary["run_a"]["step"] == 10 and summary["probe_hash"] == "probe-1"

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    label = "seed1_version_0"
    assert f"repsim/linear_cka/{label}/heatmap" in acc.Tags()["images"]
    scalar = acc.Scalars(f"repsim/rv2/{label}/conv")[0]
    assert scalar.step == 10 and scalar.value == pytest.approx(float(read_csv(out / "rv2.csv")[1][1]), abs=1e-6)


def test_compare_at_a_step_resolves_store_and_log_dirs(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    # RUN_A as the store directory itself, RUN_B as a log directory holding a single version_*/
    assert main(["compare", str(runs["a"] / "repsim"), str(runs["b"].parent), "--step", "5", "--out", str(out)]) == 0
    assert "at step 5" in capsys.readouterr().out
    expected = similarity_matrix(open_store(runs["a"] / "repsim").get(5), open_store(runs["b"] / "repsim").get(5))
    assert_csv_matrix(out / "linear_cka.csv", expected)


def test_compare_a_run_with_itself_and_different_layer_names(tmp_path, capsys):
    a = make_store(tmp_path / "a", "p", seed=0)
    store = SnapshotStore.create(tmp_path / "b" / "repsim", probe_hash="p", n=N)
    store.add(3, {"x": torch.randn(N, 4), "y": torch.randn(N, 2)})
    assert main(["compare", str(a), str(a), "--out", str(tmp_path / "o1"), "-q"]) == 0
    assert "a [A]" in capsys.readouterr().out  # same name twice: told apart
    assert main(["compare", str(a), str(tmp_path / "b"), "--out", str(tmp_path / "o2"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "layer names differ" in printed
    assert read_csv(tmp_path / "o2" / "linear_cka.csv")[0][1:] == ["x", "y"]


def test_a_run_directory_with_one_store_per_fit(tmp_path, capsys):
    """Two fits into the same run directory leave repsim/ and repsim-1/: each is found, neither is guessed."""
    run = make_store(tmp_path / "logs" / "run" / "version_0", "p", seed=0)
    make_store(run, "p", seed=1, name="repsim-1")
    out = ["--out", str(tmp_path / "o")]
    check_error(capsys, ["report", str(run), *out], "holds 2 snapshot stores", str(run / "repsim-1"))
    check_error(capsys, ["report", str(tmp_path / "logs" / "run"), *out], "holds 2 runs", str(run / "repsim-1"))
    assert open_run(str(run / "repsim-1")).run_dir == run  # where its TensorBoard events are
    assert main(["compare", str(run / "repsim"), str(run / "repsim-1"), *out, "-q"]) == 0
    printed = capsys.readouterr().out
    assert "A: run/version_0 at step 10" in printed and "B: run/version_0/repsim-1 at step 10" in printed
    shutil.rmtree(run / "repsim")  # a run directory whose only store is a later fit's
    assert main(["export", str(run), "--reference", "final", "--measure", "rv"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) - 1 == n_rows(1, ["final"])


# ----------------------------------------------------------------------------- report


def write_freeze_events(run_dir):
    """What FreezeTraining writes through Lightning's TensorBoardLogger."""
    with SummaryWriter(str(run_dir)) as writer:
        for step, fraction, units in [(0, 0.0, 0), (5, 0.4, 1), (10, 0.7, 2)]:
            writer.add_scalar("freeze/frozen_fraction", fraction, step)
            writer.add_scalar("freeze/frozen_units", units, step)
        writer.add_text("freeze/events", "step 5 (epoch 1): froze `conv` (schedule linear)", 5)
        writer.add_text("freeze/events", "step 10 (epoch 2): froze `block.0` (schedule linear)", 10)


def test_report_convergence_and_freeze_events(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["a"], run)
    write_freeze_events(run)
    out = tmp_path / "rep"
    assert main(["report", str(run), "--threshold", "0.9", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "converged at step" in printed and "conv" in printed and "fc" in printed
    assert "freeze events: 2, 70% of parameters frozen at the end" in printed
    assert "froze `block.0`" in printed
    store = open_store(run / "repsim")
    for measure, options in [("linear_cka", {}), ("rv2", {"center": False})]:  # the run's logged measures
        for suffix in ("convergence_map", "curves"):
            assert (out / f"{measure}__{suffix}.png").stat().st_size > 1000
        rows = read_csv(out / f"{measure}__final.csv")
        assert rows[0] == ["layer", *map(str, STEPS)]
        for i, name in enumerate(LAYERS):
            series = [store.get(s, name) for s in STEPS]
            expected = similarity_matrix(series, [series[-1]], measure, **options)[:, 0]
            assert [float(v) for v in rows[1 + i][1:]] == pytest.approx(expected.tolist(), abs=1e-12)
        assert (out / f"{measure}__convergence.txt").read_text().startswith("#  layer")
    assert (out / "freeze.png").exists()
    assert "froze `conv`" in (out / "freeze_events.txt").read_text()


def test_report_writes_beside_the_run_and_never_overwrites(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["a"], run)
    assert main(["report", str(run), "-q"]) == 0
    assert main(["report", str(run / "repsim"), "-q"]) == 0  # the store directly: the same run directory
    assert (run / "repsim-report" / "linear_cka__convergence.txt").is_file()
    assert (run / "repsim-report-1" / "linear_cka__convergence.txt").is_file()
    first = (run / "repsim-report" / "linear_cka__final.csv").read_bytes()
    check_error(capsys, ["report", str(run), "--out", str(run / "repsim-report")], "holds files already", "--overwrite")
    assert main(["report", str(run), "--out", str(run / "repsim-report"), "--overwrite", "-q"]) == 0
    assert (run / "repsim-report" / "linear_cka__final.csv").read_bytes() == first


def test_report_without_freeze_events_says_so(runs, tmp_path, capsys):
    assert main(["report", str(runs["b"]), "--measure", "pwcca", "--out", str(tmp_path / "rep"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "freeze events: none (no TensorBoard event files" in printed
    assert "PWCCA to the final snapshot" in printed and "not reached" in printed  # the Gram-factor layer
    assert "pwcca is NaN" in printed


# ----------------------------------------------------------------------------- export


def n_rows(measures, references, steps=None):
    layers, steps = len(LAYERS), len(STEPS) if steps is None else steps
    per = {"final": layers * steps, "previous": layers * layers * (steps - 1), "init": layers * layers * steps}
    return measures * sum(per[r] for r in references)


def test_export_csv_and_json(runs, tmp_path, capsys):
    out_csv, out_json = tmp_path / "x.csv", tmp_path / "x.json"
    assert main(["export", str(runs["a"]), "--out", str(out_csv), "-q"]) == 0
    rows = read_csv(out_csv)
    assert rows[0] == ["run", "step", "measure", "reference", "layer_a", "layer_b", "value"]
    assert len(rows) - 1 == n_rows(2, ["final", "previous", "init"])  # the logged measures: linear_cka, rv2
    assert {r[0] for r in rows[1:]} == {"seed0/version_0"}

    assert (
        main(
            [
                "export",
                str(runs["a"]),
                "--out",
                str(out_json),
                "--measure",
                "pwcca",
                "--measure",
                "linear_cka",
                "--reference",
                "init",
                "-q",
            ]
        )
        == 0
    )
    records = json.loads(out_json.read_text())
    assert len(records) == n_rows(2, ["init"])
    assert any(r["value"] is None for r in records if r["measure"] == "pwcca")  # NaN -> null

    store = open_store(runs["a"] / "repsim")
    by_key = {(int(r[1]), r[2], r[3], r[4], r[5]): float(r[6]) for r in rows[1:]}
    assert len(by_key) == len(rows) - 1
    final = {
        name: similarity_matrix([store.get(s, name) for s in STEPS], [store.get(10, name)], "rv2", center=False)[:, 0]
        for name in LAYERS
    }
    for t, step in enumerate(STEPS):
        for name in LAYERS:
            assert same(by_key[(step, "rv2", "final", name, name)], float(final[name][t]))
        init = similarity_matrix(store.get(step), store.get(0), "linear_cka")
        for i, a in enumerate(LAYERS):
            for j, b in enumerate(LAYERS):
                assert same(by_key[(step, "linear_cka", "init", a, b)], float(init[i, j]))
        if t:
            previous = similarity_matrix(store.get(step), store.get(STEPS[t - 1]), "linear_cka")
            assert same(by_key[(step, "linear_cka", "previous", "fc", "conv")], float(previous[3, 0]))
    json_value = {(r["step"], r["measure"], r["reference"], r["layer_a"], r["layer_b"]): r["value"] for r in records}
    assert json_value[(5, "linear_cka", "init", "conv", "fc")] == pytest.approx(
        by_key[(5, "linear_cka", "init", "conv", "fc")], abs=1e-12
    )


def test_export_to_stdout_with_chosen_references(runs, capsys):
    assert (
        main(["export", str(runs["b"]), "--reference", "previous", "--reference", "final", "--measure", "svcca"]) == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) - 1 == n_rows(1, ["final", "previous"])
    assert {line.split(",")[3] for line in lines[1:]} == {"final", "previous"}
    assert main(["export", str(runs["b"]), "--format", "json", "--reference", "final"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == n_rows(1, ["final"])  # default: linear_cka


# ----------------------------------------------------------------------------- errors and help


def damaged_copy(runs, tmp_path, how):
    run = tmp_path / "run"
    shutil.copytree(runs["a"], run)
    if how == "corrupt manifest":
        (run / "repsim" / "manifest.json").write_text('{"format": "lightning_repsim.store", "steps": [')
    elif how == "truncated step":
        step_file = run / "repsim" / "step-0000000005.safetensors"
        step_file.write_bytes(step_file.read_bytes()[:100])
    elif how == "garbage step":
        step_file = run / "repsim" / "step-0000000005.safetensors"
        step_file.write_bytes(b"\0" * step_file.stat().st_size)
    elif how == "foreign step":  # the same step of a run on another probe set, copied in
        shutil.copy(runs["other"] / "repsim" / "step-0000000005.safetensors", run / "repsim")
    elif how == "flipped byte":  # the last byte of the last tensor: a float32's top byte, the value stays finite
        step_file = run / "repsim" / "step-0000000005.safetensors"
        data = bytearray(step_file.read_bytes())
        data[-1] ^= 0x01
        step_file.write_bytes(bytes(data))
    return run


@pytest.mark.parametrize(
    "how, fragment",
    [
        ("corrupt manifest", "not valid JSON"),
        ("truncated step", "truncated"),
        ("garbage step", "not a readable safetensors file"),
        ("foreign step", "recorded on probe 'probe-2'"),
        ("flipped byte", "fails its checksum"),
    ],
)
def test_damaged_stores_are_one_line_errors(runs, tmp_path, capsys, how, fragment):
    run = damaged_copy(runs, tmp_path, how)
    line = check_error(capsys, ["report", str(run), "--out", str(tmp_path / "o")], fragment)
    if how != "corrupt manifest":
        assert "--allow-damaged" in line and ("step 5" if how == "truncated step" else "step-0000000005") in line


@pytest.mark.parametrize("how", ["garbage step", "foreign step", "flipped byte"])
def test_allow_damaged_skips_a_damaged_or_foreign_step_file_with_a_note(runs, tmp_path, capsys, how):
    run = damaged_copy(runs, tmp_path, how)
    assert main(["export", str(run), "--allow-damaged", "--reference", "final", "--measure", "rv"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) - 1 == n_rows(1, ["final"], steps=2)
    (note,) = [line for line in captured.err.splitlines() if "note:" in line]
    assert "skipping step 5" in note and "step-0000000005.safetensors" in note


def test_verify_says_ok_or_lists_the_damaged_files(runs, tmp_path, capsys):
    assert main(["verify", str(runs["a"]), str(runs["b"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("OK ") and "checksums verified" in line for line in lines)
    run = damaged_copy(runs, tmp_path, "flipped byte")
    shutil.copy(runs["other"] / "repsim" / "step-0000000010.safetensors", run / "repsim")
    assert main(["verify", str(runs["a"]), str(run)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("OK ") and out[1].startswith(f"DAMAGED {run / 'repsim'}: 2 problem(s), 1 intact step")
    assert "step-0000000005.safetensors" in out[2] and "fails its checksum" in out[2]
    assert "step-0000000010.safetensors" in out[3] and "'probe-2'" in out[3]
    (run / "repsim" / "manifest.json").write_text("{")
    assert main(["verify", str(run)]) == 1
    assert "not valid JSON" in capsys.readouterr().out
    check_error(capsys, ["verify", str(tmp_path / "missing")], "no such directory")


def test_allow_damaged_uses_the_intact_snapshots(runs, tmp_path, capsys):
    run = damaged_copy(runs, tmp_path, "truncated step")
    assert main(["export", str(run), "--allow-damaged", "--reference", "final", "--measure", "rv"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) - 1 == n_rows(1, ["final"], steps=2)
    assert "note:" in captured.err and "truncated" in captured.err


def test_user_errors_exit_2_with_one_line(runs, tmp_path, capsys):
    a, b, other = str(runs["a"]), str(runs["b"]), str(runs["other"])
    out = ["--out", str(tmp_path / "o")]
    check_error(capsys, ["compare", str(tmp_path / "missing"), b, *out], "missing: no such directory")
    (tmp_path / "empty").mkdir()
    check_error(capsys, ["report", str(tmp_path / "empty"), *out], "no snapshot store")
    check_error(capsys, ["export", str(runs["root"])], "holds 3 runs")  # ambiguous log dir
    line = check_error(capsys, ["compare", a, other, *out], "probe hashes differ")
    assert "'probe-1'" in line and "'probe-2'" in line
    check_error(capsys, ["compare", a, b, "--step", "7", *out], "no step 7", "0, 5, 10")
    check_error(capsys, ["compare", a, b, "--step", "soon", *out], "--step")
    check_error(capsys, ["compare", a, b, "--measure", "cka", *out], "unknown measure 'cka'", "linear_cka")
    check_error(capsys, ["export", a, "--reference", "last"], "unknown reference 'last'")
    check_error(capsys, ["report", a, "--threshold", "1.5", *out], "--threshold")
    check_error(capsys, ["frobnicate"], "invalid choice")
    check_error(capsys, [], "COMMAND")
    single = SnapshotStore.create(tmp_path / "single" / "repsim", probe_hash="p", n=N)
    single.add(0, {"x": torch.randn(N, 3)})
    check_error(capsys, ["report", str(tmp_path / "single"), *out], "at least two")
    SnapshotStore.create(tmp_path / "fresh" / "repsim", probe_hash="p", n=N)
    check_error(capsys, ["export", str(tmp_path / "fresh")], "no snapshots yet")


@pytest.mark.parametrize("command", [[], ["compare"], ["report"], ["export"], ["verify"]])
def test_help_has_examples(capsys, command):
    assert main([*command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "lightning-repsim" in text


def test_console_script_help():
    script = shutil.which("lightning-repsim", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the lightning-repsim console script is not installed (pip install -e .)")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "compare" in result.stdout and "export" in result.stdout


@pytest.mark.parametrize("argv", [["--help"], ["report", "--help"], ["compare", "/nowhere"]])
def test_help_and_argument_errors_import_nothing_heavy(argv):
    """`--help` and argument errors answer at once: neither torch, Matplotlib nor TensorBoard is imported
    (they took 4 s of a 4 s `--help`)."""
    code = (
        "import sys\nfrom lightning_repsim.cli import main\n"
        f"status = main({argv!r})\n"
        "heavy = sorted(m for m in ('torch', 'matplotlib', 'tensorboard', 'numpy') if m in sys.modules)\n"
        "print(status, heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    status, heavy = done.stdout.strip().splitlines()[-1].split(" ", 1)
    assert heavy == "[]", heavy
    assert status in ("0", "2")


# ----------------------------------------------------------------------------- end to end


class MLP(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.body(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def train_run(root, seed, probe):
    pl.seed_everything(seed, verbose=False)
    g = torch.Generator().manual_seed(100)
    x = torch.randn(64, 6, generator=g)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)
    trainer = pl.Trainer(
        default_root_dir=str(root),
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(root), name=f"seed{seed}", version=0),
        callbacks=[RepresentationSimilarity(probe=probe, reference=["init", "final"], write_files=False)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(MLP(), loader)
    return Path(trainer.logger.log_dir)


def test_end_to_end_two_seeds(tmp_path, capsys):
    probe = torch.randn(40, 6, generator=torch.Generator().manual_seed(7))
    run_a, run_b = train_run(tmp_path, 0, probe), train_run(tmp_path, 1, probe)
    out = tmp_path / "cmp"
    assert main(["compare", str(run_a), str(run_b), "--measure", "linear_cka,rv2", "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "seed0/version_0" in printed and "same layer in both runs" in printed
    store_a, store_b = open_store(run_a / "repsim"), open_store(run_b / "repsim")
    assert store_a.layers == ["body", "mid", "head"] and store_a.steps == store_b.steps == [0, 4, 8]
    for measure in ("linear_cka", "rv2"):
        assert (out / f"{measure}.png").stat().st_size > 1000
        rows = read_csv(out / f"{measure}.csv")
        assert [r[0] for r in rows[1:]] == rows[0][1:] == store_a.layers
        assert_csv_matrix(out / f"{measure}.csv", similarity_matrix(store_a.get("last"), store_b.get("last"), measure))


def test_report_writes_the_callbacks_convergence_table_byte_for_byte(tmp_path):
    """The callback (at the end of fit) and `lightning-repsim report` (afterwards) write the convergence
    report through one writer: from the same store, the same tables and values, byte for byte."""
    probe = torch.randn(40, 6, generator=torch.Generator().manual_seed(7))
    run = train_run(tmp_path, 0, probe)
    out = tmp_path / "report"
    assert main(["report", str(run), "--out", str(out), "-q"]) == 0
    by_callback = run / "repsim" / "figures" / "final"
    for measure in ("linear_cka", "rv2"):  # the callback's default measures, recorded in the store
        for name in (f"{measure}__convergence.txt", f"{measure}__final.csv"):
            assert (out / name).read_bytes() == (by_callback / name).read_bytes(), name


# ----------------------------------------------------------------------------- --interval


def test_compare_export_and_report_with_interval(runs, tmp_path, capsys):
    """--interval: compare writes <measure>__intervals.csv (value, low, high per cell) and outlines ties;
    export gains columns low and high; report prints each layer's 'converged between' range.
    Every number read back equals similarity_interval on the stored features."""
    from lightning_repsim.functional import similarity_interval

    store_a, store_b = open_store(runs["a"] / "repsim"), open_store(runs["b"] / "repsim")
    out = tmp_path / "cmp"
    argv = ["compare", str(runs["a"]), str(runs["b"]), "--measure", "linear_cka,svcca", "--interval", "0.9"]
    assert main([*argv, "--out", str(out), "-q"]) == 0
    with open(out / "linear_cka__intervals.csv", newline="") as handle:
        cells = list(csv.DictReader(handle))
    assert len(cells) == len(LAYERS) ** 2 and list(cells[0]) == ["layer_a", "layer_b", "value", "low", "high"]
    for cell in cells[:: len(LAYERS) + 1] + cells[1:2]:  # the diagonal and one off-diagonal cell
        want = similarity_interval(store_a.get(10, cell["layer_a"]), store_b.get(10, cell["layer_b"]), level=0.9)
        got = (float(cell["value"]), float(cell["low"]), float(cell["high"]))
        assert got == pytest.approx((want.value, want.low, want.high), abs=1e-7), cell
    with open(out / "svcca__intervals.csv", newline="") as handle:
        assert all(math.isnan(float(row["low"])) for row in csv.DictReader(handle))
    summary = json.loads((out / "compare.json").read_text())
    assert summary["interval"] == 0.9 and len(summary["measures"]["linear_cka"]["low"]) == len(LAYERS)
    assert main(argv[:5] + ["--out", str(tmp_path / "plain"), "-q"]) == 0
    assert not list((tmp_path / "plain").glob("*__intervals.csv"))

    out_csv = tmp_path / "x.csv"
    assert main(["export", str(runs["a"]), "--measure", "linear_cka", "--interval", "0.9", "--out", str(out_csv)]) == 0
    with open(out_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[-2:] == ["low", "high"] and len(rows) == n_rows(1, ["final", "previous", "init"])
    row = next(
        r for r in rows if (r["step"], r["reference"], r["layer_a"], r["layer_b"]) == ("5", "init", "fc", "conv")
    )
    want = similarity_interval(store_a.get(5, "fc"), store_a.get(0, "conv"), level=0.9)
    assert (float(row["low"]), float(row["high"])) == pytest.approx((want.low, want.high), abs=1e-7)
    assert all(float(r["low"]) <= float(r["high"]) for r in rows)

    capsys.readouterr()
    assert (
        main(["report", str(runs["a"]), "--measure", "linear_cka", "--interval", "0.9", "--out", str(tmp_path / "r")])
        == 0
    )
    printed = capsys.readouterr().out
    assert "converged between" in printed and (tmp_path / "r" / "linear_cka__final_low.csv").is_file()
    check_error(capsys, ["export", str(runs["a"]), "--interval", "95"], "--interval", "between 0 and 1")
