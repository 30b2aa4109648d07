"""Tests of compare(): every layer of one model against every layer of another on one probe.

Matrices are checked against :func:`similarity_matrix` of :func:`capture`\\ d features and, cell
by cell, against the papers' formulas (tests/reference.py) on layer outputs computed by hand.
"""

import copy
import csv
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from lightning_repsim import Comparison, compare
from lightning_repsim.analysis import convergence_steps, write_convergence_report
from lightning_repsim.capture import capture
from lightning_repsim.errors import RepSimError, RepSimValueError
from lightning_repsim.functional import MEASURES, similarity_matrix
from lightning_repsim.report import TensorBoardReporter
from lightning_repsim.store import SnapshotStore, open_store
from tests import reference

N, N_IN = 48, 6
PROBE = torch.randn(N, N_IN, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def model_a():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(N_IN, 10), nn.Tanh(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def model_b():
    """Another architecture: two layers, other widths, other weights."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(N_IN, 5), nn.ReLU(), nn.Linear(5, 4)).double()


def outputs_by_hand(net, x):
    """The output of every nn.Linear of a Sequential, by running its modules one by one."""
    outputs = {}
    with torch.no_grad():
        for name, module in net.named_children():
            x = module(x)
            if isinstance(module, nn.Linear):
                outputs[name] = x
    return outputs


@pytest.mark.parametrize("measure", MEASURES)
def test_two_models_every_measure_equals_similarity_matrix_of_captured_features(measure):
    a, b = model_a(), model_b()
    result = compare(a, b, probe=PROBE, measures=(measure,))
    assert isinstance(result, Comparison)
    assert result.layers_a == ["0", "2", "4"] and result.layers_b == ["0", "2"]
    assert (result.n, result.steps, list(result.matrices)) == (N, None, [measure])
    expected = similarity_matrix(capture(a, PROBE), capture(b, PROBE), measure)
    assert result[measure].dtype == torch.float64 and result[measure].shape == (3, 2)
    assert torch.allclose(result[measure], expected, rtol=0, atol=1e-12)
    assert not result[measure].isnan().any()


def test_two_models_against_the_papers_formulas_on_outputs_by_hand():
    a, b = model_a(), model_b()
    result = compare(a, b, probe=PROBE, measures=("linear_cka", "rv2", "svcca", "pwcca"))
    xs, ys = outputs_by_hand(a, PROBE), outputs_by_hand(b, PROBE)
    formulas = {
        "linear_cka": reference.linear_cka,
        "rv2": reference.rv2,
        "svcca": reference.svcca,
        "pwcca": reference.pwcca,
    }
    for measure, formula in formulas.items():
        for i, la in enumerate(result.layers_a):
            for j, lb in enumerate(result.layers_b):
                assert float(result[measure][i, j]) == pytest.approx(formula(xs[la], ys[lb]), abs=1e-10), (
                    measure,
                    la,
                    lb,
                )


def test_layer_selectors_for_each_side():
    a, b = model_a(), model_b()
    result = compare(a, b, probe=PROBE, layers=[nn.Tanh, "4"], layers_b="2")
    assert result.layers_a == ["1", "4"] and result.layers_b == ["2"]
    full = compare(a, b, probe=PROBE, layers=nn.Module)  # every module, activations included
    assert result["linear_cka"][1, 0] == full["linear_cka"][full.layers_a.index("4"), full.layers_b.index("2")]


def test_model_with_itself_is_symmetric_with_unit_diagonal():
    a = model_a()
    result = compare(a, probe=PROBE, measures=("linear_cka", "pwcca"))
    cka = result["linear_cka"]
    assert result.layers_a == result.layers_b == ["0", "2", "4"]
    assert torch.equal(cka, cka.T)
    assert torch.allclose(cka.diagonal(), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert bool((cka.triu(1) < 1).all())  # different layers are not identical
    twin = compare(a, copy.deepcopy(a), probe=PROBE, measures=("linear_cka", "pwcca"))
    for measure in ("linear_cka", "pwcca"):  # one triangle computed, both filled in (pwcca is asymmetric)
        assert torch.allclose(result[measure], twin[measure], rtol=0, atol=1e-12)


def test_to_csv_reads_back_the_matrices_with_their_labels(tmp_path):
    result = compare(model_a(), model_b(), probe=PROBE, measures=("linear_cka", "rv2"))
    paths = result.to_csv(tmp_path / "out")
    assert paths == [tmp_path / "out" / "linear_cka.csv", tmp_path / "out" / "rv2.csv"]
    for path, (measure, matrix) in zip(paths, result.matrices.items()):
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
        assert rows[0][1:] == result.layers_b  # columns: model B's layers
        assert [r[0] for r in rows[1:]] == result.layers_a  # rows: model A's layers
        values = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]], dtype=torch.float64)
        assert torch.equal(values, matrix), measure  # written exactly (repr round trip)


def png_header(path):
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    assert data[12:16] == b"IHDR"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


def test_plot_returns_the_labelled_heatmap_and_saves_a_png(tmp_path):
    result = compare(model_a(), model_b(), probe=PROBE, measures=("linear_cka", "rv2"), names=("teacher", "student"))
    figure = result.plot("rv2", path=tmp_path / "rv2.png")
    assert isinstance(figure, Figure)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == result.layers_a
    assert [t.get_text() for t in ax.get_xticklabels()] == result.layers_b
    assert (ax.get_ylabel(), ax.get_xlabel()) == ("teacher", "student")
    assert ax.get_title() == f"rv2: teacher vs student (n = {N})"
    assert np.allclose(ax.images[0].get_array(), result["rv2"].numpy())
    width, height, depth, colour = png_header(tmp_path / "rv2.png")
    assert (width, height) == figure.canvas.get_width_height()  # the figure, at its own resolution
    assert depth == 8 and colour in (2, 6)  # 8-bit RGB or RGBA
    default = result.plot()  # the first measure
    assert default.axes[0].get_title().startswith("linear_cka:")
    assert not (tmp_path / "linear_cka.png").exists()  # nothing saved without a path


@pytest.mark.parametrize("model", ["runs/epoch=3.ckpt", Path("runs/epoch=3.ckpt")])
def test_checkpoint_path_says_to_load_the_model_first(model):
    with pytest.raises(RepSimValueError, match=r"compare\(\) needs model_a as an nn.Module, got (str|\w+Path)") as info:
        compare(model, model_b(), probe=PROBE)
    assert "MyModule.load_from_checkpoint('runs/epoch=3.ckpt')" in str(info.value)
    with pytest.raises(RepSimValueError, match="model_b as an nn.Module.*load_from_checkpoint"):
        compare(model_a(), model, probe=PROBE)


def test_other_bad_inputs():
    with pytest.raises(RepSimValueError, match="model_a as an nn.Module, got NoneType") as info:
        compare(None, model_b(), probe=PROBE)
    assert "load_from_checkpoint" not in str(info.value)  # only said of paths
    with pytest.raises(RepSimValueError, match="model_b as an nn.Module, got OrderedDict"):
        compare(model_a(), model_b().state_dict(), probe=PROBE)
    with pytest.raises(ValueError, match="compare\\(\\) needs a probe"):  # RepSimValueError is a ValueError
        compare(model_a(), model_b())
    with pytest.raises(RepSimValueError, match="unknown measure 'cka'"):
        compare(model_a(), probe=PROBE, measures=("cka",))
    with pytest.raises(RepSimValueError, match="rv2 takes center; got unexpected option"):
        compare(model_a(), probe=PROBE, measures=("rv2",), measure_options={"rv2": {"sigma": 1.0}})
    result = compare(model_a(), probe=PROBE)
    with pytest.raises(RepSimValueError, match=r"no 'rv2' in this comparison; it has \['linear_cka'\]"):
        result["rv2"]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_probe_of_fewer_than_four_examples_is_refused(n):
    # With 2 examples every centred Gram has rank 1, so every cell would be exactly 1 whatever the models.
    with pytest.raises(RepSimValueError, match=rf"compare\(\)'s probe has {n} example\(s\); .*at least 4") as info:
        compare(model_a(), model_b(), probe=PROBE[:n], measures=("linear_cka", "rv2"))
    assert "Pass probe= with more examples" in str(info.value)
    assert compare(model_a(), model_b(), probe=PROBE[:4], measures=("linear_cka",))["linear_cka"].shape[0] > 0


@pytest.mark.parametrize(
    "first",
    [
        "import lightning_repsim.analysis",
        "import tempfile, torch; from lightning_repsim.store import SnapshotStore\n"
        "from lightning_repsim.analysis import similarity_between\n"
        "with tempfile.TemporaryDirectory() as tmp:\n"
        "    s = SnapshotStore.create(tmp, probe_hash='p', n=4); s.add(0, {'x': torch.randn(4, 2)})\n"
        "    similarity_between(s, s)",  # loads the submodule lightning_repsim.analysis
        "",
    ],
)
def test_package_compare_is_the_function_whatever_was_imported_before(first):
    """`lightning_repsim.compare` is the function, whatever was imported first."""
    import subprocess
    import sys

    code = "\n".join(
        [
            first,
            "import lightning_repsim",
            "from lightning_repsim import Comparison, compare",
            "assert callable(compare) and compare is lightning_repsim.compare, compare",
            "assert Comparison.__name__ == 'Comparison'",
        ]
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- convergence_steps


def test_convergence_steps_monotone():
    values = [[0.1, 0.5, 0.96, 0.99, 1.0], [0.1, 0.2, 0.3, 0.94, 1.0]]
    assert convergence_steps(values, [0, 10, 20, 30, 40], 0.95) == [20, 40]
    assert convergence_steps(values, [0, 10, 20, 30, 40], 0.9) == [20, 30]
    assert convergence_steps(values, [0, 10, 20, 30, 40], 0.05) == [0, 0]
    assert convergence_steps(values, [0, 10, 20, 30, 40], 0.95, sustained=False) == [20, 40]


def test_convergence_steps_non_monotone_sustained_versus_first_reach():
    values = [[0.2, 0.97, 0.5, 0.98, 0.99, 1.0]]
    steps = [0, 1, 2, 3, 4, 5]
    assert convergence_steps(values, steps) == [3]
    assert convergence_steps(values, steps, sustained=False) == [1]


def test_convergence_steps_is_relative_to_the_final_value():
    # final 0.5 -> level 0.45; the value 0.46 at step 20 counts
    assert convergence_steps([[0.1, 0.3, 0.46, 0.5]], [0, 10, 20, 30], 0.9) == [20]
    # exactly at the level counts
    assert convergence_steps([[0.0, 0.45, 0.5]], [0, 1, 2], 0.9) == [1]


def test_convergence_steps_never_reaching_gives_none():
    values = np.array(
        [
            [0.2, 0.9, np.nan],  # final NaN
            [0.2, 0.9, 0.0],  # final 0: no relative level
            [0.2, 0.9, -0.05],  # final negative (debiased CKA)
            [0.99, np.nan, 1.0],  # NaN in the middle blocks the earlier step
        ]
    )
    assert convergence_steps(values, [0, 1, 2]) == [None, None, None, 2]
    assert convergence_steps(values, [0, 1, 2], sustained=False) == [None, None, None, 0]


def test_convergence_steps_accepts_tensors():
    t = torch.tensor([[0.1, 1.0], [1.0, 1.0]], dtype=torch.float32)
    assert convergence_steps(t, torch.tensor([5, 7])) == [7, 5]


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.01, float("nan"), "0.9"])
def test_convergence_steps_bad_threshold(threshold):
    with pytest.raises(RepSimValueError, match="threshold"):
        convergence_steps([[1.0]], [0], threshold)


def test_convergence_steps_shape_errors():
    with pytest.raises(RepSimValueError, match="2 dimension"):
        convergence_steps([1.0, 1.0], [0, 1])
    with pytest.raises(RepSimValueError, match="strictly increasing"):
        convergence_steps([[1.0, 1.0]], [1, 0])


def test_similarity_to_final_is_each_snapshot_against_the_last(tmp_path):
    from lightning_repsim.analysis import similarity_to_final
    from lightning_repsim.functional import linear_cka, pwcca

    g = torch.Generator().manual_seed(3)
    store = SnapshotStore.create(tmp_path / "s", probe_hash="h", n=30)
    snapshots = []
    for step in (0, 5, 9):
        tensors = {"conv": torch.randn(30, 6, generator=g), "wide": torch.randn(30, 30, generator=g)}
        store.add(step, tensors, {"conv": "features", "wide": "gram_factor"})
        snapshots.append(tensors)
    values = similarity_to_final(store, {"linear_cka": {}, "pwcca": {}})
    assert values["linear_cka"].shape == (2, 3)
    for t, snap in enumerate(snapshots):
        for i, name in enumerate(("conv", "wide")):
            expected = linear_cka(snap[name], snapshots[-1][name]).item()
            assert values["linear_cka"][i, t].item() == pytest.approx(expected, abs=1e-6)
        assert values["pwcca"][0, t].item() == pytest.approx(
            pwcca(snap["conv"], snapshots[-1]["conv"]).item(), abs=1e-6
        )
    assert torch.isnan(values["pwcca"][1]).all()  # a Gram factor has no neurons to weight
    assert values["linear_cka"][:, -1].tolist() == pytest.approx([1.0, 1.0])


# ---------------------------------------------------------------- similarity_between

BETWEEN_N = 24
RAW_WIDTHS = {"conv": 5, "block.0": 7, "wide": 40, "fc": 3}  # "wide": p > n, stored as a Gram factor
STEPS_A, STEPS_B = (0, 3, 9), (2, 9)


def raw_features(seed):
    """The features a model would give at one step: float32, so that storing them is exact.
    "wide" has rank 4, so that SVCCA, which needs fewer directions than examples, is defined."""
    g = torch.Generator().manual_seed(seed)
    features = {name: torch.randn(BETWEEN_N, p, generator=g) for name, p in RAW_WIDTHS.items()}
    features["wide"] = torch.randn(BETWEEN_N, 4, generator=g) @ torch.randn(4, RAW_WIDTHS["wide"], generator=g)
    return features


def eigen_factor(x):
    """F = V sqrt(Λ) with F Fᵀ = X Xᵀ (n columns), from the eigendecomposition, not the QR the
    callback uses, so that the store's reader is checked against a factor it did not make."""
    values, vectors = torch.linalg.eigh(x.double() @ x.double().T)
    return (vectors * values.clamp_min(0).sqrt()).float()


@pytest.fixture
def two_stores(tmp_path):
    """Two stores on one probe: A at steps 0, 3, 9 and B at 2, 9, with the raw features of each step."""
    raw = {}
    for label, steps, seed in (("a", STEPS_A, 10), ("b", STEPS_B, 20)):
        store = SnapshotStore.create(tmp_path / label / "repsim", probe_hash="probe-1", n=BETWEEN_N)
        raw[label] = {}
        for step in steps:
            features = raw_features(seed + step)
            raw[label][step] = features
            store.add(step, {**features, "wide": eigen_factor(features["wide"])}, {"wide": "gram_factor"})
    return open_store(tmp_path / "a" / "repsim"), open_store(tmp_path / "b" / "repsim"), raw


def assert_matches_features(got, xs, ys, measure):
    """``got`` equals similarity_matrix on the raw features: to 1e-10 for layers stored as
    features, to 1e-6 for the Gram-factor layer (stored in float32: ~1e-8 off), and NaN for
    PWCCA wherever that layer takes part."""
    from lightning_repsim.functional import similarity_matrix

    expected = similarity_matrix(xs, ys, measure, warn=False)  # PWCCA of the rank-4 "wide" is degenerate
    assert got.dtype == torch.float64 and got.shape == expected.shape
    for i, a in enumerate(xs):
        for j, b in enumerate(ys):
            factor = "wide" in (a, b)
            if measure == "pwcca" and factor:
                assert torch.isnan(got[i, j]), (a, b)
            else:
                tolerance = 1e-6 if factor else 1e-10
                assert not torch.isnan(expected[i, j]), (a, b)
                assert float(got[i, j]) == pytest.approx(float(expected[i, j]), abs=tolerance), (a, b)


@pytest.mark.parametrize("measure", ["linear_cka", "debiased_cka", "rbf_cka", "rv", "rv2", "svcca", "pwcca"])
def test_similarity_between_equals_similarity_matrix_of_the_features(two_stores, measure):
    from lightning_repsim.analysis import similarity_between

    store_a, store_b, raw = two_stores
    result = similarity_between(store_a, store_b, measure)
    assert result.layers_a == result.layers_b == list(RAW_WIDTHS)
    assert result.steps == (9, 9)  # the last of each
    assert (result.probe_hash, result.n) == ("probe-1", BETWEEN_N)
    assert list(result.matrices) == [measure]
    assert_matches_features(result[measure], raw["a"][9], raw["b"][9], measure)


def test_similarity_between_against_the_papers_formulas(two_stores):
    """Cells against tests/reference.py (NumPy transcriptions of the papers), not our engine."""
    from lightning_repsim.analysis import similarity_between
    from tests import reference

    store_a, store_b, raw = two_stores
    result = similarity_between(store_a, store_b, ("linear_cka", "rv2", "svcca"), step_b=2)
    xs, ys = raw["a"][9], raw["b"][2]
    for i, a in enumerate(RAW_WIDTHS):
        for j, b in enumerate(RAW_WIDTHS):
            tolerance = 1e-6 if "wide" in (a, b) else 1e-10
            for measure, formula in (
                ("linear_cka", reference.linear_cka),
                ("rv2", reference.rv2),
                ("svcca", reference.svcca),
            ):
                assert float(result[measure][i, j]) == pytest.approx(formula(xs[a], ys[b]), abs=tolerance), (
                    measure,
                    a,
                    b,
                )


def test_similarity_between_chooses_steps(two_stores):
    from lightning_repsim.analysis import similarity_between

    store_a, store_b, raw = two_stores
    result = similarity_between(store_a, store_b, "rv2", step_a=0, step_b="last")
    assert result.steps == (0, 9)
    assert_matches_features(result["rv2"], raw["a"][0], raw["b"][9], "rv2")
    result = similarity_between(store_a, store_b, "rv2", step_a=3, step_b=2)
    assert result.steps == (3, 2)
    assert_matches_features(result["rv2"], raw["a"][3], raw["b"][2], "rv2")
    # two steps of one run, the store given by its path
    result = similarity_between(store_a.path, str(store_a.path), "linear_cka", step_a=0)
    assert result.steps == (0, 9)
    assert_matches_features(result["linear_cka"], raw["a"][0], raw["a"][9], "linear_cka")
    # a snapshot against itself (the store opened twice): the symmetric route, exactly symmetric
    same = similarity_between(store_a, open_store(store_a.path), ("linear_cka", "pwcca"), step_a=3, step_b=3)
    assert torch.equal(same["linear_cka"], same["linear_cka"].T)
    assert same["linear_cka"].diagonal().tolist() == [1.0] * len(RAW_WIDTHS)
    assert_matches_features(same["pwcca"], raw["a"][3], raw["a"][3], "pwcca")


def test_similarity_between_layer_subsets_and_options(two_stores):
    from lightning_repsim.analysis import similarity_between
    from lightning_repsim.functional import similarity_matrix

    store_a, store_b, raw = two_stores
    full = similarity_between(store_a, store_b, ("linear_cka", "rbf_cka"), measure_options={"rbf_cka": {"sigma": 0.5}})
    part = similarity_between(
        store_a,
        store_b,
        ("linear_cka", "rbf_cka"),
        layers_a=["fc", "conv"],
        layers_b="block.*",
        measure_options={"rbf_cka": {"sigma": 0.5}},
    )
    assert part.layers_a == ["conv", "fc"]  # store (capture) order, whatever the order asked
    assert part.layers_b == ["block.0"]
    rows, cols = [0, 3], [1]
    for measure in ("linear_cka", "rbf_cka"):
        assert torch.allclose(part[measure], full[measure][rows][:, cols], rtol=0, atol=1e-12)
    xs, ys = raw["a"][9], raw["b"][9]
    expected = similarity_matrix({k: xs[k] for k in ("conv", "fc")}, {"block.0": ys["block.0"]}, "rbf_cka", sigma=0.5)
    assert torch.allclose(part["rbf_cka"], expected, rtol=0, atol=1e-10)
    default_sigma = similarity_matrix({"conv": xs["conv"]}, {"block.0": ys["block.0"]}, "rbf_cka")
    assert abs(float(part["rbf_cka"][0, 0]) - float(default_sigma[0, 0])) > 1e-3  # the option was applied


def test_similarity_between_result_plots_and_writes_csv(two_stores, tmp_path):
    import csv

    from lightning_repsim.analysis import similarity_between

    store_a, store_b, _ = two_stores
    result = similarity_between(store_a, store_b, ("linear_cka", "pwcca"), step_a=3, names=("seed 0", "seed 1"))
    figure = result.plot("linear_cka", path=tmp_path / "cka.png")
    assert figure.axes[0].get_ylabel() == "seed 0 (step 3)" and figure.axes[0].get_xlabel() == "seed 1 (step 9)"
    assert (tmp_path / "cka.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    paths = result.to_csv(tmp_path / "csv")
    assert [p.name for p in paths] == ["linear_cka.csv", "pwcca.csv"]
    with open(paths[1], newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:] == list(RAW_WIDTHS) and [r[0] for r in rows[1:]] == list(RAW_WIDTHS)
    got = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]], dtype=torch.float64)
    assert torch.equal(got.isnan(), result["pwcca"].isnan())
    assert torch.equal(got.nan_to_num(), result["pwcca"].nan_to_num())


