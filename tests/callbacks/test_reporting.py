"""PointReporter draws a logging point's heatmaps only for an output that takes them."""

import pytest
import torch

from lightning_repsim import report
from lightning_repsim.callbacks._guard import Guard
from lightning_repsim.callbacks._probing import Reference
from lightning_repsim.callbacks._reporting import FIGURE_FILES, PointReporter
from lightning_repsim.functional import linear_cka


def features(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 5, generator=g)
    return {"a": x, "b": torch.tanh(x @ torch.randn(5, 4, generator=g))}


def reporter(figures, monkeypatch, guard=None):
    drawn = []

    class Counted(report.HeatmapFrames):
        def __init__(self, *args, **kwargs):
            drawn.append(kwargs["measure"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(report, "HeatmapFrames", Counted)
    init = Reference("init", "init", features=features(0))
    sink = report.LoggerSink([])  # Lightning loggers that store no image (CSV, say) add nothing here
    return PointReporter(["a", "b"], {"linear_cka": {}}, [init], sink, figures, guard=guard), drawn


@pytest.mark.parametrize("files", [False, True])
def test_heatmaps_are_drawn_only_for_figure_files_or_an_image_logger(tmp_path, monkeypatch, files):
    point, drawn = reporter(tmp_path / "figures" if files else None, monkeypatch)
    scalars = point.point(features(1), None, step=3)
    expected = {k: float(linear_cka(features(1)[k], features(0)[k])) for k in ("a", "b")}
    assert list(scalars) == ["repsim/linear_cka/init/00_a", "repsim/linear_cka/init/01_b"]
    assert list(scalars.values()) == pytest.approx(list(expected.values()), abs=1e-12)
    assert drawn == (["linear_cka"] if files else [])
    assert (tmp_path / "figures" / "step-00000003" / "linear_cka__init.png").is_file() == files


def test_figure_files_switched_off_stop_the_drawing(tmp_path, monkeypatch):
    guard = Guard(strict=False)
    point, drawn = reporter(tmp_path / "figures", monkeypatch, guard)
    guard.off.add(FIGURE_FILES)
    point.point(features(1), None, step=0)
    assert drawn == [] and not (tmp_path / "figures").exists()
