"""All-pairs similarity matrices: lightning_repsim against torch-cka and a float64 NumPy reference.

For two layer stacks (a 12-layer speech CNN shaped like Thompson et al. 2019's, and a CIFAR
ResNet-18 with its conv maps reduced by our capture rule) and n = 256, 1024, 4096 examples, the
script times the L x L matrix of debiased CKA (the measure torch-cka computes) three ways on the
same float32 features, side by side in one run:

* ours: ``lightning_repsim.functional.similarity_matrix(feats, measure="debiased_cka")``;
* torch-cka 0.21 (PyPI ``torch-cka``): ``CKA.compare`` on two tiny modules that emit the
  precomputed features through identity submodules, one DataLoader batch of all n examples;
* a float64 NumPy reference built from ``tests/reference.py`` (one U-centred Gram per layer).

It reports the median time, peak memory and each implementation's largest deviation from the
reference, on CPU and, when ``torch.cuda.is_available()``, on CUDA, and writes
``benchmarks/results/similarity.md``. Every (stack, n) runs in its own subprocess so that peak
memory is measured cleanly. ``--quick`` runs tiny sizes in well under a minute for smoke tests.

Usage::

    python benchmarks/bench_similarity.py            # full run, writes results/similarity.md
    python benchmarks/bench_similarity.py --quick    # smoke test, writes to a temporary file
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import _machine
import numpy as np
import torch

from lightning_repsim import functional as F
from lightning_repsim.capture import reduce_output
from lightning_repsim.functional._engine import _feature_space_is_cheaper

try:
    from tests import reference as ref  # independent float64 transcriptions of the papers
except ImportError:  # pragma: no cover - the benchmark still runs from a bare checkout of benchmarks/
    ref = None

RESULTS = HERE / "results" / "similarity.md"
MEASURE = "debiased_cka"  # what torch-cka computes: unbiased HSIC (Song et al. 2012), one full batch
FULL_NS = (256, 1024, 4096)
QUICK_NS = (32, 64)


# --------------------------------------------------------------------------------------------------
# The two layer stacks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    name: str
    shape: tuple[int, ...]  # one example's output, (C, H, W) or (p,)
    p: int  # features after reduction


def _layer(name: str, shape: tuple[int, ...], max_features: int) -> Layer:
    """A layer whose width is what our capture rule (``reduce_output``) makes of ``shape``."""
    p = reduce_output(
        torch.zeros(1, *shape), layout="conv" if len(shape) > 1 else "auto", max_features=max_features
    ).shape[1]
    return Layer(name, shape, int(p))


def thompson_stack() -> list[Layer]:
    """9 conv + 3 fc, shaped like Thompson et al. 2019's speech CNN (widths are our choice).

    Input 1 x 40 x 40 (log-mel bands x frames); three blocks of three 3x3 convs with 64, 128, 256
    channels, 2x2 max-pool between blocks; fc 512, 256 and 10 logits. Conv maps are reduced by the
    capture rule with ``max_features=1600``: 64x40x40 -> 64x5x5, 128x20x20 -> 128x3x3, 256x10x10 -> 256x2x2.
    """
    convs = [(64, 40)] * 3 + [(128, 20)] * 3 + [(256, 10)] * 3
    layers = [_layer(f"conv{i + 1}", (c, s, s), 1600) for i, (c, s) in enumerate(convs)]
    return layers + [_layer("fc1", (512,), 1600), _layer("fc2", (256,), 1600), _layer("fc3", (10,), 1600)]


def resnet18_stack() -> list[Layer]:
    """CIFAR ResNet-18 (32x32 input): stem conv, the 16 block convs, global pool, fc: 19 layers.

    Conv maps are reduced by the capture rule's default ``max_features=4096``: 64x32x32 -> 64x8x8,
    128x16x16 -> 128x5x5, 256x8x8 -> 256x4x4, 512x4x4 -> 512x2x2.
    """
    layers = [_layer("conv1", (64, 32, 32), 4096)]
    for stage, (c, s) in enumerate([(64, 32), (128, 16), (256, 8), (512, 4)], start=1):
        for block in range(2):
            for conv in (1, 2):
                layers.append(_layer(f"layer{stage}.{block}.conv{conv}", (c, s, s), 4096))
    return layers + [_layer("avgpool", (512,), 4096), _layer("fc", (10,), 4096)]


STACKS: dict[str, tuple[str, Callable[[], list[Layer]]]] = {
    "thompson": ("Thompson et al. 2019-like speech CNN (9 conv + 3 fc)", thompson_stack),
    "resnet18": ("ResNet-18-like (CIFAR, 17 conv + pool + fc)", resnet18_stack),
}


def make_features(stack: str, n: int) -> list[torch.Tensor]:
    """Deterministic float32 features that look like post-ReLU activations of a deep stack.

    A 64-d latent drifts from layer to layer (so neighbouring layers are similar and distant ones
    less so), each layer is a random read-out of it plus noise, shifted and rectified: non-negative
    with a large mean, as pooled ReLU maps are, which is what makes uncentred float32 estimators
    lose digits. The logits layer is left linear.
    """
    layers = STACKS[stack][1]()
    g = torch.Generator().manual_seed(sum(map(ord, stack)) * 100_003 + n)
    z = torch.randn(n, 64, generator=g)
    feats = []
    for i, layer in enumerate(layers):
        z = 0.85 * z + 0.5 * torch.tanh(z @ (torch.randn(64, 64, generator=g) / 8.0))
        h = z @ (torch.randn(64, layer.p, generator=g) / 8.0) + 0.5 * torch.randn(n, layer.p, generator=g)
        feats.append(h if i == len(layers) - 1 else torch.relu(h + 0.5) * (1.0 + 0.25 * i))
    return feats


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _can_reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")  # resets VmHWM, the peak resident set, to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        _ = (libc.mallopt, libc.malloc_trim)  # glibc only: AttributeError elsewhere
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _allocator(mode: str) -> None:
    """glibc malloc settings for a memory measurement or for timing (no-op elsewhere).

    ``"measure"``: buffers of 4 MiB and more are mmapped and freed memory is trimmed, so what a call
    frees leaves the RSS and its high-water mark is its own. ``"time"``: the steady state that
    glibc's dynamic thresholds reach in a long-running process (mmap threshold 32 MiB, trim at twice
    that), so repeated calls reuse memory instead of faulting fresh pages in each time, as in use.
    Both apply to every implementation alike.
    """
    if _LIBC is None:
        return
    mmap, trim = (4 << 20, 128 << 10) if mode == "measure" else (32 << 20, 64 << 20)
    _LIBC.mallopt(_M_MMAP_THRESHOLD, mmap)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, trim)
    if mode == "measure":
        _LIBC.malloc_trim(0)


class PeakMemory:
    """Peak memory of one call above what was held before it, in MiB.

    CPU: the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs)
    minus the RSS before the call; tracemalloc would not see torch's allocations. The call runs with
    the allocator in its ``"measure"`` mode (see :func:`_allocator`), which is restored to ``"time"``
    afterwards. CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the call.
    """

    def __init__(self, device: str, cpu_ok: bool):
        self.device, self.cpu_ok, self.base = device, cpu_ok, 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.cpu_ok:
            _allocator("measure")
            _can_reset_rss_peak()
            self.base = _status_kib("VmRSS") * 1024
        self.peak_mib: float | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        elif self.cpu_ok:
            self.peak_mib = max(0.0, (_status_kib("VmHWM") * 1024 - self.base) / 2**20)
            _allocator("time")


@dataclass
class Timing:
    ms: float
    runs: int  # timed runs after the warm-up; 0: the (cold) warm-up run is the measurement
    peak_mib: float | None
    value: object


def timed(fn: Callable[[], object], device: str, cpu_mem: bool, slow_s: float = 10.0, max_repeats: int = 5) -> Timing:
    """Warm-up call (which also gives the peak memory), then the median of up to ``max_repeats`` repeats.

    The number of repeats shrinks with the warm-up's duration (5 below 1.5 s, 3 below 5 s, 1 below
    ``slow_s``); a warm-up longer than ``slow_s`` is reported on its own as a single cold run.
    """

    def once() -> tuple[float, object]:
        start = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    with PeakMemory(device, cpu_mem) as mem:
        first, value = once()
    repeats = min(max_repeats, 5 if first < 1.5 else 3 if first < 5 else 1 if first < slow_s else 0)
    times = [once()[0] for _ in range(repeats)] or [first]
    return Timing(1e3 * statistics.median(times), repeats, mem.peak_mib, value)


def gemm_rate(device: str, n: int) -> float:
    """Measured float32 GEMM rate (flop/s) for n x n products on ``device``, for torch-cka's cost model."""
    size = max(128, min(n, 2048))
    a = torch.randn(size, size, device=device)
    a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    return 3 * 2 * size**3 / (time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------
# The three implementations
# --------------------------------------------------------------------------------------------------


def ours(feats: list[torch.Tensor], measure: str = MEASURE, **kwargs: object) -> torch.Tensor:
    return F.similarity_matrix(feats, measure=measure, **kwargs)


def auto_route(measure: str, n: int, widths: list[int]) -> str:
    """Which route ``method="auto"`` takes (mirrors similarity_matrix's own rule)."""
    if measure in ("svcca", "pwcca"):
        return "SVD per layer"
    if measure == "rbf_cka":
        return "gram"
    return "features" if _feature_space_is_cheaper(n, widths, widths, True) else "gram"


def _unbiased_centre(k: np.ndarray) -> np.ndarray:
    """U-centring (Song et al. 2012) for the fallback when tests/reference.py is missing."""
    n = k.shape[0]
    kt = k.copy()
    np.fill_diagonal(kt, 0.0)
    row = kt.sum(1)
    u = kt - row[:, None] / (n - 2) - row[None, :] / (n - 2) + kt.sum() / ((n - 1) * (n - 2))
    np.fill_diagonal(u, 0.0)
    return u


def reference_matrix(feats: list[torch.Tensor], debiased: bool = True) -> np.ndarray:
    """Float64 NumPy CKA for all pairs: one (U-)centred Gram per layer, then every pair's inner product.

    HSIC_unbiased(K, L) = <U(K), U(L)>_F / (n(n-3)) with U the U-centring of Song et al. (2012),
    which ``tests/reference.py`` transcribes; the features are column-centred first, which leaves
    U(K) unchanged in exact arithmetic (U-centring removes row and column offsets) and spares the
    reference cancellation. ``debiased=False`` gives biased linear CKA from the same Grams.
    """
    grams = []
    for f in feats:
        x = f.detach().cpu().numpy().astype(np.float64)
        x = x - x.mean(0, keepdims=True)
        k = x @ x.T
        if debiased:
            k = ref.center_gram(k, unbiased=True) if ref is not None else _unbiased_centre(k)
        grams.append(k.ravel())
    count = len(grams)
    h = np.empty((count, count))
    for i in range(count):
        for j in range(i, count):
            h[i, j] = h[j, i] = np.dot(grams[i], grams[j])
    d = np.sqrt(np.diag(h))
    return h / np.outer(d, d)


class FeatureStack(torch.nn.Module):
    """Emits precomputed per-layer features through identity submodules, so forward hooks see them.

    ``forward(idx)`` takes a batch of example indices (what the DataLoader yields) and passes
    ``features[k][idx]`` through ``taps[k]`` for every layer k, in order.
    """

    def __init__(self, feats: list[torch.Tensor]):
        super().__init__()
        self.taps = torch.nn.ModuleList(torch.nn.Identity() for _ in feats)
        for k, f in enumerate(feats):
            self.register_buffer(f"features{k}", f, persistent=False)

    def forward(self, idx: torch.Tensor) -> None:
        idx = idx.to(self.features0.device)
        for k, tap in enumerate(self.taps):
            tap(getattr(self, f"features{k}")[idx])


def torch_cka_runner(
    feats: list[torch.Tensor], rows: list[int], cols: list[int], device: str
) -> Callable[[], torch.Tensor]:
    """A closure running torch-cka's ``CKA.compare`` on layers ``rows`` x ``cols``, full batch."""
    import torch_cka.cka as tcka_module

    tcka_module.tqdm = lambda iterable, **_: iterable  # silence its progress bar, nothing else
    model1 = FeatureStack([feats[i] for i in rows])
    model2 = FeatureStack([feats[j] for j in cols])
    # Name the hooked layers explicitly: by default torch-cka hooks every named module, root included.
    cka = tcka_module.CKA(
        model1,
        model2,
        model1_name="stack",
        model2_name="stack (same features)",
        model1_layers=[f"taps.{k}" for k in range(len(rows))],
        model2_layers=[f"taps.{k}" for k in range(len(cols))],
        device=device,
    )
    n = feats[0].shape[0]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(n)), batch_size=n)

    def run() -> torch.Tensor:
        cka.compare(loader, loader)
        return cka.hsic_matrix.clone()

    return run