def test_similarity_between_errors(two_stores, tmp_path):
    from lightning_repsim.analysis import similarity_between

    store_a, store_b, _ = two_stores
    other = SnapshotStore.create(tmp_path / "other", probe_hash="probe-2", n=BETWEEN_N)
    other.add(0, raw_features(0))
    with pytest.raises(RepSimValueError, match="probe hashes differ") as info:
        similarity_between(store_a, other)
    assert "'probe-1'" in str(info.value) and "'probe-2'" in str(info.value)
    assert str(store_a.path) in str(info.value) and str(other.path) in str(info.value)
    with pytest.raises(RepSimValueError, match=r"step_b=5: .*no step 5; stored steps: \[2, 9\]"):
        similarity_between(store_a, store_b, step_b=5)
    with pytest.raises(RepSimValueError, match=r"step_a='first': step must be an int or 'last'"):
        similarity_between(store_a, store_b, step_a="first")
    with pytest.raises(RepSimValueError, match=r"layers_a: 'nope' matches no layer .*'conv', 'block.0'"):
        similarity_between(store_a, store_b, layers_a=["conv", "nope"])
    with pytest.raises(RepSimValueError, match="layers_b must be a layer name"):
        similarity_between(store_a, store_b, layers_b=[])
    with pytest.raises(RepSimValueError, match="unknown measure 'cka'"):
        similarity_between(store_a, store_b, "cka")
    with pytest.raises(RepSimValueError, match="measures is empty"):
        similarity_between(store_a, store_b, ())
    with pytest.raises(RepSimValueError, match=r"measure_options names \['rv2'\]"):
        similarity_between(store_a, store_b, "linear_cka", measure_options={"rv2": {"center": False}})
    with pytest.raises(RepSimValueError, match="rv2 takes center; got unexpected option"):
        similarity_between(store_a, store_b, "rv2", measure_options={"rv2": {"sigma": 1.0}})
    with pytest.raises(RepSimValueError, match="store_b must be a SnapshotStore or the path"):
        similarity_between(store_a, 42)
    with pytest.raises(RepSimError, match="not a snapshot store"):
        similarity_between(store_a, tmp_path / "nowhere")
    empty = SnapshotStore.create(tmp_path / "empty", probe_hash="probe-1", n=BETWEEN_N)
    with pytest.raises(RepSimValueError, match="step_b=None: .*holds no steps yet"):
        similarity_between(store_a, empty)


