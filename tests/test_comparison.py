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
from torch import nn

from lightning_repsim import Comparison, compare
from lightning_repsim.capture import capture
from lightning_repsim.errors import RepSimValueError
from lightning_repsim.functional import MEASURES, similarity_matrix
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
    formulas = {"linear_cka": reference.linear_cka, "rv2": reference.rv2, "svcca": reference.svcca,
                "pwcca": reference.pwcca}
    for measure, formula in formulas.items():
        for i, la in enumerate(result.layers_a):
            for j, lb in enumerate(result.layers_b):
                assert float(result[measure][i, j]) == pytest.approx(formula(xs[la], ys[lb]), abs=1e-10), \
                    (measure, la, lb)


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


@pytest.mark.parametrize("first", [
    "import lightning_repsim.comparison",
    "import tempfile, torch; from lightning_repsim.store import SnapshotStore, similarity_between\n"
    "with tempfile.TemporaryDirectory() as tmp:\n"
    "    s = SnapshotStore.create(tmp, probe_hash='p', n=4); s.add(0, {'x': torch.randn(4, 2)})\n"
    "    similarity_between(s, s)",  # loads the submodule lightning_repsim.comparison
    "",
])
def test_package_compare_is_the_function_whatever_was_imported_before(first):
    """`lightning_repsim.compare` is the function, whatever was imported first."""
    import subprocess
    import sys

    code = "\n".join([
        first,
        "import lightning_repsim",
        "from lightning_repsim import Comparison, compare",
        "assert callable(compare) and compare is lightning_repsim.compare, compare",
        "assert Comparison.__name__ == 'Comparison'",
    ])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