def torch_cka_flops(n: int, rows: list[int], cols: list[int]) -> float:
    """torch-cka's work: per row a Gram and trace(K @ K); per pair a Gram and trace(K @ L), trace(L @ L)."""
    return float(sum(2 * n * n * r + 2 * n**3 + sum(2 * n * n * c + 4 * n**3 for c in cols) for r in rows))


# --------------------------------------------------------------------------------------------------
# Worker: one (stack, n) in its own process
# --------------------------------------------------------------------------------------------------


def _max_dev(a: object, b: np.ndarray) -> float:
    a = np.asarray(a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    return float(np.max(np.abs(a - b)))


def _log(msg: str) -> None:
    print(f"[bench_similarity] {msg}", file=sys.stderr, flush=True)


def run_config(stack: str, n: int, quick: bool, with_measures: bool) -> dict[str, object]:
    layers = STACKS[stack][1]()
    widths = [layer.p for layer in layers]
    count = len(layers)
    cpu_mem = _can_reset_rss_peak()
    feats = make_features(stack, n)
    out: dict[str, object] = {"stack": stack, "n": n, "layers": count, "devices": {}}
    policy = {"slow_s": 2.0, "max_repeats": 1} if quick else {"slow_s": 10.0, "max_repeats": 5}

    _log(f"{stack} n={n}: float64 NumPy reference")
    r = timed(lambda: reference_matrix(feats), "cpu", cpu_mem, **policy)
    reference = r.value
    out["ref"] = {"ms": r.ms, "runs": r.runs, "peak_mib": r.peak_mib}
    if ref is not None and n <= 1024:  # the reference's shortcut against Song et al.'s eq. (5) as written
        pairs = [(0, count - 1), (count // 2, count // 2 + 1)]
        out["ref_selfcheck"] = max(
            abs(ref.linear_cka(feats[i], feats[j], debiased=True) - reference[i, j]) for i, j in pairs
        )
    if n <= 1024:
        biased = reference_matrix(feats, debiased=False)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        dev_feats = [f.to(device) for f in feats]
        res: dict[str, object] = {"route": auto_route(MEASURE, n, widths)}
        for key, dtype in (("ours", torch.float64), ("ours32", torch.float32)):
            _log(f"{stack} n={n} {device}: ours, {dtype} products ({res['route']} route)")
            t = timed(lambda feats=dev_feats, dtype=dtype: ours(feats, product_dtype=dtype), device, cpu_mem, **policy)
            res[key] = {"ms": t.ms, "runs": t.runs, "peak_mib": t.peak_mib, "dev": _max_dev(t.value, reference)}

        # torch-cka: the whole L x L matrix when its cost model says it fits the budget, else one row
        # against evenly spaced columns, extrapolated by the same cost model.
        rate = gemm_rate(device, n)
        every = list(range(count))
        full_flops = torch_cka_flops(n, every, every)
        budget, block_budget = (5.0, 2.0) if quick else (60.0, 20.0)
        rows, cols = every, every
        if full_flops / rate > budget:
            rows = [count // 2]
            b = max(
                [b for b in range(1, count + 1) if torch_cka_flops(n, rows, _spaced(count, b)) / rate <= block_budget]
                or [1]
            )
            cols = _spaced(count, b)
        block_flops = torch_cka_flops(n, rows, cols)
        _log(
            f"{stack} n={n} {device}: torch-cka on {len(rows)}x{len(cols)} of {count}x{count} layer pairs "
            f"(predicted {block_flops / rate:.1f} s)"
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = timed(torch_cka_runner(dev_feats, rows, cols, device), device, cpu_mem, **policy)
        scale = full_flops / block_flops
        res["tcka"] = {
            "ms": t.ms * scale,
            "measured_ms": t.ms,
            "runs": t.runs,
            "peak_mib": t.peak_mib,
            "block": None if (rows, cols) == (every, every) else [len(rows), len(cols)],
            "dev": _max_dev(t.value, reference[np.ix_(rows, cols)]),
        }
        if n <= 1024:
            res["tcka_vs_biased"] = _max_dev(t.value, biased[np.ix_(rows, cols)])
        if device == "cpu" and stack == "thompson" and n == min(QUICK_NS if quick else FULL_NS):
            res["routes"] = {}
            for method in ("features", "gram"):
                t = timed(lambda feats=dev_feats, method=method: ours(feats, method=method), device, cpu_mem, **policy)
                res["routes"][method] = {"ms": t.ms, "dev": _max_dev(t.value, reference)}
        if with_measures:
            res["measures"] = {}
            for measure in F.MEASURES:
                _log(f"{stack} n={n} {device}: {measure}")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t = timed(lambda feats=dev_feats, measure=measure: ours(feats, measure), device, cpu_mem, **policy)
                res["measures"][measure] = {
                    "ms": t.ms,
                    "runs": t.runs,
                    "route": auto_route(measure, n, widths),
                    "nan": int(torch.isnan(t.value).sum()),
                }
        out["devices"][device] = res
        del dev_feats
    return out


def _spaced(count: int, b: int) -> list[int]:
    return sorted({int(round(v)) for v in np.linspace(0, count - 1, b)})


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _cell(entry: dict[str, object]) -> str:
    text = _ms(entry["ms"])  # type: ignore[arg-type]
    if entry.get("block"):
        return f"≈{text} ‡"
    return text + (" †" if entry["runs"] == 0 else "")


def render(
    results: list[dict[str, object]],
    info: dict[str, object],
    command: str,
    threads: int | None,
    load_before: str | None,
    wall_s: float,
) -> str:
    quick = "--quick" in command
    cuda = bool(info["cuda_device"])
    lines = ["## Similarity matrices: lightning_repsim vs torch-cka vs float64 NumPy", ""]
    if quick:
        lines += ["> **Quick smoke run (`--quick`): tiny sizes, not for citing.**", ""]
    if not cuda:
        lines += [
            "> **GPU figures pending:** no CUDA device was available for this run "
            "(`torch.cuda.is_available()` is False), so only CPU rows appear. Rerun `make bench` "
            "on a GPU machine to add the CUDA rows.",
            "",
        ]
    lines += [
        _machine.markdown(info),
        f"- Threads (torch and BLAS, every implementation): {threads or 'library default'}; "
        f"load average (1/5/15 min) before the run {load_before}, after {info['load_average']}",
        "",
    ]
    lines += [
        "**What is timed.** The all-pairs L x L matrix of one stack's layers against themselves, on the "
        "same float32 features (rows are examples), by: *ours* — `similarity_matrix(feats, "
        f'measure="{MEASURE}", product_dtype=...)` (method `auto`), once with float64 products (the CPU '
        "default) and once with float32 products (the CUDA default, TF32 off; centring and every sum "
        "still in float64); *torch-cka* 0.21 — `CKA.compare` with "
        "model1 and model2 two wrappers emitting the same features through `nn.Identity` taps, "
        "`model1_layers`/`model2_layers` named explicitly, one DataLoader batch of all n examples "
        "(so its minibatch CKA is full-batch); *NumPy* — a float64 reference from `tests/reference.py` "
        "(one U-centred Gram per layer, then each pair's inner product).",
        "",
        "**Equal accuracy.** torch-cka zeroes the Grams' diagonals and uses the unbiased HSIC estimator "
        "of Song et al. 2012 (Nguyen et al. 2021, eq. 3) on uncentred features; on one full batch that is "
        "exactly our `debiased_cka` (U-centring makes feature centring irrelevant), so all three compute "
        "the same number, and each is compared with the float64 reference on the same inputs. torch-cka "
        "computes in float32; the fair comparison at equal (or better) accuracy is therefore with our "
        "float32 products, whose deviation is in its own column. Our float64 default is shown beside it.",
        "",
        "**Method.** One warm-up call (which also gives the peak memory), then the median of up to 5 "
        "repeats (fewer for slow calls). † one cold run (the call took over 10 s). ‡ torch-cka estimated: "
        "its full L x L run would exceed the 60 s budget, so one layer against an evenly spaced subset "
        "of columns was timed and scaled by torch-cka's own flop count (Grams plus one n x n x n product "
        "per trace); its deviation is over the pairs it computed. Peak memory: CPU, resident-set "
        "high-water mark above the RSS before the call (MiB; inputs excluded), taken in the warm-up "
        "with glibc set to mmap buffers of 4 MiB and more and to trim freed memory; the timed repeats "
        "run with the thresholds glibc settles at in a long-running process (mmap 32 MiB), the same "
        "for every implementation; CUDA, `torch.cuda.max_memory_allocated` above the allocation "
        "before the call.",
        "",
    ]
    by_stack: dict[str, list[dict[str, object]]] = {}
    for res in results:
        by_stack.setdefault(res["stack"], []).append(res)  # type: ignore[arg-type]
    worst_ours = 0.0
    for stack, rows in by_stack.items():
        title, build = STACKS[stack]
        layers = build()
        lines += [f"### {title}: L = {len(layers)} layers", "", _shapes(layers), ""]
        lines += [
            "| n | device | route | ours f64 (ms) | ours f32 (ms) | torch-cka (ms) | NumPy f64 (ms) | "
            "torch-cka / ours f64 | torch-cka / ours f32 | max abs dev. ours f64 / f32 | "
            "max abs dev. torch-cka | peak MiB ours f64 / f32 / torch-cka / NumPy |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
        ]
        for res in rows:
            for device, d in res["devices"].items():  # type: ignore[union-attr]
                o, o32, t, r = d["ours"], d["ours32"], d["tcka"], res["ref"]
                worst_ours = max(worst_ours, o["dev"]) if device == "cpu" else worst_ours
                ref_cell = _cell(r) if device == "cpu" else "—"
                approx = "≈" if t["block"] else ""
                ref_mib = _mib(r["peak_mib"]) if device == "cpu" else "—"
                lines.append(
                    f"| {res['n']} | {device} | {d['route']} | {_cell(o)} | {_cell(o32)} | {_cell(t)} | {ref_cell} | "
                    f"{approx}{t['ms'] / o['ms']:,.1f}× | {approx}{t['ms'] / o32['ms']:,.1f}× | "
                    f"{o['dev']:.1e} / {o32['dev']:.1e} | {t['dev']:.1e} | "
                    f"{_mib(o['peak_mib'])} / {_mib(o32['peak_mib'])} / {_mib(t['peak_mib'])} / {ref_mib} |"
                )
        blocks = [
            f"n={res['n']} {dev}: {d['tcka']['block'][0]}x{d['tcka']['block'][1]} pairs measured in "
            f"{_ms(d['tcka']['measured_ms'])} ms"
            for res in rows
            for dev, d in res["devices"].items()
            if d["tcka"]["block"]
        ]
        if blocks:
            lines += ["", "‡ torch-cka sub-blocks: " + "; ".join(blocks) + "."]
        lines.append("")
        routes = sorted(
            {f"n={res['n']}: {d['route']}" for res in rows for d in res["devices"].values()},
            key=lambda s: int(s.split(":")[0][2:]),
        )
        lines += [
            f'Route chosen by `method="auto"`: {", ".join(routes)} (features: n·(Σp)²/2 flops vs Gram: n²·(Σp + L²)).',
            "",
        ]

    lines += _verdict(results)
    lines += _identification(results)
    lines += _route_check(results)
    lines += _measures(results)
    verdict = "within" if worst_ours <= 1e-10 else "**ABOVE**"
    lines += [
        f"**Accuracy of ours on CPU:** largest deviation from the float64 reference over every table "
        f"above is {worst_ours:.1e}, {verdict} the 1e-10 tolerance.",
        "",
        f"Whole run: {wall_s / 60:.1f} min wall time (`{command}`).",
        "",
    ]
    return "\n".join(lines)


def _shapes(layers: list[Layer]) -> str:
    groups: list[tuple[list[str], tuple[int, ...], int]] = []
    for layer in layers:
        if groups and groups[-1][1:] == (layer.shape, layer.p):
            groups[-1][0].append(layer.name)
        else:
            groups.append(([layer.name], layer.shape, layer.p))
    parts = []
    for names, shape, p in groups:
        label = names[0] if len(names) == 1 else f"{names[0]}…{names[-1]} ({len(names)})"
        parts.append(f"{label} {'x'.join(map(str, shape))}→{p}")
    return "Layers (output → features p): " + "; ".join(parts) + f". Σp = {sum(layer.p for layer in layers):,}."


def _verdict(results: list[dict[str, object]]) -> list[str]:
    """The issue's target: at least 20x torch-cka on the same inputs at equal accuracy."""
    out = []
    for device in sorted({dev for res in results for dev in res["devices"]}):
        cells = [(res, res["devices"][device]) for res in results if device in res["devices"]]
        for key, label in (("ours32", "float32 products"), ("ours", "float64 products")):
            ratios = [d["tcka"]["ms"] / d[key]["ms"] for _, d in cells]
            accurate = all(d[key]["dev"] <= d["tcka"]["dev"] for _, d in cells)
            worst = min(range(len(ratios)), key=ratios.__getitem__)
            res = cells[worst][0]
            out.append(
                f"- {device}, ours with {label}: smallest ratio {ratios[worst]:,.1f}× ({res['stack']}, "
                f"n = {res['n']}); {'at least' if ratios[worst] >= 20 else '**below**'} the 20× target; "
                f"accuracy {'equal to or better than' if accurate else '**worse than**'} torch-cka's "
                "on every row."
            )
    return ["**Target (≥ 20× torch-cka at equal accuracy):**", ""] + out + [""]


def _identification(results: list[dict[str, object]]) -> list[str]:
    pairs = [
        (res["n"], d["tcka"]["dev"], d["tcka_vs_biased"])
        for res in results
        for d in res["devices"].values()
        if "tcka_vs_biased" in d
    ]
    out = []
    if pairs:
        dev = max(p[1] for p in pairs)
        biased = min(p[2] for p in pairs)
        out += [
            f"**Which measure torch-cka computes (checked):** at n ≤ 1024 its matrix is within {dev:.1e} of "
            f"the float64 debiased CKA, but at least {biased:.1e} away from biased linear CKA: it is "
            "`debiased_cka`."
        ]
    checks = [res["ref_selfcheck"] for res in results if "ref_selfcheck" in res]
    if checks:
        out += [
            "",
            f"Reference self-check: the Gram-inner-product reference agrees with "
            f"`tests/reference.py`'s `linear_cka(x, y, debiased=True)` (Song et al.'s eq. 5 as written) "
            f"within {max(checks):.1e} on sample pairs at n ≤ 1024.",
        ]
    return out + ([""] if out else [])


def _route_check(results: list[dict[str, object]]) -> list[str]:
    for res in results:
        d = res["devices"].get("cpu", {})
        if "routes" in d:
            f, g = d["routes"]["features"], d["routes"]["gram"]
            return [
                f"Both routes, forced (Thompson stack, n={res['n']}, CPU): features {_ms(f['ms'])} ms, "
                f"max dev. {f['dev']:.1e}; gram {_ms(g['ms'])} ms, max dev. {g['dev']:.1e}.",
                "",
            ]
    return []


def _measures(results: list[dict[str, object]]) -> list[str]:
    out = []
    for res in results:
        for device, d in res["devices"].items():
            if "measures" not in d:
                continue
            out += [
                f"### Every measure, {STACKS[res['stack']][0]}, n = {res['n']}, {device} (ours only)",
                "",
                "| measure | route | ours (ms) | NaN entries of L² |",
                "|---|---|---:|---:|",
            ]
            for measure, m in d["measures"].items():
                out.append(f"| {measure} | {m['route']} | {_cell(m)} | {m['nan']} of {res['layers'] ** 2} |")
            nan_cca = [m for m, v in d["measures"].items() if v["nan"] and m in ("svcca", "pwcca")]
            if nan_cca:
                out += [
                    "",
                    f"{', '.join(nan_cca)}: NaN pairs are the degenerate CCAs (kept dimensions kx + ky ≥ "
                    "n − 1, reported with a warning); their time is mostly the per-layer SVDs.",
                ]
            out.append("")
    return out


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def _worker_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (< 30 s)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"markdown output (default {RESULTS.relative_to(ROOT)}; --quick: a temporary file)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for torch and BLAS in every implementation (default: the libraries' own); "
        "1 is far more stable on a machine shared with other jobs",
    )
    parser.add_argument("--worker", nargs=3, metavar=("STACK", "NS", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        stack, ns, path = args.worker
        if args.threads:
            torch.set_num_threads(args.threads)
        results = []
        for n in map(int, ns.split(",")):
            measures_n = min(QUICK_NS) if args.quick else 1024
            results.append(run_config(stack, n, args.quick, with_measures=stack == "resnet18" and n == measures_n))
        Path(path).write_text(json.dumps(results))
        return 0

    start = time.perf_counter()
    load_before = _machine.load_average()
    ns = QUICK_NS if args.quick else FULL_NS
    jobs = [(stack, [n]) for stack in STACKS for n in ns] if not args.quick else [(s, list(ns)) for s in STACKS]
    results: list[dict[str, object]] = []
    if args.quick:  # in-process: a smoke test of every code path, not a measurement
        if args.threads:
            torch.set_num_threads(args.threads)
        results = [
            run_config(stack, n, True, with_measures=stack == "resnet18" and n == min(QUICK_NS))
            for stack in STACKS
            for n in ns
        ]
        jobs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (stack, job_ns) in enumerate(jobs):
            path = Path(tmp) / f"{k}.json"
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                stack,
                ",".join(map(str, job_ns)),
                str(path),
            ] + (["--quick"] if args.quick else [])
            cmd += ["--threads", str(args.threads)] if args.threads else []
            subprocess.run(cmd, check=True, env=_worker_env(args.threads))
            results += json.loads(path.read_text())
    info = _machine.machine_info()
    command = (
        "python benchmarks/bench_similarity.py"
        + (" --quick" if args.quick else "")
        + (f" --threads {args.threads}" if args.threads else "")
    )
    text = render(results, info, command, args.threads, load_before, time.perf_counter() - start)
    out = args.out or (Path(tempfile.gettempdir()) / "similarity-quick.md" if args.quick else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"[bench_similarity] wrote {out} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
