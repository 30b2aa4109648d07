"""The monitor's parts on the digits demo, timed one by one in one process (issue 12, "The cost of the monitor").

bench_callback.py times whole fits; on a shared machine those move by 2-10x from run to run. This
script times each part the callback pays, medians of ``--repeats`` calls, all in one process:

* per logging point: the snapshot (5 blocks, probe val:256) against the init reference, linear CKA
  then RV2 on one :class:`~lightning_repsim.functional.Representations` per side (the reference's
  Grams kept, as in a run), by the Gram route, the feature route and ``auto``;
* once per run: the end-of-training comparison (13 stored snapshots against the last one), the
  two heatmap templates, the convergence report's four figures;
* the store's CRC-32 of a 32 MB snapshot.

Thread pools matter more than arithmetic here: on a loaded 2-core machine a 256 x 256 Gram takes
~4 ms on one thread and 30-60 ms on two (OpenMP's or OpenBLAS's threads waiting on each other).
Compare ``python benchmarks/bench_parts.py`` with
``OPENBLAS_NUM_THREADS=1 python benchmarks/bench_parts.py --torch-threads 1``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's lightning_repsim, not an installed one
sys.path.insert(0, str(ROOT / "examples"))
from digits import DigitsCNN, digits_dataloaders

from lightning_repsim import RepresentationSimilarity, report
from lightning_repsim.callbacks._probing import ProbeRunner
from lightning_repsim.callbacks._reporting import GRAM_CACHE_BYTES
from lightning_repsim.capture import Probe
from lightning_repsim.convergence import similarity_to_final, write_convergence_report
from lightning_repsim.functional import Representations, similarity_matrix
from lightning_repsim.store import SnapshotStore

MEASURES = ("linear_cka", "rv2")


def median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="one call of each part (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    defaults = RepresentationSimilarity()
    _, val = digits_dataloaders()
    runner = ProbeRunner(
        Probe(val, max_examples=256), None, None, defaults.batch_size, defaults.max_features, "auto", "mean", None, None
    )
    init, trained = runner.features(DigitsCNN()), runner.features(DigitsCNN())
    names = list(trained)
    print(f"torch threads {torch.get_num_threads()}; blocks {[tuple(x.shape) for x in trained.values()]}")

    for method in ("gram", "features", "auto"):
        reference = Representations(init, max_cache_bytes=GRAM_CACHE_BYTES)

        def point(method: str = method, reference: Representations = reference) -> None:
            current = Representations(trained, max_cache_bytes=GRAM_CACHE_BYTES)
            for measure in MEASURES:
                similarity_matrix(current, reference, measure, method=method, warn=False)

        print(f"per point, {' + '.join(MEASURES)} ({method}): {median_ms(point, args.repeats):.1f} ms")

    with tempfile.TemporaryDirectory() as scratch:
        store = SnapshotStore.create(Path(scratch) / "store", probe_hash="bench", n=256)
        generator = torch.Generator().manual_seed(0)
        for step in range(13):
            store.add(step * 22, {k: torch.randn(x.shape, generator=generator) for k, x in trained.items()})
        options: dict[str, dict] = {m: {} for m in MEASURES}
        print(f"end of fit, comparison: {median_ms(lambda: similarity_to_final(store, options), args.repeats):.1f} ms")
        values = similarity_to_final(store, options)
        steps = store.steps

        def figures() -> None:
            with tempfile.TemporaryDirectory() as out:
                write_convergence_report({m: v.numpy() for m, v in values.items()}, names, steps, out)

        print(f"end of fit, report and its {2 * len(MEASURES)} figures: {median_ms(figures, 3):.1f} ms")

    def templates() -> None:
        for m in MEASURES:
            report.HeatmapFrames(names, names, measure=m, title=f"{m} vs init", row_title="layers", col_title="init")

    print(f"heatmap templates ({len(MEASURES)}): {median_ms(templates, 3):.1f} ms")
    raw = np.random.default_rng(0).standard_normal(8 << 20, dtype=np.float32)
    print(f"CRC-32 of 32 MB: {median_ms(lambda: zlib.crc32(raw.data), args.repeats):.1f} ms")


if __name__ == "__main__":
    main()
