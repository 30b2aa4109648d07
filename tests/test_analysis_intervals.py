"""Intervals where people look: compare / similarity_between / export rows / the convergence report,
each checked cell by cell against similarity_interval on the features (the validated one-pair API)."""

import csv
import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from lightning_repsim.analysis import (
    INTERVAL_COLUMNS,
    ROW_COLUMNS,
    compare,
    convergence_interval,
    convergence_steps,
    final_intervals,
    similarity_between,
    similarity_rows,
    similarity_to_final,
    write_convergence_report,
)
from lightning_repsim.capture import capture
from lightning_repsim.errors import RepSimValueError
from lightning_repsim.functional import similarity_interval
from lightning_repsim.report import TIES_CAPTION, heatmap_figure, row_ties
from lightning_repsim.store import SnapshotStore, open_store
from tests.test_analysis import PROBE, model_a, model_b

INTERVAL_MEASURES = ["linear_cka", "debiased_cka", "rbf_cka", "rv", "rv2"]
OPTIONS = {"linear_cka": {}, "debiased_cka": {}, "rbf_cka": {"sigma": 0.8}, "rv": {}, "rv2": {"center": False}}


def expected_interval(x, y, measure):
    return similarity_interval(x, y, measure, 0.9, **OPTIONS[measure])


def assert_cells(result, xs, ys, measure, abs_tol=1e-9):
    low, high = result.low[measure], result.high[measure]
    assert low.shape == result[measure].shape == (len(xs), len(ys))
    for i, a in enumerate(xs):
        for j, b in enumerate(ys):
            want = expected_interval(xs[a], ys[b], measure)
            assert float(low[i, j]) == pytest.approx(want.low, abs=abs_tol), (measure, a, b)
            assert float(high[i, j]) == pytest.approx(want.high, abs=abs_tol), (measure, a, b)
            assert float(result[measure][i, j]) == pytest.approx(want.value, abs=abs_tol), (measure, a, b)


def test_compare_intervals_equal_similarity_interval_cell_by_cell():
    net_a, net_b = model_a(), model_b()
    result = compare(
        net_a, net_b, PROBE, measures=INTERVAL_MEASURES, measure_options=OPTIONS, interval=0.9, batch_size=None
    )
    assert result.level == 0.9
    xs, ys = capture(net_a, PROBE, None, batch_size=None), capture(net_b, PROBE, None, batch_size=None)
    for measure in INTERVAL_MEASURES:
        assert_cells(result, xs, ys, measure)


def test_compare_default_has_no_intervals_and_cca_intervals_are_nan():
    plain = compare(model_a(), probe=PROBE)
    assert plain.low == {} and plain.high == {} and plain.level is None
    both = compare(model_a(), probe=PROBE, measures=("svcca", "linear_cka"), interval=0.95)
    assert torch.isnan(both.low["svcca"]).all() and torch.isnan(both.high["svcca"]).all()
    assert torch.equal(both["linear_cka"], plain["linear_cka"])  # the values do not change
    finite = both.low["linear_cka"]
    assert torch.isfinite(finite).all() and (finite <= both.high["linear_cka"]).all()
    for bad in (0.0, 1.0, 95, True, "0.95"):
        with pytest.raises(RepSimValueError, match="interval"):
            compare(model_a(), probe=PROBE, interval=bad)


# ---------------------------------------------------------------- stores

N = 40
WIDTHS = {"conv": 5, "block.0": 7, "fc": 3}
STEPS = (0, 4, 8, 12)


def features_at(seed, shared):
    g = torch.Generator().manual_seed(seed)
    return {name: shared[name] + 0.6 * torch.randn(N, p, generator=g) for name, p in WIDTHS.items()}


@pytest.fixture
def stores(tmp_path):
    g = torch.Generator().manual_seed(0)
    shared = {name: torch.randn(N, p, generator=g) for name, p in WIDTHS.items()}
    raw = {}
    for label, seed in (("a", 1), ("b", 2)):
        store = SnapshotStore.create(tmp_path / label, probe_hash="h", n=N)
        raw[label] = {}
        for step in STEPS:
            raw[label][step] = features_at(seed * 100 + step, shared)
            store.add(step, raw[label][step])
    return open_store(tmp_path / "a"), open_store(tmp_path / "b"), raw


