"""Tests of lightning_repsim.report: figures, convergence summary, file writers, TensorBoard."""

import ast
import csv
import io
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from matplotlib.colors import to_rgb
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_repsim.analysis import convergence_steps
from lightning_repsim.errors import RepSimValueError, RepSimWarning
from lightning_repsim.report import (
    MEASURE_LABELS,
    MEASURE_RANGES,
    NAN_COLOR,
    TensorBoardReporter,
    convergence_map_figure,
    curves_figure,
    figure_to_array,
    heatmap_figure,
    make_tag,
    sanitize_tag,
    save_png,
    scalar_tags,
    summary_table,
    write_json,
    write_matrix_csv,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _names(n, prefix="layer"):
    return [f"{prefix}{i}.conv" for i in range(n)]


def _ticks(labels):
    return [t.get_text() for t in labels]


def _pixel(fig, img, ax, x, y):
    """RGB of the rendered pixel at data coordinates (x, y) of ``ax``."""
    px, py = ax.transData.transform((x, y))
    return img[int(round(img.shape[0] - py)), int(round(px))]


# --------------------------------------------------------------------------- heatmap


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (50, 50)])
def test_heatmap_tick_labels_orientation_and_colorbar(shape):
    n_rows, n_cols = shape
    rows, cols = _names(n_rows, "a"), _names(n_cols, "b")
    matrix = np.random.default_rng(0).uniform(0, 1, shape)
    fig = heatmap_figure(matrix, rows, cols, measure="linear_cka", row_title="A", col_title="B")
    ax, cbar_ax = fig.axes[0], fig.axes[1]
    assert _ticks(ax.get_yticklabels()) == rows
    assert _ticks(ax.get_xticklabels()) == cols
    assert list(ax.get_yticks()) == list(range(n_rows))
    # origin top-left: row 0 at the top (y axis inverted), column 0 on the left
    bottom, top = ax.get_ylim()
    assert bottom > top and top == pytest.approx(-0.5)
    assert ax.get_xlim()[0] == pytest.approx(-0.5)
    assert ax.get_ylabel() == "A" and ax.get_xlabel() == "B"
    assert "linear CKA" in cbar_ax.get_ylabel()
    np.testing.assert_array_equal(ax.images[0].get_array(), matrix)


def test_heatmap_small_matrices_are_annotated_large_ones_not():
    small = heatmap_figure([[0.25, 0.5]], ["a"], ["x", "y"], measure="rv")
    assert [t.get_text() for t in small.axes[0].texts] == ["0.25", "0.50"]
    big = heatmap_figure(np.zeros((20, 20)), _names(20), _names(20), measure="rv")
    assert len(big.axes[0].texts) == 0
    forced = heatmap_figure(np.zeros((20, 20)), _names(20), _names(20), measure="rv", annotate=True)
    assert len(forced.axes[0].texts) == 400


@pytest.mark.parametrize("measure", sorted(MEASURE_RANGES))
@pytest.mark.parametrize("data_range", [(0.4, 0.6), (-3.0, 5.0)])
def test_heatmap_colour_range_is_fixed_per_measure(measure, data_range):
    data = np.linspace(*data_range, 6).reshape(2, 3)
    fig = heatmap_figure(data, ["a", "b"], ["x", "y", "z"], measure=measure)
    assert fig.axes[0].images[0].get_clim() == MEASURE_RANGES[measure]
    assert MEASURE_LABELS[measure] in fig.axes[1].get_ylabel()


def test_measure_ranges_documented_values():
    for measure in ("linear_cka", "rbf_cka", "rv", "svcca", "pwcca"):
        assert MEASURE_RANGES[measure] == (0.0, 1.0)
    assert MEASURE_RANGES["debiased_cka"] == MEASURE_RANGES["rv2"] == (-0.1, 1.0)
    with pytest.raises(TypeError):
        MEASURE_RANGES["linear_cka"] = (0, 2)  # read-only


def test_heatmap_clips_in_colour_and_draws_nan_grey():
    matrix = np.array([[np.nan, 1.0], [5.0, -7.0]])
    fig = heatmap_figure(matrix, ["r0", "r1"], ["c0", "c1"], measure="linear_cka", annotate=False)
    ax = fig.axes[0]
    img = figure_to_array(fig)
    viridis = colormaps["viridis"]
    top = np.round(np.array(viridis(1.0)[:3]) * 255)
    low = np.round(np.array(viridis(0.0)[:3]) * 255)
    np.testing.assert_allclose(_pixel(fig, img, ax, 0, 0), np.round(np.array(to_rgb(NAN_COLOR)) * 255), atol=2)
    np.testing.assert_allclose(_pixel(fig, img, ax, 1, 0), top, atol=2)  # 1.0
    np.testing.assert_allclose(_pixel(fig, img, ax, 0, 1), top, atol=2)  # 5.0 clipped to 1
    np.testing.assert_allclose(_pixel(fig, img, ax, 1, 1), low, atol=2)  # -7 clipped to 0
    assert "grey = NaN (1 cell)" in fig.axes[1].get_ylabel()


