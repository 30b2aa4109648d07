"""Training time with and without RepresentationSimilarity at its default cadence (every epoch).

Two workloads:

* the digits demo (examples/digits.py's CNN on sklearn's digits) on CPU, probe "val:256",
  references init + final, measures linear CKA + RV2, 12 epochs;
* the ResNet-18-like network and CIFAR-shaped data of bench_freeze.py: on CUDA when one is present
  (probe 512 held-out images, batch 256), else a reduced CPU run (width 16, 8 batches of 64 per epoch).

Plain and monitored runs alternate (``--repeats`` each) and the medians are compared. Because wall
time on a shared machine is noisy, the script also measures the time spent inside the callback's
hooks directly, split into what each logging point costs and what each run pays once, and the
probe pass against a plain no-grad forward of the same examples; the first table sets each
figure beside its target. Writes ``benchmarks/results/callback.md``.

Run: python benchmarks/bench_callback.py [--quick] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's lightning_repsim, not an installed one
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import markdown as machine_markdown
from bench_freeze import Classifier, cifar_like_data
from digits import DigitsCNN, digits_dataloaders

from lightning_repsim import RepresentationSimilarity, report
from lightning_repsim.callbacks._probing import ProbeRunner
from lightning_repsim.capture import Probe


class Clock:
    """Wall time of the monitor's parts in one fit, summed over the fit (``points`` is per logging point).

    ``setup``: on_fit_start without its probe pass (probe materialised, references captured, outputs opened);
    ``start_probe``: its probe pass (the step-0 snapshot).
    ``probe``: the separate probe passes (the step-0 one runs in on_fit_start; a logging point whose
    validation recorded the probe runs none). ``features``: getting each logging point's features
    (a recorded validation or a probe pass).
    ``work``: comparing, storing and drawing each snapshot, wherever it ran, without ``templates``.
    ``templates``: labelled heatmap frames, drawn once per (measure, reference) with Matplotlib.
    ``final``: the end-of-training comparison with the final snapshot, its figures and table.
    ``hooks``: everything the training loop waited for inside the monitor's hooks.
    ``loop``: on_train_start to on_train_end, with or without the monitor (the training epochs).
    """

    def __init__(self) -> None:
        self.parts = dict.fromkeys(
            ("setup", "start_probe", "probe", "features", "work", "templates", "final", "hooks", "loop"), 0.0
        )
        self.points = 0
        self.passes = 0

    def add(self, part: str, seconds: float) -> None:
        self.parts[part] += seconds


CLOCK = Clock()


@contextlib.contextmanager
def timed(part: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        CLOCK.add(part, time.perf_counter() - start)


class TimedHeatmapFrames(report.HeatmapFrames):
    def __init__(self, *args, **kwargs):
        with timed("templates"):
            super().__init__(*args, **kwargs)


class LoopClock(pl.Callback):
    """The training loop's own wall time (on_train_start to on_train_end), in plain and monitored runs."""

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        CLOCK.add("loop", time.perf_counter() - self.start)


class TimedSimilarity(RepresentationSimilarity):
    """Attributes the monitor's wall time to the parts of :class:`Clock`."""

    def _features(self, *args, **kwargs):
        with timed("features"):  # a logging point's features: recorded during validation, or a probe pass
            return super()._features(*args, **kwargs)

    def _compare_and_write(self, *args, **kwargs):
        CLOCK.points += 1
        before = CLOCK.parts["templates"]
        start = time.perf_counter()
        try:
            return super()._compare_and_write(*args, **kwargs)
        finally:
            CLOCK.add("work", time.perf_counter() - start - (CLOCK.parts["templates"] - before))

    def _log_final(self, *args, **kwargs):
        with timed("final"):
            return super()._log_final(*args, **kwargs)

    def _log_point_guarded(self, *args, **kwargs):
        with timed("hooks"):
            return super()._log_point_guarded(*args, **kwargs)

    def on_train_end(self, *args, **kwargs):
        before = CLOCK.parts["hooks"]
        start = time.perf_counter()
        try:
            return super().on_train_end(*args, **kwargs)
        finally:  # its last-step point is already counted by _log_point_guarded
            CLOCK.add("hooks", time.perf_counter() - start - (CLOCK.parts["hooks"] - before))

    def on_fit_start(self, trainer, pl_module):
        before = CLOCK.parts["probe"]
        start = time.perf_counter()
        try:
            with timed("hooks"):
                return super().on_fit_start(trainer, pl_module)
        finally:
            CLOCK.add("start_probe", CLOCK.parts["probe"] - before)
            CLOCK.add("setup", time.perf_counter() - start - (CLOCK.parts["probe"] - before))


