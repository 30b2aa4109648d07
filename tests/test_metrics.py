"""LayerSimilarity: streaming equals the functional call on the whole probe, also across processes."""

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_repsim import functional as F
from lightning_repsim.errors import RepSimValueError, RepSimWarning
from lightning_repsim.metrics import LayerSimilarity

ALL = ("linear_cka", "debiased_cka", "rbf_cka", "rv", "rv2", "svcca", "pwcca")


def _probe(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    a = {
        "conv": x,
        "mid": torch.tanh(x @ torch.randn(6, 20, generator=g, dtype=torch.float64)),
        "fc": torch.randn(n, 3, generator=g, dtype=torch.float64) + x[:, :3],
    }
    b = {"other.0": x @ torch.randn(6, 4, generator=g, dtype=torch.float64), "other.1": x.square()}
    return a, b


def _batches(layers, sizes):
    start = 0
    for size in sizes:
        yield {k: v[start : start + size] for k, v in layers.items()}
        start += size


@pytest.mark.parametrize("symmetric", [True, False])
def test_exact_mode_equals_functional_on_concatenated_probe(symmetric):
    a, b = _probe()
    metric = LayerSimilarity(list(a), None if symmetric else list(b), measures=ALL)
    sizes = [10, 33, 1, 40, 12]
    for part_a, part_b in zip(_batches(a, sizes), _batches(b, sizes)):
        metric.update(part_a) if symmetric else metric.update(part_a, part_b)
    result = metric.compute()
    for measure in ALL:
        expected = F.similarity_matrix(a, None if symmetric else b, measure)
        torch.testing.assert_close(result[measure], expected, atol=1e-6, rtol=0, equal_nan=True)


def test_minibatch_mode_equals_minibatch_cka_per_pair():
    a, b = _probe(n=100)
    metric = LayerSimilarity(list(a), list(b), mode="minibatch")
    for part_a, part_b in zip(_batches(a, [25] * 4), _batches(b, [25] * 4)):
        metric.update(part_a, part_b)
    result = metric.compute()["linear_cka"]
    for i, x in enumerate(a.values()):
        for j, y in enumerate(b.values()):
            assert result[i, j].item() == pytest.approx(F.minibatch_cka(x, y, 25).item(), abs=1e-12)


def test_minibatch_mode_skips_batches_too_small_for_the_unbiased_estimator():
    a, _ = _probe(n=50)
    metric = LayerSimilarity(list(a), mode="minibatch")
    metric.update({k: v[:46] for k, v in a.items()})
    with pytest.warns(RepSimWarning, match="skipped a batch of 3"):
        metric.update({k: v[46:49] for k, v in a.items()})
    expected = F.minibatch_cka(a["conv"][:46], a["fc"][:46], 46)
    assert metric.compute()["linear_cka"][0, 2].item() == pytest.approx(expected.item(), abs=1e-12)


def test_memory_budget_error_names_the_widest_layer():
    a, _ = _probe()
    metric = LayerSimilarity(list(a), max_bytes=10_000)
    with pytest.raises(RepSimValueError, match=r"widest layer is 'mid' with p = 20.*mode='minibatch'"):
        for part in _batches(a, [32, 32, 32]):
            metric.update(part)


def test_bad_configuration_and_calls():
    with pytest.raises(RepSimValueError, match="minibatch.*Use mode='exact' for rv2"):
        LayerSimilarity(["a"], measures=("linear_cka", "rv2"), mode="minibatch")
    with pytest.raises(RepSimValueError, match="unknown measure 'cca'"):
        LayerSimilarity(["a"], measures=("cca",))
    with pytest.raises(RepSimValueError, match="svcca takes keep; got unexpected option"):
        LayerSimilarity(["a"], measures=("svcca",), measure_options={"svcca": {"sigma": 1.0}})
    metric = LayerSimilarity(["a", "b"])
    with pytest.raises(RepSimValueError, match=r"lacks layer\(s\) \['b'\]"):
        metric.update({"a": torch.randn(5, 2)})
    with pytest.raises(RepSimValueError, match="same batch size"):
        metric.update({"a": torch.randn(5, 2), "b": torch.randn(6, 2)})
    with pytest.raises(RepSimValueError, match="before any update"):
        metric.compute()


def test_dead_layer_gives_nan_and_one_warning_in_both_modes():
    a, _ = _probe()
    a["dead"] = torch.zeros(96, 4, dtype=torch.float64)
    for mode in ("exact", "minibatch"):
        metric = LayerSimilarity(list(a), mode=mode)
        for part in _batches(a, [48, 48]):
            metric.update(part)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = metric.compute()["linear_cka"]
        messages = [str(w.message) for w in caught if issubclass(w.category, RepSimWarning)]
        assert len(messages) == 1 and "dead" in messages[0], messages
        assert torch.isnan(result[3]).all() and torch.isnan(result[:, 3]).all()
        assert torch.isfinite(result[:3, :3]).all()


def test_half_precision_batches_are_upcast():
    a, _ = _probe()
    metric = LayerSimilarity(list(a), measures=("linear_cka",))
    metric.update({k: v.to(torch.bfloat16) for k, v in a.items()})
    expected = F.similarity_matrix({k: v.to(torch.bfloat16).double() for k, v in a.items()})
    torch.testing.assert_close(metric.compute()["linear_cka"], expected, atol=1e-6, rtol=0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, mode, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        a, b = _probe(n=100)
        metric = LayerSimilarity(list(a), list(b), measures=ALL if mode == "exact" else ("linear_cka",), mode=mode)
        # Uneven shards: rank 0 gets 3 batches (60 examples), rank 1 two (40), in different sizes for exact mode.
        sizes = [20, 20, 20, 20, 20] if mode == "minibatch" else [7, 30, 23, 25, 15]
        parts = list(zip(_batches(a, sizes), _batches(b, sizes)))
        mine = parts[:3] if rank == 0 else parts[3:]
        for part_a, part_b in mine:
            metric.update(part_a, part_b)
        result = metric.compute()
        torch.save({k: v.cpu() for k, v in result.items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["exact", "minibatch"])
def test_two_gloo_processes_with_uneven_shards_match_one_process(tmp_path, mode):
    mp.start_processes(_ddp_worker, args=(2, _free_port(), mode, str(tmp_path)), nprocs=2, start_method="spawn")
    a, b = _probe(n=100)
    single = LayerSimilarity(list(a), list(b), measures=ALL if mode == "exact" else ("linear_cka",), mode=mode)
    for part_a, part_b in zip(_batches(a, [20] * 5), _batches(b, [20] * 5)):
        single.update(part_a, part_b)
    expected = single.compute()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got) == set(expected)
        for measure, matrix in expected.items():
            torch.testing.assert_close(got[measure], matrix, atol=1e-9, rtol=0, equal_nan=True)