# --------------------------------------------------------------------------- the convergence report


def _staircase(n_layers=4, n_steps=6):
    """Layer l reaches 1 at step index l + 1 (bottom-up convergence)."""
    values = np.full((n_layers, n_steps), 0.3)
    for layer in range(n_layers):
        values[layer, layer + 1 :] = 1.0
    return values


def _accumulate(path):
    acc = EventAccumulator(str(path), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_convergence_report_to_tensorboard(tmp_path):
    names = ["conv1", "conv2", "conv3", "fc"]
    steps = [0, 10, 20, 40, 80, 160]
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        reports = write_convergence_report(
            {"linear_cka": _staircase()},
            names,
            steps,
            tmp_path / "out",
            threshold=0.9,
            sink=TensorBoardReporter(writer),
        )
    assert reports["linear_cka"].converged == [10, 20, 40, 80]
    acc = _accumulate(tmp_path / "tb")
    assert sorted(acc.Tags()["images"]) == ["repsim/linear_cka/final/convergence_map", "repsim/linear_cka/final/curves"]
    for tag in acc.Tags()["images"]:
        (event,) = acc.Images(tag)
        assert event.step == 160 and event.width > 300 and event.height > 200
    (text,) = acc.Tensors("repsim/linear_cka/final/convergence_summary/text_summary")
    markdown = text.tensor_proto.string_val[0].decode()
    assert "0.9 \u00d7 its final value" in markdown
    assert "| 0 | `conv1` | 10 | 0.3000 |" in markdown  # the first snapshot's similarity to the final one
    assert "| 3 | `fc` | 80 | 0.3000 |" in markdown


def test_convergence_report_logs_and_saves_the_same_png_bytes(tmp_path):
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        write_convergence_report(
            {"rv": _staircase()},
            [f"layer{i}.conv" for i in range(4)],
            [0, 10, 20, 40, 80, 160],
            tmp_path / "png",
            sink=TensorBoardReporter(writer),
        )
    acc = _accumulate(tmp_path / "tb")
    for kind in ("convergence_map", "curves"):
        (event,) = acc.Images(f"repsim/rv/final/{kind}")
        assert (tmp_path / "png" / f"rv__{kind}.png").read_bytes() == event.encoded_image_string


def test_convergence_report_files(tmp_path):
    values = np.array([[0.5, 0.96, 1.0], [0.2, 0.6, 1.0]])
    reports = write_convergence_report(
        {"rv2": values}, ["a", "b"], [0, 5, 9], tmp_path, threshold=0.95, freeze_steps=[5]
    )
    assert reports["rv2"].converged == [5, 9]
    assert sorted(p.name for p in reports["rv2"].files) == sorted(
        ["rv2__convergence_map.png", "rv2__curves.png", "rv2__final.csv", "rv2__convergence.txt"]
    )
    assert (tmp_path / "rv2__convergence.txt").read_text() == (
        "#  layer  converged at step  at step 0\n"
        "0  a                      5     0.5000\n"
        "1  b                      9     0.2000\n"
    )
    with Image.open(tmp_path / "rv2__curves.png") as image:
        assert image.size[0] > 300