def test_heatmap_without_nan_has_no_nan_note_and_counts_several():
    clean = heatmap_figure(np.ones((2, 2)), ["a", "b"], ["a", "b"], measure="svcca")
    assert "NaN" not in clean.axes[1].get_ylabel()
    m = np.ones((3, 3))
    m[0, :] = np.nan
    m[1, 1] = np.inf
    fig = heatmap_figure(m, list("abc"), list("abc"), measure="svcca")
    assert "grey = NaN/Inf (4 cells)" in fig.axes[1].get_ylabel()


def test_heatmap_accepts_tensors_and_value_range_override():
    t = torch.tensor([[0.1, 2.0]], dtype=torch.bfloat16)
    fig = heatmap_figure(t, ["a"], ["x", "y"], measure="my_distance", value_range=(0, 2))
    assert fig.axes[0].images[0].get_clim() == (0.0, 2.0)
    assert "my_distance" in fig.axes[1].get_ylabel()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(matrix=np.ones(3)), "must have 2 dimension"),
        (dict(matrix=np.ones((0, 2))), "empty"),
        (dict(row_labels=["a"]), "`row_labels` has 1 entries but the matrix has 2 rows"),
        (dict(col_labels=["a", "b", "c", "d"]), "`col_labels` has 4 entries"),
        (dict(measure="cka"), "Unknown measure 'cka'"),
        (dict(value_range=(1, 0)), "low < high"),
    ],
)
def test_heatmap_errors(kwargs, match):
    args = dict(matrix=np.ones((2, 3)), row_labels=["a", "b"], col_labels=["x", "y", "z"], measure="linear_cka")
    args.update(kwargs)
    with pytest.raises(RepSimValueError, match=match):
        heatmap_figure(args.pop("matrix"), args.pop("row_labels"), args.pop("col_labels"), **args)


@pytest.mark.parametrize("n", [50, 150])
def test_heatmap_labels_do_not_overlap_and_are_not_cut_off(n):
    names = [f"model.layers.{i}.mlp.fc{i % 2 + 1}" for i in range(n)]
    fig = heatmap_figure(np.eye(n), names, names, measure="linear_cka", title="t", row_title="rows", col_title="cols")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    width, height = fig.canvas.get_width_height()
    ylabels = [t for t in ax.get_yticklabels() if t.get_text()]
    xlabels = [t for t in ax.get_xticklabels() if t.get_text()]
    assert len(ylabels) == n if n <= 100 else 1 < len(ylabels) < n
    for labels, lo_attr, hi_attr in ((ylabels, "y0", "y1"), (xlabels, "x0", "x1")):
        boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: getattr(b, lo_attr))
        assert all(b.x0 >= -1 and b.y0 >= -1 and b.x1 <= width + 1 and b.y1 <= height + 1 for b in boxes)
        for a, b in zip(boxes, boxes[1:]):
            assert getattr(a, hi_attr) <= getattr(b, lo_attr) + 0.5
        assert labels[0].get_fontsize() >= 5


def test_long_labels_keep_their_distinctive_end():
    names = [f"model.encoder.layers.{i}.self_attention.out_proj" for i in range(3)]
    fig = heatmap_figure(np.eye(3), names, names, measure="rv")
    shown = _ticks(fig.axes[0].get_yticklabels())
    assert shown == [f"\u2026layers.{i}.self_attention.out_proj" for i in range(3)]
    # shortening that would make two labels identical is not done
    same_tail = ["encoder." + "x" * 40 + ".out", "decoder." + "x" * 40 + ".out"]
    fig = heatmap_figure(np.eye(2), same_tail, same_tail, measure="rv")
    assert _ticks(fig.axes[0].get_yticklabels()) == same_tail


# --------------------------------------------------------------------------- figure_to_array


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (50, 50)])
def test_figure_to_array_shape_and_dtype(shape):
    fig = heatmap_figure(np.zeros(shape), _names(shape[0]), _names(shape[1]), measure="rv", dpi=72)
    img = figure_to_array(fig)
    w_in, h_in = fig.get_size_inches()
    assert img.dtype == np.uint8
    assert img.shape == (round(h_in * 72), round(w_in * 72), 3)
    assert img.min() < 100 and img.max() == 255  # something dark drawn on white