@pytest.mark.parametrize("measure", INTERVAL_MEASURES)
def test_similarity_between_intervals_equal_similarity_interval(stores, measure):
    a, b, raw = stores
    result = similarity_between(a, b, measure, step_a=4, measure_options={measure: OPTIONS[measure]}, interval=0.9)
    assert_cells(result, raw["a"][4], raw["b"][12], measure, abs_tol=1e-7)  # stored in float32, read as is


def test_similarity_between_one_snapshot_with_itself(stores):
    a, _, raw = stores
    result = similarity_between(a, a, "linear_cka", interval=0.9)
    assert_cells(result, raw["a"][12], raw["a"][12], "linear_cka", abs_tol=1e-7)
    assert torch.diagonal(result.low["linear_cka"]).tolist() == pytest.approx([1.0] * 3)


def test_plot_outlines_ties_when_intervals_are_known(stores, tmp_path):
    a, b, _ = stores
    result = similarity_between(a, b, "linear_cka", interval=0.95)
    figure = result.plot(path=tmp_path / "h.png")
    assert TIES_CAPTION in figure.axes[0].get_title()
    expected = row_ties(result["linear_cka"].numpy(), result.low["linear_cka"], result.high["linear_cka"])
    assert len(figure.axes[0].patches) == 2 * int(expected.sum())  # a white line on a black one
    files = result.to_csv(tmp_path / "csv")
    assert [f.name for f in files] == ["linear_cka.csv", "linear_cka__low.csv", "linear_cka__high.csv"]
    with open(files[1], newline="") as handle:
        rows = list(csv.reader(handle))
    assert float(rows[2][1]) == pytest.approx(float(result.low["linear_cka"][1, 0]), rel=1e-15)
    plain = similarity_between(a, b, "linear_cka").plot()
    assert TIES_CAPTION not in plain.axes[0].get_title() and not plain.axes[0].patches


def test_export_rows_carry_the_intervals(stores):
    a, _, raw = stores
    rows = similarity_rows(a, ["linear_cka", "svcca"], interval=0.9)
    plain = similarity_rows(a, ["linear_cka", "svcca"])
    assert len(rows) == len(plain) and all(len(r) == len(ROW_COLUMNS) + len(INTERVAL_COLUMNS) for r in rows)
    assert [r[:7] for r in rows] == plain
    checked = 0
    for row in rows:
        run, step, measure, reference, layer_a, layer_b, value, low, high = row
        if measure == "svcca":
            assert math.isnan(low) and math.isnan(high)
            continue
        other = {"final": 12, "init": 0, "previous": STEPS[STEPS.index(step) - 1] if step else None}[reference]
        if (step, reference, layer_a, layer_b) in {(8, "previous", "conv", "fc"), (12, "final", "fc", "fc")}:
            want = expected_interval(raw["a"][step][layer_a], raw["a"][other][layer_b], measure)
            assert (low, high) == pytest.approx((want.low, want.high), abs=1e-7), row
            checked += 1
    assert checked == 2


# ---------------------------------------------------------------- convergence


def test_convergence_interval_on_a_constructed_example():
    steps = [0, 10, 20, 30, 40]
    values = [[0.5, 0.9, 0.96, 0.97, 1.0], [0.2, 0.4, 0.7, 0.99, 1.0], [0.5, 0.6, 0.7, 0.8, 1.0]]
    low = [[0.4, 0.85, 0.90, 0.955, 1.0], [0.1, 0.3, 0.6, 0.96, 1.0], [np.nan] * 5]
    high = [[0.6, 0.96, 0.99, 0.99, 1.0], [0.3, 0.5, 0.8, 1.0, 1.0], [np.nan] * 5]
    assert convergence_steps(values, steps) == [20, 30, 40]
    # layer 0: high >= 0.95 from step 10, low >= 0.95 from step 30; layer 1: both from step 30
    assert convergence_interval(values, low, high, steps) == [(10, 30), (30, 30), None]
    # a point estimate outside its interval (a biased estimator) widens the range to hold it
    assert convergence_interval([[0.5, 0.96, 1.0]], [[0.4, 0.5, 1.0]], [[0.6, 0.6, 1.0]], [0, 1, 2]) == [(1, 2)]
    with pytest.raises(RepSimValueError, match="shape"):
        convergence_interval(values, low[:2], high, steps)


