"""Bottom-up convergence: do lower layers settle before higher ones? (Raghu et al. 2017; Morcos et al. 2018)

Trains a plain 9-layer CNN on sklearn's digits (``PlainCNN`` below: conv1-conv6, fc7, fc8, logits)
with ``RepresentationSimilarity(reference="final")``: a snapshot of every layer on the 397
validation images every ``--every`` optimizer steps (about 4 per epoch), and at the end of training
every snapshot is compared with the last one. The callback writes the layer x step
convergence map, the curves and a CSV to ``<log_dir>/repsim/figures/final/``. This script reads the
CSV back, finds for each layer the step from which its similarity to the final snapshot stays at or
above ``--threshold`` (0.95) of its final value (library: ``analysis.convergence_steps``), and asks
whether that step grows with depth (Spearman rank correlation between depth and convergence step).

Raghu et al. (2017, Fig. 4) saw lower layers converge first on CIFAR-10 ("bottom-up"), the
observation behind freeze training; Morcos et al. (2018) confirmed it with PWCCA.

Writes, under --out: the callback's run directory (run/version_0: TensorBoard events, snapshot
store, figures) and convergence_vs_depth.png, a compact summary. Numbers go to stdout.

Run: python examples/convergence.py [--epochs 15] [--every 5] [--out examples/output/convergence] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import logging
import shutil
import sys
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from scipy.stats import spearmanr
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsCNN, digits_dataloaders

from lightning_repsim import RepresentationSimilarity
from lightning_repsim.analysis import convergence_interval, convergence_steps, final_intervals
from lightning_repsim.store import open_store


class PlainCNN(DigitsCNN):
    """9 layers: conv1-conv6 (3x3, BatchNorm, ReLU; stride 2 at conv3 and conv5), fc7, fc8, logits."""

    def __init__(self, lr: float = 1e-3, width: int = 32) -> None:
        super().__init__(lr=lr, width=width)
        w = width
        blocks: list[tuple[str, nn.Module]] = []
        for i, (c_in, c_out, stride) in enumerate(
            [(1, w, 1), (w, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 4 * w, 2), (4 * w, 4 * w, 1)], start=1
        ):
            blocks += [
                (f"conv{i}", nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)),
                (f"bn{i}", nn.BatchNorm2d(c_out)),
                (f"relu{i}", nn.ReLU()),
            ]
        self.features = nn.Sequential(OrderedDict(blocks))  # 8x8 -> 4x4 (conv3) -> 2x2 (conv5)
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("flatten", nn.Flatten()),
                    ("fc7", nn.Linear(4 * w * 2 * 2, 128)),
                    ("relu7", nn.ReLU()),
                    ("fc8", nn.Linear(128, 64)),
                    ("relu8", nn.ReLU()),
                    ("logits", nn.Linear(64, 10)),
                ]
            )
        )


def read_final_csv(path: Path) -> tuple[list[str], list[int], np.ndarray]:
    """<measure>__final.csv: header 'layer, step, step, ...'; one row per layer."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    steps = [int(float(s)) for s in rows[0][1:]]
    layers = [r[0] for r in rows[1:]]
    values = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    return layers, steps, values