def test_report_module_never_uses_pyplot_or_sets_the_backend():
    import lightning_repsim.report as report

    tree = ast.parse(Path(report.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {
        f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert not any("pyplot" in name for name in imported)
    calls = {
        node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    assert "use" not in calls and "switch_backend" not in calls


def test_rendering_works_headless_under_an_interactive_backend(tmp_path):
    # report.py alone (the package __init__ is bypassed: Lightning itself imports pyplot):
    # rendering must not import pyplot nor touch the configured backend, even one that could
    # not open a window.
    script = textwrap.dedent(
        f"""
        import sys, types
        import matplotlib
        import numpy as np
        package = types.ModuleType("lightning_repsim")
        package.__path__ = [{str(REPO_ROOT / "lightning_repsim")!r}]
        sys.modules["lightning_repsim"] = package
        from lightning_repsim.report import heatmap_figure, figure_to_array, save_png
        fig = heatmap_figure(np.eye(3), list("abc"), list("abc"), measure="rv")
        figure_to_array(fig)
        save_png(fig, {str(tmp_path / "x.png")!r})
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        assert matplotlib.rcParams._get_backend_or_none() == "TkAgg", "backend changed"
        print("ok")
        """
    )
    env = {**os.environ, "MPLBACKEND": "TkAgg"}
    env.pop("DISPLAY", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert (tmp_path / "x.png").stat().st_size > 0


def test_rendering_in_threads_gives_identical_images():
    matrix = np.random.default_rng(1).uniform(0, 1, (6, 6))

    def render():
        return figure_to_array(heatmap_figure(matrix, _names(6), _names(6), measure="rv"))

    reference = render()
    results, errors = [None] * 4, []

    def worker(i):
        try:
            results[i] = render()
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for img in results:
        np.testing.assert_array_equal(img, reference)


# --------------------------------------------------------------------------- convergence maps


def _staircase(n_layers=4, n_steps=6):
    """Layer l reaches 1 at step index l + 1 (bottom-up convergence)."""
    values = np.full((n_layers, n_steps), 0.3)
    for layer in range(n_layers):
        values[layer, layer + 1 :] = 1.0
    return values


def test_convergence_map_axes_colour_range_and_markers():
    steps = [0, 10, 20, 40, 80, 160]
    names = ["conv1", "conv2", "conv3", "fc"]
    converged = convergence_steps(_staircase(), steps, 0.9)  # the analysis computes, the figure draws
    fig = convergence_map_figure(_staircase(), names, steps, measure="rv2", converged=converged, threshold=0.9)
    ax = fig.axes[0]
    assert _ticks(ax.get_yticklabels()) == names
    xt = _ticks(ax.get_xticklabels())
    assert xt == [str(s) for s in steps]
    assert ax.images[0].get_clim() == MEASURE_RANGES["rv2"]
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # input layer at the top
    offsets = ax.collections[0].get_offsets()
    np.testing.assert_array_equal(offsets, [[1, 0], [2, 1], [3, 2], [4, 3]])
    assert "RV2 to final snapshot" in fig.axes[1].get_ylabel()
    plain = convergence_map_figure(_staircase(), names, steps, measure="rv2")
    assert len(plain.axes[0].collections) == 0


def test_convergence_map_thins_step_ticks_but_keeps_first_and_last():
    steps = list(range(0, 5000, 25))
    fig = convergence_map_figure(np.ones((3, len(steps))), ["a", "b", "c"], steps, measure="linear_cka")
    xt = _ticks(fig.axes[0].get_xticklabels())
    assert 2 <= len(xt) <= 20
    assert xt[0] == "0" and xt[-1] == str(steps[-1])


@pytest.mark.parametrize(
    "steps, match",
    [([0, 10, 10, 20, 30, 40], "strictly increasing"), ([0, 10], "`steps` has 2 entries")],
)
def test_convergence_map_step_errors(steps, match):
    with pytest.raises(RepSimValueError, match=match):
        convergence_map_figure(_staircase(), list("abcd"), steps, measure="rv")


def test_curves_one_line_per_layer_coloured_by_depth_with_threshold():
    steps = [0, 1, 2, 3, 4, 5]
    names = ["conv1", "conv2", "conv3", "fc"]
    fig = curves_figure(_staircase(), names, steps, measure="linear_cka", threshold=0.95)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == names + ["threshold 0.95"]
    expected = colormaps["viridis"](np.linspace(0, 0.9, 4))
    for line, colour, row in zip(lines, expected, _staircase()):
        np.testing.assert_allclose(to_rgb(line.get_color()), colour[:3])
        np.testing.assert_array_equal(line.get_ydata(), row)
        np.testing.assert_array_equal(line.get_xdata(), steps)
    np.testing.assert_array_equal(lines[-1].get_ydata(), [0.95, 0.95])
    assert ax.get_ylim()[0] < 0 < 1 < ax.get_ylim()[1] < 1.1
    assert ax.get_legend() is not None and ax.get_xscale() == "linear"
    assert "linear CKA" in ax.get_ylabel()


def test_curves_many_layers_use_depth_colourbar_and_log_steps():
    steps = [0, 10, 100, 1000, 10000]
    n = 30
    fig = curves_figure(np.ones((n, 5)), _names(n), steps, measure="rv")
    ax = fig.axes[0]
    assert ax.get_legend() is None
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "layer (depth)"
    assert _ticks(fig.axes[1].get_yticklabels())[0] == _names(n)[0]
    assert ax.get_xscale() == "symlog"
    assert curves_figure(np.ones((2, 3)), ["a", "b"], [1, 10, 100], measure="rv").axes[0].get_xscale() == "log"
    with pytest.raises(RepSimValueError, match="xscale"):
        curves_figure(np.ones((2, 3)), ["a", "b"], [1, 2, 3], measure="rv", xscale="sqrt")


# --------------------------------------------------------------------------- summary table


def test_summary_table_markdown():
    table = summary_table(["conv|1", "fc_out"], [120, None], final_values=[1.0, float("nan")])
    lines = table.splitlines()
    assert lines[0] == "| # | layer | converged at step | final value |"
    assert lines[1] == "|--:|:--|--:|--:|"
    assert lines[2] == "| 0 | `conv\\|1` | 120 | 1.0000 |"
    assert lines[3] == "| 1 | `fc_out` | not reached | nan |"
    assert len(lines) == 4


def test_summary_table_text_is_aligned():
    table = summary_table(["conv1", "a_much_longer_name"], [5, 12345], fmt="text")
    lines = table.splitlines()
    assert lines[0].split() == ["#", "layer", "converged", "at", "step"]
    assert lines[1].split() == ["0", "conv1", "5"]
    # right-aligned step column: all lines end at the same column
    assert len({len(line) for line in lines}) == 1
    assert "|" not in table and "`" not in table


def test_summary_table_errors():
    with pytest.raises(RepSimValueError, match="`conv_steps` has 1 entries for 2 layers"):
        summary_table(["a", "b"], [1])
    with pytest.raises(RepSimValueError, match="`final_values` has 1 entries"):
        summary_table(["a", "b"], [1, 2], final_values=[1.0])
    with pytest.raises(RepSimValueError, match="fmt"):
        summary_table(["a"], [1], fmt="html")


# --------------------------------------------------------------------------- file writers


def _no_temp_files(directory):
    return [p.name for p in Path(directory).iterdir() if p.name.endswith(".tmp")] == []


def test_write_matrix_csv_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((3, 4))
    matrix[0, 0], matrix[0, 1], matrix[0, 2], matrix[0, 3] = 1 / 3, np.nan, np.inf, 1e-300
    rows = ["conv1", "block, 2", 'quote"d']
    cols = ["a", "b", "c", "d"]
    path = write_matrix_csv(tmp_path / "sub" / "m.csv", matrix, rows, cols, corner="layer")
    with open(path, newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    assert table[0] == ["layer", *cols]
    assert [r[0] for r in table[1:]] == rows
    back = np.array([[float(x) for x in r[1:]] for r in table[1:]])
    np.testing.assert_array_equal(back, matrix)  # NaN == NaN for assert_array_equal
    assert back.tobytes() == matrix.tobytes()  # bit for bit
    assert _no_temp_files(path.parent)


def test_write_matrix_csv_float32_tensor_values_are_exact(tmp_path):
    t = torch.tensor([[0.1, 0.7]], dtype=torch.float32)
    path = write_matrix_csv(tmp_path / "t.csv", t, ["r"], ["x", "y"])
    row = list(csv.reader(path.open(newline="")))[1]
    assert [np.float32(float(v)) for v in row[1:]] == t[0].tolist()
    assert float(row[1]) == float(np.float32(0.1))


def test_write_matrix_csv_errors(tmp_path):
    with pytest.raises(RepSimValueError, match="`row_labels` has 1 entries"):
        write_matrix_csv(tmp_path / "m.csv", np.ones((2, 2)), ["a"], ["x", "y"])
    assert not (tmp_path / "m.csv").exists()


def test_write_json_strict_round_trip(tmp_path):
    payload = {
        "measure": "linear_cka",
        "layers": ("conv1", "fc"),
        "matrix": np.array([[1.0, np.nan], [np.inf, 0.5]]),
        "steps": torch.tensor([0, 10]),
        "values": torch.tensor([0.25, 0.5]),
        "count": np.int64(3),
        "run": tmp_path,
        "zz_first_key_stays_first": {"b": 1, "a": 2},
    }
    path = write_json(tmp_path / "out" / "r.json", payload)

    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    data = json.loads(path.read_text(), parse_constant=reject)
    assert data["layers"] == ["conv1", "fc"]
    assert data["matrix"] == [[1.0, None], [None, 0.5]]
    assert data["steps"] == [0, 10] and data["values"] == [0.25, 0.5]
    assert data["count"] == 3 and data["run"] == str(tmp_path)
    assert list(data) == list(payload)
    assert list(data["zz_first_key_stays_first"]) == ["b", "a"]
    assert _no_temp_files(path.parent)


@pytest.mark.parametrize(
    "payload, match",
    [({1: "x"}, "keys must be strings"), ({"a": {1, 2}}, r"payload\['a'\] of type set")],
)
def test_write_json_failure_leaves_existing_file(tmp_path, payload, match):
    path = tmp_path / "r.json"
    write_json(path, {"ok": True})
    with pytest.raises(RepSimValueError, match=match):
        write_json(path, payload)
    assert json.loads(path.read_text()) == {"ok": True}
    assert _no_temp_files(tmp_path)


def test_atomic_write_cleans_up_when_the_writer_fails(tmp_path, monkeypatch):
    path = tmp_path / "m.csv"
    write_matrix_csv(path, [[1.0]], ["a"], ["a"])
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_matrix_csv(path, [[2.0]], ["a"], ["a"])
    assert path.read_bytes() == before
    assert _no_temp_files(tmp_path)


def test_written_files_follow_the_umask(tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    path = write_json(tmp_path / "r.json", {})
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_save_png_is_a_png_of_the_figure_size(tmp_path):
    fig = heatmap_figure(np.eye(3), list("abc"), list("abc"), measure="rv")
    path = save_png(fig, tmp_path / "figs" / "h.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.size == figure_to_array(fig).shape[1::-1]
    with Image.open(save_png(fig, tmp_path / "h2.png", dpi=200)) as image:
        assert image.size[0] == round(fig.get_size_inches()[0] * 200)
    assert _no_temp_files(path.parent)


# --------------------------------------------------------------------------- tags


def test_sanitize_and_make_tag():
    assert sanitize_tag("features.0") == "features.0"
    assert sanitize_tag("encoder.layers.3-mlp_fc") == "encoder.layers.3-mlp_fc"
    assert sanitize_tag("a/b c") == "a_b_c"
    assert sanitize_tag("") == "_"
    assert make_tag("repsim/linear_cka", "init", "a/b") == "repsim/linear_cka/init/a/b"
    with pytest.raises(RepSimValueError, match="empty component"):
        make_tag("repsim//x")
    with pytest.raises(RepSimValueError, match="empty component"):
        make_tag("/repsim")


def test_scalar_tags_are_stable_and_collisions_warn():
    tags = scalar_tags("repsim/rv2/seed1", ["features.0", "head/fc"])
    assert tags == {"features.0": "repsim/rv2/seed1/features.0", "head/fc": "repsim/rv2/seed1/head_fc"}
    with pytest.warns(RepSimWarning, match="collide"):
        tags = scalar_tags("p", ["a b", "a_b", "a/b"])
    assert list(tags.values()) == ["p/a_b", "p/a_b_2", "p/a_b_3"]


# --------------------------------------------------------------------------- TensorBoard


def _accumulate(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_heatmap_scalars_and_text(tmp_path):
    names = ["conv1", "conv2", "fc"]
    with SummaryWriter(str(tmp_path)) as writer:
        tb = TensorBoardReporter(writer)
        images = [
            tb.log_heatmap("repsim/linear_cka/init/heatmap", np.eye(3) * s, names, names, measure="linear_cka", step=s)
            for s in (1, 2)
        ]
        tags = tb.log_layer_scalars("repsim/linear_cka/init", {"conv1": 0.25, "conv2": float("nan"), "fc": 1.0}, step=2)
        tb.log_layer_scalars("repsim/linear_cka/init", {"conv1": 0.5}, step=3)
        tb.log_text("repsim/notes", "| a | b |\n|--|--|\n| 1 | 2 |", step=4)
        tb.flush()
    acc = _accumulate(tmp_path)
    assert acc.Tags()["images"] == ["repsim/linear_cka/init/heatmap"]
    events = acc.Images("repsim/linear_cka/init/heatmap")
    assert [e.step for e in events] == [1, 2]
    for event, image in zip(events, images):
        assert (event.height, event.width) == image.shape[:2]
        decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        np.testing.assert_array_equal(decoded, image)  # PNG is lossless
    assert tags == [f"repsim/linear_cka/init/{n}" for n in names]
    assert sorted(acc.Tags()["scalars"]) == sorted(tags)
    conv1 = acc.Scalars("repsim/linear_cka/init/conv1")
    assert [(e.step, e.value) for e in conv1] == [(2, 0.25), (3, 0.5)]
    nan_events = acc.Scalars("repsim/linear_cka/init/conv2")
    assert len(nan_events) == 1 and math.isnan(nan_events[0].value)
    assert acc.Scalars("repsim/linear_cka/init/fc")[0].value == 1.0
    text = acc.Tensors("repsim/notes/text_summary")
    assert text[0].step == 4
    assert text[0].tensor_proto.string_val[0].decode() == "| a | b |\n|--|--|\n| 1 | 2 |"


def test_reporter_unwraps_a_logger_and_rejects_others(tmp_path):
    class Logger:  # what TensorBoardLogger looks like to the reporter
        def __init__(self):
            self.experiment = SummaryWriter(str(tmp_path))

    logger = Logger()
    tb = TensorBoardReporter(logger)
    assert tb.writer is logger.experiment
    logger.experiment.close()
    with pytest.raises(RepSimValueError, match="not a TensorBoard SummaryWriter"):
        TensorBoardReporter(object())


def test_heatmap_frames_paint_the_same_cell_colours_as_a_full_render():
    from lightning_repsim.report import HeatmapFrames

    rows, cols = ["conv1", "conv2", "fc"], ["a", "b", "c", "d"]
    values = np.array([[1.0, 0.2, np.nan, 0.5], [0.9, -0.3, 0.4, 0.0], [0.1, 0.7, 1.4, 0.25]])
    frames = HeatmapFrames(rows, cols, measure="linear_cka", title="t", col_title="ref", annotate=False)
    fast = frames.render(values)
    full_fig = heatmap_figure(values, rows, cols, measure="linear_cka", title="t", col_title="ref", annotate=False)
    full = figure_to_array(full_fig)
    assert fast.shape == full.shape and fast.dtype == np.uint8
    height = full.shape[0]
    to_pixels = full_fig.axes[0].transData.transform
    for i in range(3):
        for j in range(4):
            x, y = to_pixels((j, i))
            row, col = int(round(height - y)), int(round(x))
            np.testing.assert_array_equal(fast[row, col], full[row, col], err_msg=f"cell {(i, j)}")
    # a later frame with other values changes those cells and nothing outside the axes
    other = frames.render(np.zeros_like(values))
    assert (other != fast).any()
    x0, _ = to_pixels((-0.5, 0))
    np.testing.assert_array_equal(other[:, : int(x0) - 2], fast[:, : int(x0) - 2])


def test_heatmap_frames_reject_a_matrix_of_another_shape():
    from lightning_repsim.report import HeatmapFrames

    frames = HeatmapFrames(["a", "b"], ["a"], measure="rv2")
    with pytest.raises(RepSimValueError, match=r"made for \(2, 1\) matrices; got \(1, 2\)"):
        frames.render(np.ones((1, 2)))


def test_save_image_png_round_trips(tmp_path):
    from matplotlib.image import imread

    from lightning_repsim.report import save_image_png

    image = (np.arange(4 * 5 * 3) % 256).astype(np.uint8).reshape(4, 5, 3)
    path = save_image_png(image, tmp_path / "deep" / "x.png")
    np.testing.assert_array_equal((imread(path)[..., :3] * 255).round().astype(np.uint8), image)


def _decode(png):
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image)


@pytest.mark.parametrize("shape", [(4, 5, 3), (3, 2), (2, 3, 4), (1, 1, 1), (2, 2, 2)])
def test_encode_png_is_lossless_and_readable_by_pil_and_matplotlib(shape, tmp_path):
    from matplotlib.image import imread

    from lightning_repsim.report import encode_png, write_png_bytes

    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    png = encode_png(image)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = _decode(png)
    np.testing.assert_array_equal(decoded.reshape(image.shape), image)
    path = write_png_bytes(png, tmp_path / "sub" / "x.png")
    assert path.read_bytes() == png and _no_temp_files(path.parent)
    if image.ndim == 2 or image.shape[2] != 2:  # Matplotlib reads grey+alpha as RGBA
        read = (imread(path) * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(read.reshape(image.shape), image)


def test_encode_png_of_a_figure_is_small_and_every_level_decodes_the_same():
    from lightning_repsim.report import encode_png

    image = figure_to_array(heatmap_figure(np.eye(8), _names(8), _names(8), measure="rv"))
    sizes = {}
    for level in (0, 1, 3, 6, 9):
        png = encode_png(image, compress_level=level)
        np.testing.assert_array_equal(_decode(png), image)
        sizes[level] = len(png)
    assert sizes[0] > 5 * sizes[3]  # flat colours deflate well
    reference = io.BytesIO()
    Image.fromarray(image).save(reference, format="PNG")  # Pillow's default encoder
    assert sizes[3] < 1.25 * len(reference.getvalue())
    noncontiguous = image[:, ::2]
    np.testing.assert_array_equal(_decode(encode_png(noncontiguous)), noncontiguous)


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((2, 2, 3)), "uint8"),
        (np.zeros((2, 2, 5), dtype=np.uint8), r"\(H, W, 1\|2\|3\|4\)"),
        (np.zeros((0, 2, 3), dtype=np.uint8), "non-empty"),
        (np.zeros(4, dtype=np.uint8), "shape"),
    ],
)
def test_encode_png_rejects_what_is_not_an_image(image, match):
    from lightning_repsim.report import encode_png

    with pytest.raises(RepSimValueError, match=match):
        encode_png(image)


def test_encode_png_rejects_a_bad_level_and_write_png_bytes_rejects_non_png(tmp_path):
    from lightning_repsim.report import encode_png, write_png_bytes

    with pytest.raises(RepSimValueError, match="compress_level"):
        encode_png(np.zeros((1, 1, 3), dtype=np.uint8), compress_level=10)
    with pytest.raises(RepSimValueError, match="Not PNG data"):
        write_png_bytes(b"GIF89a" + bytes(40), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_log_png_writes_the_given_bytes_as_an_image_event(tmp_path):
    from lightning_repsim.report import HeatmapFrames, encode_png

    frames = HeatmapFrames(["conv1", "fc"], ["conv1", "fc"], measure="linear_cka")
    images = [frames.render(np.eye(2) * s) for s in (0.2, 0.9)]
    pngs = [encode_png(image) for image in images]
    rgba = np.full((3, 4, 4), 200, dtype=np.uint8)
    with SummaryWriter(str(tmp_path)) as writer:
        tb = TensorBoardReporter(writer)
        for step, png in zip((5, 10), pngs):
            assert tb.log_png("repsim/linear_cka/init/heatmap", png, step) is None
        tb.log_png("repsim/a b/rgba", encode_png(rgba), 1)
    acc = _accumulate(tmp_path)
    assert sorted(acc.Tags()["images"]) == ["repsim/a_b/rgba", "repsim/linear_cka/init/heatmap"]
    events = acc.Images("repsim/linear_cka/init/heatmap")
    assert [e.step for e in events] == [5, 10]
    for event, png, image in zip(events, pngs, images):
        assert event.encoded_image_string == png  # stored as given: encoded once
        assert (event.height, event.width) == image.shape[:2]
        np.testing.assert_array_equal(_decode(event.encoded_image_string), image)
    (event,) = acc.Images("repsim/a_b/rgba")
    assert (event.height, event.width) == (3, 4)
    np.testing.assert_array_equal(_decode(event.encoded_image_string), rgba)


def test_log_png_matches_add_image_and_falls_back_to_it_for_other_writers(tmp_path):
    from lightning_repsim.report import encode_png

    image = figure_to_array(heatmap_figure(np.eye(3), list("abc"), list("abc"), measure="rv"))

    class DuckWriter:  # e.g. tensorboardX: has add_image but takes its own protobufs
        def __init__(self):
            self.calls = []

        def add_image(self, tag, img, global_step=None, dataformats="CHW"):
            self.calls.append((tag, img, global_step, dataformats))

        add_scalar = add_text = add_image

    duck = DuckWriter()
    TensorBoardReporter(duck).log_png("repsim/rv/x", encode_png(image), 7)
    ((tag, logged, step, formats),) = duck.calls
    assert (tag, step, formats) == ("repsim/rv/x", 7, "HWC")
    np.testing.assert_array_equal(logged, image)
    with SummaryWriter(str(tmp_path)) as writer:
        writer.add_image("via_add_image", image, global_step=1, dataformats="HWC")
        TensorBoardReporter(writer).log_png("via_log_png", encode_png(image), 1)
    acc = _accumulate(tmp_path)
    (a,) = acc.Images("via_add_image")
    (b,) = acc.Images("via_log_png")
    assert (a.height, a.width, a.step) == (b.height, b.width, b.step)
    np.testing.assert_array_equal(_decode(a.encoded_image_string), _decode(b.encoded_image_string))
    with pytest.raises(RepSimValueError, match="Not PNG data"):
        TensorBoardReporter(duck).log_png("x", b"not a png", 1)


def test_save_png_at_the_figure_dpi_is_the_rendered_figure(tmp_path):
    def make():
        return curves_figure(_staircase(), _names(4), [0, 10, 20, 40, 80, 160], measure="rv")

    path = save_png(make(), tmp_path / "c.png")
    with Image.open(path) as image:  # first draws of the same figure are identical
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), figure_to_array(make()))


def test_save_png_keeps_a_see_through_background(tmp_path):
    import matplotlib

    fig = heatmap_figure(np.eye(2), list("ab"), list("ab"), measure="rv")
    fig.patch.set_alpha(0.0)
    with Image.open(save_png(fig, tmp_path / "t.png")) as image:  # through savefig: RGBA
        assert image.mode == "RGBA" and image.getpixel((0, 0))[3] == 0
    fig = heatmap_figure(np.eye(2), list("ab"), list("ab"), measure="rv")
    with matplotlib.rc_context({"savefig.facecolor": "red"}):
        with Image.open(save_png(fig, tmp_path / "r.png")) as image:
            assert image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_atomic_writes_do_not_fsync(tmp_path, monkeypatch):
    # Derived files only need the atomic rename; fsync cost milliseconds per file per step.
    def no_fsync(fd):
        raise AssertionError("fsync called")

    monkeypatch.setattr(os, "fsync", no_fsync)
    write_matrix_csv(tmp_path / "m.csv", [[1.0]], ["a"], ["a"])
    write_json(tmp_path / "r.json", {"a": 1})
    save_png(heatmap_figure(np.eye(2), list("ab"), list("ab"), measure="rv"), tmp_path / "h.png")
    assert _no_temp_files(tmp_path)


# --------------------------------------------------------------------------- layout


def _layout_cases():
    rng = np.random.default_rng(0)
    long = [f"model.encoder.layers.{i}.self_attention.out_proj" for i in range(20)]
    steps40 = [0] + [int(1.3**k) for k in range(5, 44)]
    map_values = rng.uniform(0, 1, (20, 40))
    return {
        "heatmap 1x1": lambda: heatmap_figure(np.ones((1, 1)), ["a"], ["b"], measure="rv"),
        "heatmap titles, rv2": lambda: heatmap_figure(
            rng.uniform(-0.3, 1, (3, 5)),
            ["conv1", "conv2", "fc"],
            list("abcde"),
            measure="rv2",
            title="A quite long title for a small heatmap here",
            row_title="run A",
            col_title="run B",
        ),
        "heatmap long labels, NaN": lambda: heatmap_figure(
            np.where(np.eye(20) > 0, np.nan, 0.5), long, long, measure="debiased_cka", title="t"
        ),
        "map 20x40 titled": lambda: convergence_map_figure(
            map_values,
            long,
            steps40,
            measure="rv2",
            threshold=0.9,
            title="title",
            converged=convergence_steps(map_values, steps40, 0.9),
        ),
        "map 3x2": lambda: convergence_map_figure(rng.uniform(0, 1, (3, 2)), list("abc"), [0, 10], measure="rv"),
        "curves 20 layers, log": lambda: curves_figure(
            rng.uniform(0, 1, (20, 40)), long, steps40, measure="linear_cka", threshold=0.95, title="curves"
        ),
        "curves legend": lambda: curves_figure(
            rng.uniform(0, 1, (3, 5)),
            ["conv1", "a_really_long_layer_name.with.dots.x", "fc"],
            [0, 1, 2, 3, 100000],
            measure="rv2",
            threshold=0.9,
        ),
    }


@pytest.mark.parametrize("case", list(_layout_cases()))
@pytest.mark.parametrize("dpi", [None, 200])
def test_layout_keeps_everything_inside_the_figure_and_apart(case, dpi, tmp_path):
    fig = _layout_cases()[case]()
    size = tuple(fig.get_size_inches())
    with Image.open(save_png(fig, tmp_path / "f.png", dpi=dpi)) as image:
        expected = [v * (dpi or fig.dpi) for v in size]  # the layout never resizes the figure
        assert all(abs(got - want) <= 1 for got, want in zip(image.size, expected))
    if dpi is not None:  # the layout runs at draw time, for the dpi drawn at: measure at that one
        fig.set_dpi(dpi)
        figure_to_array(fig)
    renderer = fig.canvas.get_renderer()
    width, height = fig.canvas.get_width_height()
    tight = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)
    assert tight.x0 >= 0 and tight.y0 >= 0 and tight.x1 <= width and tight.y1 <= height
    ax = fig.axes[0]
    assert ax.bbox.width > 0.5 * width and ax.bbox.height > 0.5 * height  # the data gets the room
    if len(fig.axes) > 1:  # the colour bar: right of the axes' decorations, as tall as the axes
        cax = fig.axes[1]
        assert ax.get_tightbbox(renderer, for_layout_only=True).x1 < cax.get_tightbbox(renderer).x0
        assert cax.get_position(original=True).y0 == pytest.approx(ax.get_position().y0)
        assert cax.get_position(original=True).y1 == pytest.approx(ax.get_position().y1)


def test_layout_adapts_to_changes_made_after_the_figure_is_built():
    fig = heatmap_figure(np.eye(3), list("abc"), list("abc"), measure="rv")
    figure_to_array(fig)
    top = fig.axes[0].get_position().y1
    fig.axes[0].set_title("a title added later\non two lines")
    figure_to_array(fig)
    assert fig.axes[0].get_position().y1 < top
    renderer = fig.canvas.get_renderer()
    assert fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans).y1 <= fig.bbox.height


def test_event_checksums_computed_in_c_are_tensorboards(tmp_path, monkeypatch):
    """The C checksum gives tensorboard's own values, is installed when the user opts in (never by the
    reporter), and the event file it frames reads back through tensorboard's reader, which verifies
    every record's CRC."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as python_crc
    from tensorboard.summary.writer import record_writer

    from lightning_repsim.report import tensorboard as report

    monkeypatch.setattr(record_writer, "masked_crc32c", python_crc)  # restored after the test
    rng = np.random.default_rng(0)
    for size in (0, 1, 7, 64, 40_000):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert report._masked_crc32c_c(data) == python_crc(data), size
    with SummaryWriter(str(tmp_path)) as writer:
        TensorBoardReporter(writer)
        assert record_writer.masked_crc32c is python_crc  # the reporter never changes it by itself
        assert report.accelerate_event_checksums() is True  # the user opts in
        TensorBoardReporter(writer).log_png("repsim/x/heatmap", report.encode_png(np.zeros((5, 7, 3), np.uint8)), 3)
    assert record_writer.masked_crc32c is report._masked_crc32c_c
    (events,) = tmp_path.glob("events.out.tfevents.*")
    reader = PyRecordReader_New(str(events))
    records = 0
    while True:
        try:
            reader.GetNext()  # raises DataLossError on a bad checksum
        except Exception as err:
            assert type(err).__name__ == "OutOfRangeError", err
            break
        records += 1
    assert records >= 2  # the file version record and the image


def test_event_checksums_stay_in_python_without_the_c_extension(monkeypatch):
    import google_crc32c
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as python_crc
    from tensorboard.summary.writer import record_writer

    from lightning_repsim.report import tensorboard as report

    monkeypatch.setattr(record_writer, "masked_crc32c", python_crc)
    monkeypatch.setattr(google_crc32c, "implementation", "python")
    assert report.accelerate_event_checksums() is False
    assert record_writer.masked_crc32c is python_crc


def test_heatmap_frames_print_cell_values_and_the_step_where_the_full_render_leaves_colour():
    from lightning_repsim.report import HeatmapFrames

    rows = cols = ["conv1", "conv2", "fc"]
    values = np.array([[1.0, 0.25, 0.5], [0.25, 1.0, 0.75], [0.5, 0.75, 1.0]])
    plain = HeatmapFrames(rows, cols, measure="linear_cka", annotate=False).render(values, step=7)
    printed = HeatmapFrames(rows, cols, measure="linear_cka").render(values, step=7)  # 3 layers: annotated
    assert plain.shape == printed.shape and (plain != printed).any()
    # other values print other digits, same colours aside; another step changes the title only
    frames = HeatmapFrames(rows, cols, measure="linear_cka")
    first, other_step = frames.render(values, step=7), frames.render(values, step=8)
    changed_rows = np.flatnonzero((first != other_step).any(axis=(1, 2)))
    assert changed_rows.size and changed_rows.max() < first.shape[0] * 0.15  # the title band at the top
    many = [f"l{i}" for i in range(13)]
    big = np.eye(13)
    assert np.array_equal(
        HeatmapFrames(many, many, measure="rv2").render(big),
        HeatmapFrames(many, many, measure="rv2", annotate=False).render(big),
    )  # above 12 layers no values are printed by default