_trained = ProbeRunner.trained


def _timed_trained(self, *args, **kwargs):
    CLOCK.passes += 1
    with timed("probe"):
        return _trained(self, *args, **kwargs)


ProbeRunner.trained = _timed_trained  # every separate probe pass over the trained module


def fit_once(workload: dict, mode: str, out: Path) -> tuple[float, Clock]:
    """One fit: its wall time and the :class:`Clock` of its parts. ``mode`` is "plain" (no callback),
    "default" (background=None: the worker thread on accelerators, the training loop on CPU), "worker"
    (background=True) or "in-loop" (background=False)."""
    global CLOCK
    CLOCK = Clock()
    pl.seed_everything(0, verbose=False)
    model, train, val = workload["make"]()
    callbacks: list[pl.Callback] = [LoopClock()]
    if mode != "plain":
        callbacks.append(
            TimedSimilarity(
                probe=workload["probe"],
                reference=["init", "final"],
                measures=("linear_cka", "rv2"),
                background={"default": None, "worker": True, "in-loop": False}[mode],
            )
        )
    trainer = pl.Trainer(
        max_epochs=workload["epochs"],
        callbacks=callbacks,
        logger=TensorBoardLogger(out),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator=workload["accelerator"],
        devices=1,
        log_every_n_steps=10,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, train, val)
    if workload["accelerator"] == "gpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start, CLOCK


def measure(name: str, workload: dict, repeats: int, out: Path) -> dict:
    other = "worker" if workload["accelerator"] == "cpu" else "in-loop"  # the mode the default does not pick
    times: dict[str, list[float]] = {"plain": [], "default": [], other: []}
    plain_loops: list[float] = []
    clocks: list[Clock] = []
    fit_once(workload, "plain", out / f"{name}-warm-up")  # first fits in a process pay one-time initialisation
    fit_once(workload, "default", out / f"{name}-warm-up")
    for r in range(repeats):
        for mode in times:  # alternating, so that drifts in machine load hit every mode alike
            seconds, clock = fit_once(workload, mode, out / f"{name}-{mode}-{r}")
            times[mode].append(seconds)
            if mode == "plain":
                plain_loops.append(clock.parts["loop"])
            elif mode == "default":
                clocks.append(clock)
        parts = clocks[-1].parts
        print(
            f"[{name}] repeat {r}: "
            + ", ".join(f"{m} {t[-1]:.2f} s" for m, t in times.items())
            + f" (default: hooks {parts['hooks']:.2f} s, probe passes {parts['probe']:.2f} s ({clocks[-1].passes}), "
            f"features at the points {parts['features']:.2f} s, comparing/storing/"
            f"drawing {parts['work']:.2f} s, templates {parts['templates']:.2f} s, final {parts['final']:.2f} s)",
            flush=True,
        )
    med = {m: statistics.median(t) for m, t in times.items()}
    part = {k: statistics.median(c.parts[k] for c in clocks) for k in clocks[0].parts}
    points = clocks[0].points
    epochs = workload["epochs"]
    epoch = statistics.median(plain_loops) / epochs  # one plain training epoch, validation included
    background = workload["accelerator"] != "cpu"  # the default mode's choice: work on a worker thread
    # What the training loop waits for at each logging point: its features (a recorded validation or a probe
    # pass; step 0's come from on_fit_start) and, in the loop, comparing, storing and drawing.
    features = part["features"] / max(points - 1, 1)
    per_point = features + (0.0 if background else part["work"] / points)
    # What each run pays once: setup and its step-0 probe pass, the heatmap templates, the final snapshot.
    once = part["setup"] + part["start_probe"] + (0.0 if background else part["templates"]) + part["final"]
    ratio = probe_pass_ratio(workload, repeats=3 if repeats == 1 else 9)
    return {
        "name": name,
        "plain": med["plain"],
        "monitored": med["default"],
        "other_mode": other,
        "other": med[other],
        "hooks": part["hooks"],
        "work": part["work"] + part["templates"],
        "wall_overhead": med["default"] / med["plain"] - 1,
        "other_overhead": med[other] / med["plain"] - 1,
        "target": workload["target"],
        "device": workload["device"],
        "epochs": epochs,
        "probe": workload["probe_label"],
        "background": background,
        "points": points,
        "passes": statistics.median(c.passes for c in clocks),
        "epoch": epoch,
        "features": features,
        "point_work": part["work"] / points,
        "per_point": per_point,
        "setup": part["setup"] + part["start_probe"],
        "templates": part["templates"],
        "final": part["final"],
        "once": once,
        "per_epoch_share": per_point / epoch,
        "probe_ratio": ratio,
    }