@pytest.fixture
def run_store(tmp_path):
    """Three layers drifting to their last snapshot at different speeds (bottom-up)."""
    g = torch.Generator().manual_seed(5)
    store = SnapshotStore.create(tmp_path / "run", probe_hash="h", n=200)
    final = {name: torch.randn(200, p, generator=g) for name, p in WIDTHS.items()}
    snapshots = []
    for k, step in enumerate(range(0, 60, 5)):
        remaining = 11 - k
        tensors = {
            name: x + (remaining * (i + 1) / 8) * torch.randn(200, WIDTHS[name], generator=g)
            for i, (name, x) in enumerate(final.items())
        }
        store.add(step, tensors)
        snapshots.append(tensors)
    return open_store(tmp_path / "run"), snapshots


def test_final_intervals_match_similarity_to_final_and_similarity_interval(run_store):
    store, snapshots = run_store
    got = final_intervals(store, {"linear_cka": {}, "svcca": {"keep": 0.99}}, 0.9)
    plain = similarity_to_final(store, {"linear_cka": {}, "svcca": {"keep": 0.99}})
    values, low, high = got["linear_cka"]
    assert torch.allclose(values, plain["linear_cka"], atol=1e-12)
    assert torch.isnan(got["svcca"][1]).all() and torch.allclose(got["svcca"][0], plain["svcca"], atol=1e-12)
    for t in (0, 5, 10):
        want = similarity_interval(snapshots[t]["block.0"], snapshots[-1]["block.0"], "linear_cka", 0.9)
        assert (float(low[1, t]), float(high[1, t])) == pytest.approx((want.low, want.high), abs=1e-7)


def test_convergence_report_with_intervals(run_store, tmp_path):
    store, _ = run_store
    measures = {"linear_cka": {}}
    values, low, high = final_intervals(store, measures, 0.95)["linear_cka"]
    reports = write_convergence_report(
        {"linear_cka": values.numpy()},
        store.layers,
        store.steps,
        tmp_path / "out",
        intervals={"linear_cka": (low.numpy(), high.numpy())},
        level=0.95,
    )
    report = reports["linear_cka"]
    assert report.between == convergence_interval(values, low, high, store.steps)
    points = report.converged
    for point, between in zip(points, report.between):
        assert between is not None and between[0] <= point <= between[1]
    assert "converged between" in report.table and "converged between" in report.markdown
    first_row = report.table.splitlines()[1]
    assert f"{report.between[0][0]}-{report.between[0][1]}" in first_row
    with open(tmp_path / "out" / "linear_cka__final_low.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert float(rows[1][1]) == pytest.approx(float(low[0, 0]), rel=1e-12)
    plain = write_convergence_report({"linear_cka": values.numpy()}, store.layers, store.steps, tmp_path / "plain")
    assert plain["linear_cka"].between is None and "between" not in plain["linear_cka"].table


# ---------------------------------------------------------------- ties


def test_row_ties_on_a_constructed_example():
    values = np.array([[0.90, 0.88, 0.50, np.nan], [0.2, 0.3, 0.1, 0.25], [np.nan] * 4])
    low = np.array([[0.85, 0.86, 0.40, np.nan], [0.1, 0.28, 0.0, 0.31], [np.nan] * 4])
    high = np.array([[0.95, 0.90, 0.84, np.nan], [0.27, 0.35, 0.2, 0.4], [np.nan] * 4])
    expected = np.array(
        [[True, True, False, False], [False, True, False, True], [False] * 4]  # 0.27 < 0.28: no overlap
    )
    assert (row_ties(values, low, high) == expected).all()
    with pytest.raises(RepSimValueError, match="shape"):
        row_ties(values, low[:2], high)


def test_heatmap_outlines_the_tied_cells():
    mask = np.array([[True, False], [True, True]])
    figure = heatmap_figure(np.eye(2), ["a", "b"], ["a", "b"], measure="linear_cka", title="t", ties=mask)
    assert isinstance(figure, Figure) and len(figure.axes[0].patches) == 2 * 3
    assert figure.axes[0].get_title() == f"t\n{TIES_CAPTION}"
    with pytest.raises(RepSimValueError, match="ties"):
        heatmap_figure(np.eye(2), ["a", "b"], ["a", "b"], measure="linear_cka", ties=mask[:1])