def main(argv: list[str] | None = None) -> dict:
    """Run the example; print the findings and return them as numbers (examples/results.py formats them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--every", type=int, default=5, help="snapshot every n optimizer steps (22 steps/epoch)")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--svcca", action=argparse.BooleanOptionalAction, default=True, help="also track SVCCA (keep 0.99)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="examples/output/convergence")
    parser.add_argument("--quick", action="store_true", help="4 epochs, a snapshot every 4 steps")
    parser.add_argument(
        "--interval", type=float, default=0.95, help="coverage of the convergence steps' intervals (linear CKA)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.every = min(args.epochs, 4), 4
    torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")

    start = time.perf_counter()
    out = Path(args.out)
    run_root = out / "run"
    if run_root.exists():
        shutil.rmtree(run_root)  # this script's own previous run (else this run's store would go to repsim-1/)
    measures = ("linear_cka", "svcca") if args.svcca else ("linear_cka",)

    pl.seed_everything(args.seed, workers=False)
    train, val = digits_dataloaders(seed=args.seed)
    monitor = RepresentationSimilarity(
        probe="val:397",  # all validation images, fixed and hashed
        reference="final",
        measures=measures,
        layers=[nn.ReLU, "classifier.logits"],  # post-activation outputs, then the logits
        every_n_train_steps=args.every,
        max_features=256,  # < n = 397: SVCCA stays defined
        threshold=args.threshold,
    )
    logger = TensorBoardLogger(str(out), name="run", version=0)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[monitor],
        logger=logger,
        enable_model_summary=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        log_every_n_steps=10,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(PlainCNN(), train, val)
    fit_seconds = time.perf_counter() - start
    folder = monitor.store_path / "figures" / "final"

    print(
        f"\nval_acc = {float(trainer.callback_metrics['val_acc']):.3f} after {args.epochs} epochs "
        f"({trainer.global_step} steps); snapshot every {args.every} steps; fit incl. monitor {fit_seconds:.1f} s"
    )
    summary: dict[str, tuple[list[str], list[int], np.ndarray, list]] = {}
    results: dict = {
        "epochs": args.epochs,
        "every": args.every,
        "steps": int(trainer.global_step),
        "val_acc": round(float(trainer.callback_metrics["val_acc"]), 4),
        "threshold": args.threshold,
        "interval": args.interval,
        "measures": {},
    }
    # each step's similarity to the final snapshot with its confidence interval, from the run's store
    store = open_store(monitor.store_path)
    bounds = final_intervals(store, {"linear_cka": {}}, args.interval)["linear_cka"]
    for measure in measures:
        layers, steps, values = read_final_csv(folder / f"{measure}__final.csv")
        converged = convergence_steps(values, steps, args.threshold)
        between = (
            convergence_interval(values, bounds[1].numpy(), bounds[2].numpy(), steps, args.threshold)
            if measure == "linear_cka"
            else [None] * len(layers)
        )
        first_reach = convergence_steps(values, steps, args.threshold, sustained=False)
        summary[measure] = (layers, steps, values, converged)
        short = [name.split(".")[-1] for name in layers]
        depth = np.arange(1, len(layers) + 1)
        ok = [i for i, c in enumerate(converged) if c is not None]
        rho, p_value = spearmanr(depth[ok], [converged[i] for i in ok])
        early = steps.index(min(steps, key=lambda s: abs(s - steps[-1] // 10)))
        print(
            f"\n{measure}: similarity of each layer to the final snapshot; converged = first step from which it "
            f"stays >= {args.threshold:.2f} x final"
        )
        print(
            f"{'depth':>5} {'layer':<8} {'at step ' + str(steps[1]):>12} {'at step ' + str(steps[early]):>12} "
            f"{'converged':>10} {'between':>10} {'first reach':>12}"
        )
        shown = ["-" if b is None else f"{b[0]}-{b[1]}" for b in between]
        for i, name in enumerate(short):
            print(
                f"{i + 1:>5} {name:<8} {values[i, 1]:>12.3f} {values[i, early]:>12.3f} "
                f"{str(converged[i]):>10} {shown[i]:>10} {str(first_reach[i]):>12}"
            )
        print(
            f"Spearman(depth, convergence step) = {rho:+.2f} (p = {p_value:.3f}, {len(ok)} layers); "
            + (
                "lower layers converge earlier"
                if rho > 0.5 and p_value < 0.05
                else "no clear bottom-up order"
                if abs(rho) <= 0.5 or p_value >= 0.05
                else "higher layers converge earlier"
            )
        )
        conv_layers = [c for i, c in enumerate(converged) if short[i].startswith("relu") and i < 6]
        fc_layers = [c for i, c in enumerate(converged) if i >= 6]
        print(
            f"median convergence step: conv layers {np.median(conv_layers):.0f}, fc layers and logits "
            f"{np.median(fc_layers):.0f}"
        )
        if measure == "linear_cka":
            print(
                f"converged between a and b: from a on every step's {args.interval:g} interval of its similarity "
                "to the final snapshot reaches the threshold, from b on every one lies above it"
            )
        results["measures"][measure] = {
            "layers": short,
            "converged": converged,
            "between": [None if b is None else list(b) for b in between],
            "spearman": round(float(rho), 4),
            "p_value": round(float(p_value), 4),
            "median_conv": float(np.median(conv_layers)),
            "median_fc": float(np.median(fc_layers)),
            "first_step": steps[1],
            "at_first_step": [round(float(v), 3) for v in values[:, 1]],
        }

    # compact summary figure: convergence step against depth, one line per measure, and the curves
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, (measure, (layers, _steps, _values, converged)) in enumerate(summary.items()):
        short = [name.split(".")[-1] for name in layers]
        left.plot(
            range(1, len(layers) + 1),
            [np.nan if c is None else c for c in converged],
            marker="o",
            color=f"C{k}",
            label=measure,
        )
        left.set_xticks(range(1, len(layers) + 1), short, rotation=45, fontsize=8)
    left.set_xlabel("layer (depth order)")
    left.set_ylabel(f"step reaching {args.threshold:.0%} of final for good")
    left.set_title("convergence step vs depth", fontsize=10)
    left.legend(fontsize=8)
    layers, steps, values, _ = summary["linear_cka"]
    colours = plt.cm.viridis(np.linspace(0, 0.95, len(layers)))
    for i, name in enumerate(layers):
        right.plot(steps, values[i], color=colours[i], label=name.split(".")[-1], linewidth=1.2)
    right.axhline(args.threshold, color="grey", linestyle=":", linewidth=1)
    right.set_xscale("symlog", linthresh=max(1, args.every))
    right.set_xlim(0, steps[-1] * 1.1)
    right.set_xlabel("optimizer step (symlog)")
    right.set_ylabel("linear CKA with the final snapshot")
    right.set_title("each layer against its final state", fontsize=10)
    right.legend(fontsize=7, ncol=2, loc="lower right")
    figure.tight_layout()
    figure.savefig(out / "convergence_vs_depth.png", dpi=130)
    plt.close(figure)

    print(
        f"\nfigures: {out / 'convergence_vs_depth.png'}; the callback's own: "
        + ", ".join(str(p) for p in sorted(folder.glob("*.png")))
    )
    print(f"CSV: {', '.join(str(p) for p in sorted(folder.glob('*.csv')))}")
    print(f"runtime: {time.perf_counter() - start:.1f} s")
    return results


if __name__ == "__main__":
    main()