def probe_pass_ratio(workload: dict, repeats: int) -> tuple[float, float, float]:
    """``(probe pass s, plain no-grad forward s, ratio)``: the monitor's probe pass (its ProbeRunner, default
    settings) against a plain eval-mode no-grad forward of the same examples in the same batches; medians of
    alternating runs on a freshly initialised model."""
    pl.seed_everything(0, verbose=False)
    model, _, val = workload["make"]()
    model = model.to("cuda" if workload["accelerator"] == "gpu" else "cpu")
    probe = workload["probe"]
    if isinstance(probe, str):  # "val:N": the validation loader's first N examples
        probe = Probe(val, max_examples=int(probe.split(":")[1]))
    defaults = RepresentationSimilarity()
    runner = ProbeRunner(
        Probe(probe) if not isinstance(probe, Probe) else probe,
        None,
        None,
        defaults.batch_size,
        defaults.max_features,
        defaults.layout,
        defaults.token_reduction,
        None,
        None,
    )
    device = next(model.parameters()).device
    batches = list(runner.probe.batches(defaults.batch_size, device=device))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def plain() -> None:
        was = model.training
        model.eval()
        with torch.no_grad():
            for batch in batches:
                model(batch.clone())  # capture() clones each batch too
        model.train(was)
        sync()

    def probe_pass() -> None:
        runner.features(model)
        sync()

    times: dict[str, list[float]] = {"probe": [], "plain": []}
    plain(), probe_pass()  # warm-up
    for _ in range(repeats):
        for label, run in (("plain", plain), ("probe", probe_pass)):
            start = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - start)
    probe_s, plain_s = statistics.median(times["probe"]), statistics.median(times["plain"])
    return probe_s, plain_s, probe_s / plain_s


#: The targets of issue 12 ("The cost of the monitor"), on CPU.
TARGETS = {"whole run": 0.15, "per point": 0.05, "once (digits)": 0.3, "probe pass": 1.1}


#: Why the CPU targets are missed, from benchmarks/bench_parts.py (each part alone, in one process).
WHAT_IS_LEFT = [
    "### What is left, and why",
    "",
    "- *Per point on CPU* is a fixed cost per logging point, split (cProfile of the digits demo; "
    "`benchmarks/bench_parts.py` times the engine alone) between the similarity engine (about a third), "
    "the heatmaps (raster frames with printed cell values, PNG encoding), the per-point PNG and CSV files "
    "(each an atomic write) and the store snapshot. On the digits demo's 0.2 s epochs that alone is above "
    "5 % of an epoch; `write_files=False` drops the files. On a busy machine the engine's share grows: "
    "torch's and OpenBLAS's intra-op thread pools wait on each other for the same cores (compare "
    "bench_parts with `--torch-threads 1` and `OPENBLAS_NUM_THREADS=1`), and pinning them would need a "
    "process-wide setting, which the library does not change behind the user's back.",
    "- *Once per run* is Matplotlib: two heatmap templates (labels and colour bar, one per measure, since "
    "their colour ranges differ) and the end-of-fit convergence map, curves and tables. Lower DPI barely "
    "helps; reaching 0.3 s needs those figures on the raster path the per-point heatmaps already use.",
    "- *The probe pass* is gone at every logging point whose validation ran on the default `val:N` probe; "
    "where one runs, its ratio to a plain no-grad forward (table above) moves by about 0.1 from run to "
    "run around the 1.1x target (the capture hooks and the pooling of conv maps).",
    "- Short runs pay the once-per-run cost over few epochs: *runs ≤ target from* says from how many "
    "epochs the measured costs meet the target.",
]


