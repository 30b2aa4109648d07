"""Training time with and without RepresentationSimilarity at its default cadence (every epoch).

Two workloads:

* the digits demo (examples/digits.py's CNN on sklearn's digits) on CPU, probe "val:256",
  references init + final, measures linear CKA + RV2, 12 epochs;
* the ResNet-18-like network and CIFAR-shaped data of bench_freeze.py: on CUDA when one is present
  (probe 512 held-out images, batch 256), else a reduced CPU run (width 16, 8 batches of 64 per epoch).

Plain and monitored runs alternate (``--repeats`` each) and the medians are compared. Because wall
time on a shared machine is noisy, the script also measures the time spent inside the callback's
hooks directly (``time in callback``), the overhead that does not depend on the noise of the
training loop. Writes ``benchmarks/results/callback.md``.

Run: python benchmarks/bench_callback.py [--quick] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import markdown as machine_markdown  # noqa: E402
from bench_freeze import Classifier, cifar_like_data  # noqa: E402  (the same ResNet-18 layout and data)
from digits import DigitsCNN, digits_dataloaders  # noqa: E402

from lightning_repsim import RepresentationSimilarity  # noqa: E402
from lightning_repsim.callbacks import similarity as similarity_module  # noqa: E402


class TimedSimilarity(RepresentationSimilarity):
    """Adds up the wall time spent in the monitor's hooks (``seconds``: what the training loop waits for) and
    in its comparing/storing/drawing (``worker_seconds``: on the worker thread unless background=False)."""

    seconds = 0.0
    worker_seconds = 0.0

    def _compare_and_write(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super()._compare_and_write(*args, **kwargs)
        finally:
            TimedSimilarity.worker_seconds += time.perf_counter() - start

    def _guarded(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super()._guarded(*args, **kwargs)
        finally:
            TimedSimilarity.seconds += time.perf_counter() - start

    def on_fit_start(self, trainer, pl_module):
        start = time.perf_counter()
        try:
            return super().on_fit_start(trainer, pl_module)
        finally:
            TimedSimilarity.seconds += time.perf_counter() - start


def fit_once(workload: dict, mode: str, out: Path) -> float:
    """One fit; ``mode`` is "plain" (no callback), "default" (background=None: the worker thread on
    accelerators, the training loop on CPU), "worker" (background=True) or "in-loop" (background=False)."""
    pl.seed_everything(0, verbose=False)
    model, train, val = workload["make"]()
    callbacks = []
    if mode != "plain":
        callbacks.append(TimedSimilarity(probe=workload["probe"], reference=["init", "final"],
                                         measures=("linear_cka", "rv2"),
                                         background={"default": None, "worker": True, "in-loop": False}[mode]))
    trainer = pl.Trainer(max_epochs=workload["epochs"], callbacks=callbacks, logger=TensorBoardLogger(out),
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         accelerator=workload["accelerator"], devices=1, log_every_n_steps=10,
                         num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(model, train, val)
    if workload["accelerator"] == "gpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(name: str, workload: dict, repeats: int, out: Path) -> dict:
    other = "worker" if workload["accelerator"] == "cpu" else "in-loop"  # the mode the default does not pick
    times: dict[str, list[float]] = {"plain": [], "default": [], other: []}
    hooks: list[float] = []
    work: list[float] = []
    for r in range(repeats):
        for mode in times:  # alternating, so that drifts in machine load hit every mode alike
            TimedSimilarity.seconds = TimedSimilarity.worker_seconds = 0.0
            times[mode].append(fit_once(workload, mode, out / f"{name}-{mode}-{r}"))
            if mode == "default":
                hooks.append(TimedSimilarity.seconds)
                work.append(TimedSimilarity.worker_seconds)
        print(f"[{name}] repeat {r}: " + ", ".join(f"{m} {t[-1]:.2f} s" for m, t in times.items())
              + f" (default: hooks {hooks[-1]:.2f} s, comparing/storing/drawing {work[-1]:.2f} s)", flush=True)
    med = {m: statistics.median(t) for m, t in times.items()}
    return {"name": name, "plain": med["plain"], "monitored": med["default"], "other_mode": other,
            "other": med[other], "hooks": statistics.median(hooks), "work": statistics.median(work),
            "wall_overhead": med["default"] / med["plain"] - 1, "other_overhead": med[other] / med["plain"] - 1,
            "target": workload["target"], "device": workload["device"], "epochs": workload["epochs"],
            "probe": workload["probe_label"], "background": workload["accelerator"] != "cpu"}


def workloads(quick: bool) -> dict:
    digits_epochs = 2 if quick else 12
    found = {"digits CNN (CPU)": {
        "make": lambda: (DigitsCNN(), *digits_dataloaders()), "probe": "val:256", "probe_label": "val:256",
        "epochs": digits_epochs, "accelerator": "cpu", "device": "cpu", "target": 0.10}}
    if torch.cuda.is_available():
        resnet = {"width": 64, "n_train": 2048 if quick else 50_000, "batch": 256, "probe": 512,
                  "epochs": 2 if quick else 3, "accelerator": "gpu", "device": torch.cuda.get_device_name(0),
                  "target": 0.02, "name": "ResNet-18-like, CIFAR-shaped (GPU)"}
    else:
        resnet = {"width": 16, "n_train": 512, "batch": 64, "probe": 128, "epochs": 2 if quick else 4,
                  "accelerator": "cpu", "device": "cpu", "target": None,
                  "name": "ResNet-18-like width 16, CIFAR-shaped (CPU, reduced)"}
    (train_x, train_y), (test_x, _) = cifar_like_data(resnet["n_train"], resnet["probe"])
    steps_per_epoch = -(-resnet["n_train"] // resnet["batch"])
    found[resnet["name"]] = {
        "make": lambda: (Classifier("cifar", resnet["width"], 0.05, resnet["epochs"], steps_per_epoch),
                         DataLoader(TensorDataset(train_x, train_y), batch_size=resnet["batch"], shuffle=True),
                         None),
        "probe": test_x, "probe_label": f"{resnet['probe']} held-out images", "epochs": resnet["epochs"],
        "accelerator": resnet["accelerator"], "device": resnet["device"], "target": resnet["target"]}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1 repeat (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "callback.md"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    scratch = Path("/tmp") / "repsim-bench-callback"
    rows = [measure(name, w, 1 if args.quick else args.repeats, scratch) for name, w in workloads(args.quick).items()]

    lines = ["## RepresentationSimilarity overhead", "",
             "`python benchmarks/bench_callback.py` — training wall time without the callback (*plain*) and with it "
             "at its default cadence (every epoch; references init + final; linear CKA + RV2) and default settings "
             "(*monitored*). By default the comparing, storing and drawing run in the training loop on CPU and on a "
             "worker thread on accelerators (`background=None`); the *other mode* column is the same run with the "
             "setting the default did not pick (`background=True` on CPU, `False` on GPU). Medians of "
             f"{1 if args.quick else args.repeats} alternating runs. *Hooks* is the time the training loop spends "
             "inside the callback's hooks (probe passes, the work itself when in the loop, the end-of-training "
             "convergence map); *work* is the time spent comparing, storing and drawing snapshots, wherever it ran. "
             "*Overhead* is (monitored − plain) / plain.", "",
             machine_markdown(), "",
             "| workload | device | epochs | probe | plain (s) | monitored (s) | hooks (s) | work (s) | "
             "overhead | other mode | other mode (s) | its overhead | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        target = "—" if r["target"] is None else f"≤ {r['target']:.0%}"
        other = "`background=True`" if r["other_mode"] == "worker" else "`background=False`"
        lines.append(f"| {r['name']} | {r['device']} | {r['epochs']} | {r['probe']} | {r['plain']:.2f} | "
                     f"{r['monitored']:.2f} | {r['hooks']:.2f} | {r['work']:.2f} | {r['wall_overhead']:+.1%} | "
                     f"{other} | {r['other']:.2f} | {r['other_overhead']:+.1%} | {target} |")
    if not torch.cuda.is_available():
        lines += ["", "GPU figure pending: no GPU was available to this run (the ≤ 2 % target is for the "
                      "ResNet-18-like network on an H100/H200)."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