def workloads(quick: bool) -> dict:
    digits_epochs = 2 if quick else 12
    found = {
        "digits CNN (CPU)": {
            "make": lambda: (DigitsCNN(), *digits_dataloaders()),
            "probe": "val:256",
            "probe_label": "val:256",
            "epochs": digits_epochs,
            "accelerator": "cpu",
            "device": "cpu",
            "target": TARGETS["whole run"],
        }
    }
    if torch.cuda.is_available():
        resnet = {
            "width": 64,
            "n_train": 2048 if quick else 50_000,
            "batch": 256,
            "probe": 512,
            "epochs": 2 if quick else 3,
            "accelerator": "gpu",
            "device": torch.cuda.get_device_name(0),
            "target": 0.02,
            "name": "ResNet-18-like, CIFAR-shaped (GPU)",
        }
    else:
        resnet = {
            "width": 16,
            "n_train": 512,
            "batch": 64,
            "probe": 128,
            "epochs": 2 if quick else 4,
            "accelerator": "cpu",
            "device": "cpu",
            "target": TARGETS["whole run"],
            "name": "ResNet-18-like width 16, CIFAR-shaped (CPU, reduced)",
        }
    (train_x, train_y), (test_x, _) = cifar_like_data(resnet["n_train"], resnet["probe"])
    steps_per_epoch = -(-resnet["n_train"] // resnet["batch"])
    found[resnet["name"]] = {
        "make": lambda: (
            Classifier("cifar", resnet["width"], 0.05, resnet["epochs"], steps_per_epoch),
            DataLoader(TensorDataset(train_x, train_y), batch_size=resnet["batch"], shuffle=True),
            None,
        ),
        "probe": test_x,
        "probe_label": f"{resnet['probe']} held-out images",
        "epochs": resnet["epochs"],
        "accelerator": resnet["accelerator"],
        "device": resnet["device"],
        "target": resnet["target"],
    }
    return found


def epochs_to_target(row: dict) -> str:
    """The run length (epochs) from which the overhead model of the breakdown table meets the target."""
    if row["target"] is None:
        return "—"
    budget = row["target"] * row["epoch"] - row["per_point"]  # what each epoch leaves for the once-per-run cost
    if budget <= 0:
        return "never (per point > target × epoch)"
    return f"{math.ceil((row['once'] + row['per_point']) / budget)} epochs"


def targets_table(rows: list[dict]) -> list[str]:
    """Each figure of issue 12's targets beside its measurement (the GPU row pending without a GPU)."""

    def row(figure: str, workload: str, measured: str, target: str, met: bool | None) -> str:
        verdict = "—" if met is None else ("yes" if met else "**no**")
        return f"| {figure} | {workload} | {measured} | {target} | {verdict} |"

    lines = [
        "### Against the targets",
        "",
        "| figure | workload | measured | target | met |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["device"] == "cpu":
            target = TARGETS["whole run"]
            lines.append(
                row(
                    "whole-run overhead",
                    r["name"],
                    f"{r['wall_overhead']:+.1%}",
                    f"≤ {target:.0%}",
                    r["wall_overhead"] <= target,
                )
            )
        else:
            lines.append(
                row(
                    "whole-run overhead (GPU)",
                    f"{r['name']}, {r['device']}",
                    f"{r['wall_overhead']:+.1%}",
                    f"≤ {r['target']:.0%}",
                    r["wall_overhead"] <= r["target"],
                )
            )
    for r in rows:
        target = TARGETS["per point"]
        lines.append(
            row(
                "per point / plain epoch",
                r["name"],
                f"{r['per_epoch_share']:.1%}",
                f"≤ {target:.0%}",
                r["per_epoch_share"] <= target,
            )
        )
    for r in rows:
        digits = r["name"].startswith("digits")
        target = TARGETS["once (digits)"]
        lines.append(
            row(
                "once per run",
                r["name"],
                f"{r['once']:.2f} s",
                f"≤ {target} s" if digits else "—",
                r["once"] <= target if digits else None,
            )
        )
    for r in rows:
        probe_s, plain_s, ratio = r["probe_ratio"]
        target = TARGETS["probe pass"]
        lines.append(
            row(
                "probe pass / plain no-grad forward",
                r["name"],
                f"{ratio:.2f}× ({1e3 * probe_s:.0f} vs {1e3 * plain_s:.0f} ms)",
                f"≤ {target}×",
                ratio <= target,
            )
        )
    if not torch.cuda.is_available():
        lines.append(
            row(
                "GPU: whole-run overhead",
                "ResNet-18-like on an H100/H200",
                "no GPU on this machine: see the section measured on a lent GPU machine, if any, below",
                "≤ 2%",
                None,
            )
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1 repeat (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", default=None, help="default: benchmarks/results/callback.md, or a temporary file with --quick"
    )
    args = parser.parse_args()
    if args.out is None:  # a smoke test must not replace the recorded results
        quick_out = Path(tempfile.gettempdir()) / "callback-quick.md"
        args.out = str(quick_out if args.quick else ROOT / "benchmarks" / "results" / "callback.md")
    warnings.filterwarnings("ignore")
    scratch = Path("/tmp") / "repsim-bench-callback"
    report.HeatmapFrames = TimedHeatmapFrames  # the callback draws its templates through report.HeatmapFrames
    rows = [measure(name, w, 1 if args.quick else args.repeats, scratch) for name, w in workloads(args.quick).items()]

    lines = [
        "## RepresentationSimilarity overhead",
        "",
        "`python benchmarks/bench_callback.py` — training wall time without the callback (*plain*) and with it "
        "at its default cadence (every epoch; references init + final; linear CKA + RV2) and default settings "
        "(*monitored*). By default the comparing, storing and drawing run in the training loop on CPU and on a "
        "worker thread on accelerators (`background=None`); the *other mode* column is the same run with the "
        "setting the default did not pick (`background=True` on CPU, `False` on GPU). Medians of "
        f"{1 if args.quick else args.repeats} alternating runs. *Hooks* is the time the training loop spends "
        "inside the callback's hooks (probe passes, the work itself when in the loop, the end-of-training "
        "convergence map); *work* is the time spent comparing, storing and drawing snapshots, wherever it ran. "
        "*Overhead* is (monitored − plain) / plain.",
        "",
        machine_markdown(),
        "",
        *targets_table(rows),
        "",
        "| workload | device | epochs | probe | plain (s) | monitored (s) | hooks (s) | work (s) | "
        "overhead | other mode | other mode (s) | its overhead | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = "—" if r["target"] is None else f"≤ {r['target']:.0%}"
        other = "`background=True`" if r["other_mode"] == "worker" else "`background=False`"
        lines.append(
            f"| {r['name']} | {r['device']} | {r['epochs']} | {r['probe']} | {r['plain']:.2f} | "
            f"{r['monitored']:.2f} | {r['hooks']:.2f} | {r['work']:.2f} | {r['wall_overhead']:+.1%} | "
            f"{other} | {r['other']:.2f} | {r['other_overhead']:+.1%} | {target} |"
        )
    lines += [
        "",
        "### Where the monitor's time goes",
        "",
        "The same default-mode runs, split by part (medians). *Per point* is paid at every logging point "
        "(here one per epoch, plus step 0): its *features* (recorded during that step's validation when the "
        "probe is the validation loader's first examples, else a separate probe pass; *probe passes* counts "
        "the separate ones, step 0's included), then comparing with the references, storing the snapshot and "
        "drawing its heatmaps, PNG and CSV files. The capture hooks' own cost inside a recorded validation is"
        " not in *features*: it is in the wall times only. *Once* is paid per run: setup (the probe "
        "materialised and hashed, outputs opened, the step-0 probe pass), the Matplotlib templates of the "
        "heatmaps (labels and colour bar, drawn once per measure and reference) and the end-of-training "
        "comparison with the final snapshot, with its convergence maps, curves and tables. Where the default "
        "runs the work on a worker thread (accelerators), *per point* and *once* count only what the training"
        " loop waits for. *Per point / epoch* is the floor of the overhead at one point per epoch, however "
        "long the run; *runs ≤ target from* is how many epochs a run needs before its overhead, (once + "
        "(epochs + 1) × per point) / (epochs × epoch), falls to the target.",
        "",
        "| workload | plain epoch (s) | points | probe passes | features (ms) | compare, store, draw (ms) | "
        "per point (ms) | per point / epoch | setup (s) | templates (s) | final snapshot (s) | once (s) | "
        "runs ≤ target from |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['epoch']:.3f} | {r['points']} | {r['passes']:g} | {1e3 * r['features']:.1f} | "
            f"{1e3 * r['point_work']:.1f} | {1e3 * r['per_point']:.1f} | {r['per_epoch_share']:.1%} | "
            f"{r['setup']:.2f} | {r['templates']:.2f} | {r['final']:.2f} | {r['once']:.2f} | "
            f"{epochs_to_target(r)} |"
        )
    lines += ["", *WHAT_IS_LEFT]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
