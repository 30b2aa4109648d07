"""Freeze training and random networks, compared layer by layer with RV2 (Thompson et al. 2019).

Thompson, Bengio & Schönwiesner (2019) compared speech CNNs with the modified RV coefficient
(RV2, Smilde et al. 2009): a normally trained network, a *freeze-trained* one (layers frozen one
by one in depth order, Raghu et al. 2017) and *random net n* (layers 1..n left at their random
initialisation, only the layers above trained). Their Figure 4 shows one layers x layers RV2
heatmap per pair of networks. This script does the same on sklearn's digits (offline):

* ``standard``   : every layer trained for the whole run.
* ``freeze``     : ``FreezeTraining(schedule="linear")``: with 5 units, unit i freezes at i/5 of
                   training (20 %, 40 %, 60 %, 80 %); the last unit never freezes.
* ``random n``   : ``FreezeTraining(schedule={unit: 0 for the first n units})``: units 1..n are
                   frozen from step 0, i.e. they stay exactly at their initial weights (BatchNorm
                   running statistics included: frozen units' BatchNorm layers run in eval mode).
* ``standard'``  : a second standard network with the same init but another data order: the
                   "training noise" floor, to tell a real difference from run-to-run variation.
* ``init``       : the common initial network (all networks start from the same weights).

The network is examples/digits.py's ``DigitsCNN`` with its layers regrouped into five blocks
(conv1, conv2, conv3, fc1, fc2 = logits) so that a unit is a whole block: conv + BatchNorm + ReLU
(+ pool). Same modules, same parameter creation order, so the same seed gives the same init.
The init network's BatchNorm running statistics are first set to the exact statistics of the
training images (weights untouched): a unit frozen at step 0 runs its BatchNorm in eval mode, and
with the default statistics (mean 0, variance 1) it would not normalise at all.

Timings: the script also reports fit wall / CPU time, the median step time per freeze phase and a
plain-PyTorch step-time micro-benchmark with 0..4 units frozen. It runs with one torch thread by
default (``--threads``), by far the fastest and steadiest setting for this small CNN on a shared CPU.

Every network is compared with the standard one and with the init network by
``lightning_repsim.compare(..., measures=("rv2", "linear_cka"))`` on the 397 validation images,
using the five block outputs. Output (default ``examples/output/freeze_and_random_nets/``):

    grid_rv2.png, grid_linear_cka.png    Figure-4-like grids: one layers x layers heatmap per pair, colours 0..1
    diagonal_rv2.png, diagonal_linear_cka.png   layer i vs layer i, one curve per pair
    heatmaps/<pair>_<measure>.png         the same heatmaps one by one (report.heatmap_figure, 0..1)
    csv/<pair>/<measure>.csv              the matrices (Comparison.to_csv)
    summary.json                          accuracies, fit times, freeze events, diagonals

Run: python examples/freeze_and_random_nets.py [--quick] [--epochs 20] [--random-n 1,2,3,4] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import N_TRAIN, DigitsCNN, digits_dataloaders, digits_tensors

from lightning_repsim import compare
from lightning_repsim.callbacks.freeze import FreezeTraining
from lightning_repsim.report import heatmap_figure, save_png

UNITS = ["features.0", "features.1", "features.2", "classifier.1", "classifier.2"]
LABELS = ["conv1", "conv2", "conv3", "fc1", "fc2"]
MEASURES = ("rv2", "linear_cka")
DEFAULT_OUT = Path(__file__).resolve().parent / "output" / "freeze_and_random_nets"


class BlockDigitsCNN(DigitsCNN):
    """``DigitsCNN`` with its modules regrouped into five depth-ordered blocks (one unit each).

    ``features.0`` = conv1+BN+ReLU, ``features.1`` = conv2+BN+ReLU+pool, ``features.2`` =
    conv3+BN+ReLU+pool, ``classifier.1`` = fc1+ReLU, ``classifier.2`` = fc2 (logits). The
    modules (and so the parameters drawn at init) are exactly those of ``DigitsCNN``.
    """

    def __init__(self, lr: float = 1e-3, width: int = 32) -> None:
        super().__init__(lr=lr, width=width)
        f, c = list(self.features), list(self.classifier)
        self.features = nn.Sequential(nn.Sequential(*f[0:3]), nn.Sequential(*f[3:7]), nn.Sequential(*f[7:11]))
        self.classifier = nn.Sequential(c[0], nn.Sequential(c[1], c[2]), c[3])


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> None:
    """Set every BatchNorm's running statistics to the exact mean / variance of its input over ``images``.

    Weights are untouched. Without this the init network's running statistics are the defaults
    (mean 0, variance 1), so in eval mode its BatchNorm layers do not normalise at all, unlike the
    same network in training mode; the "init" network and the frozen layers of "random net n" would
    then be a different function from the one the other networks started training from.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    was = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
    model.train()
    with torch.no_grad():
        for chunk in images.split(batch_size):
            model(chunk)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    model.train(was)


class StepTimer(pl.Callback):
    """Wall time of every training batch (forward, backward, optimizer step, the other callbacks' hooks)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t0)


def step_time_by_frozen_prefix(
    init_state: dict, args: argparse.Namespace, repeats: int, steps: int = 12
) -> list[float]:
    """Seconds per plain-PyTorch training step (forward, backward, Adam) with the first k units frozen, k = 0..L-1.

    Frozen as FreezeTraining freezes (``requires_grad=False``, BatchNorm in eval mode, the optimizer
    keeps every parameter). The configurations are interleaved and the minimum over ``repeats``
    rounds is kept, so other processes on a shared CPU disturb the comparison as little as possible.
    """
    images, labels = digits_tensors()
    gen = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(N_TRAIN, generator=gen)[: args.batch_size]
    x, y = images[idx], labels[idx]
    best = [float("inf")] * len(UNITS)
    for _ in range(repeats):
        for k in range(len(UNITS)):
            model = BlockDigitsCNN(lr=args.lr, width=args.width)
            model.load_state_dict(init_state)
            model.train()
            for unit in UNITS[:k]:
                block = model.get_submodule(unit)
                block.requires_grad_(False)
                block.eval()
            optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
            for i in range(steps + 2):  # 2 warm-up steps
                if i == 2:
                    t0 = time.perf_counter()
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
            best[k] = min(best[k], (time.perf_counter() - t0) / steps)
    return best


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was)
    return acc


def train(init_state: dict, args: argparse.Namespace, freeze: FreezeTraining | None, data_seed: int) -> dict:
    """Train a copy of the init network; returns the model, its fit wall / CPU time and freeze events."""
    pl.seed_everything(args.seed, verbose=False)
    model = BlockDigitsCNN(lr=args.lr, width=args.width)
    model.load_state_dict(init_state)
    loader, _ = digits_dataloaders(batch_size=args.batch_size, seed=data_seed)
    timer = StepTimer()  # first, so that its interval includes FreezeTraining's own per-batch hook
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[timer, freeze] if freeze else [timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, loader)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    steps = trainer.global_step
    frozen = freeze.frozen_units if freeze else []
    return {
        "model": model.eval(),
        "wall_s": wall,
        "cpu_s": cpu,
        "steps": steps,
        "examples_per_s": steps * args.batch_size / wall,
        "frozen_units": frozen,
        "step_s": timer.times,
        "events": [{"unit": e["unit"], "step": e["step"]} for e in (freeze.events if freeze else [])],
    }


def unchanged_units(model: nn.Module, init_state: dict) -> list[str]:
    """Units whose parameters and buffers are bit-identical to the init network's."""
    state = model.state_dict()
    out = []
    for unit in UNITS:
        keys = [k for k in state if k.startswith(unit + ".") and not k.endswith("num_batches_tracked")]
        if keys and all(torch.equal(state[k], init_state[k]) for k in keys):
            out.append(unit)
    return out


def grid_figure(pairs: list[tuple[str, str]], comparisons: dict, measure: str, names: dict) -> Figure:
    """Figure-4-like grid: one layers x layers heatmap per pair; one row per reference (standard, init)."""
    rows = [[p for p in pairs if p[1] == ref] for ref in ("standard", "init")]
    ncols = max(len(r) for r in rows)
    fig = Figure(figsize=(2.55 * ncols + 0.9, 2.75 * len(rows) + 0.5), dpi=110)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    image = None
    for r, row in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(row):
                ax.axis("off")
                continue
            a, b = row[c]
            values = comparisons[(a, b)][measure].cpu().numpy()
            image = ax.imshow(
                np.ma.masked_invalid(values),
                cmap="viridis",
                vmin=0.0,
                vmax=1.0,
                origin="upper",
                interpolation="nearest",
            )
            for i in range(values.shape[0]):
                for j in range(values.shape[1]):
                    v = values[i, j]
                    ax.text(
                        j,
                        i,
                        "NaN" if np.isnan(v) else f"{v:.2f}".lstrip("0") if v >= 0 else f"{v:.1f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="black" if v > 0.6 else "white",
                    )
            ax.set_xticks(range(len(LABELS)), LABELS, rotation=90, fontsize=7)
            ax.set_yticks(range(len(LABELS)), LABELS, fontsize=7)
            ax.set_title(f"{names[a]} vs {names[b]}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"rows: network\ncolumns: {names[b]}", fontsize=7)
    fig.suptitle(f"{measure}: each network (rows) vs a reference (columns), 397 validation digits", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.93, 0.96))
    cax = fig.add_axes((0.945, 0.15, 0.015, 0.7))
    fig.colorbar(image, cax=cax, label=measure)
    return fig


def diagonal_figure(pairs: list[tuple[str, str]], comparisons: dict, measure: str, names: dict) -> Figure:
    """Layer i vs layer i, one curve per pair; left panel: vs standard, right panel: vs init."""
    fig = Figure(figsize=(10, 3.8), dpi=110)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, ref in zip(axes, ("standard", "init")):
        for a, b in pairs:
            if b != ref:
                continue
            diag = comparisons[(a, b)][measure].diagonal().cpu().numpy()
            style = "--" if a == "standard_reshuffled" else "-"
            ax.plot(LABELS, diag, style, marker="o", label=names[a])
        ax.set_title(f"vs {names[ref]}")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("layer (same layer in both networks)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel(f"{measure}, layer i vs layer i")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    """Run the example; print the findings and return them as numbers (examples/results.py formats them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--random-n", default="1,2,3,4", help="comma-separated n for 'random net n' (1..4)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: this small CNN is fastest and its timings steadiest "
        "single-threaded, above all on a CPU shared with other processes)",
    )
    parser.add_argument("--timing-repeats", type=int, default=5, help="rounds of the step-time micro-benchmark")
    parser.add_argument("--quick", action="store_true", help="3 epochs, random nets 1 and 3 (a smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.random_n, args.timing_repeats = 3, "1,3", 2
    random_ns = [int(n) for n in args.random_n.split(",") if n.strip()]
    if any(not 1 <= n < len(UNITS) for n in random_ns):
        parser.error(f"--random-n values must lie in 1..{len(UNITS) - 1} (the last layer always trains)")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load_start = os.getloadavg()

    # one init for everybody
    pl.seed_everything(args.seed, verbose=False)
    init_model = BlockDigitsCNN(lr=args.lr, width=args.width)
    images, labels = digits_tensors()
    calibrate_batchnorm(init_model, images[:N_TRAIN])  # BatchNorm statistics of the init net on the training images
    init_model.eval()
    init_state = copy.deepcopy(init_model.state_dict())
    x_val, y_val = images[N_TRAIN:], labels[N_TRAIN:]

    runs: dict[str, dict] = {}
    print(
        f"training on {N_TRAIN} digits, {args.epochs} epochs, batch {args.batch_size}, "
        f"{torch.get_num_threads()} CPU threads, load average {load_start[0]:.1f} on {os.cpu_count()} cores"
    )
    runs["standard"] = train(init_state, args, None, data_seed=args.seed)
    runs["freeze"] = train(
        init_state, args, FreezeTraining(schedule="linear", units=UNITS, verbose=False), data_seed=args.seed
    )
    for n in random_ns:
        schedule = dict.fromkeys(UNITS[:n], 0)  # frozen from step 0: left at the random init
        runs[f"random_{n}"] = train(
            init_state, args, FreezeTraining(schedule=schedule, units=UNITS, verbose=False), data_seed=args.seed
        )
    runs["standard_reshuffled"] = train(init_state, args, None, data_seed=args.seed + 1)
    train_s = time.perf_counter() - start

    names = {
        "standard": "standard",
        "freeze": "freeze-trained",
        "standard_reshuffled": "standard'",
        "init": "init",
        **{f"random_{n}": f"random net {n}" for n in random_ns},
    }
    acc = {"init": accuracy(init_model, x_val, y_val)}
    print("\nnetwork            val acc   fit wall s  fit CPU s  examples/s  frozen at init (bit-identical units)")
    for key, run in runs.items():
        acc[key] = accuracy(run["model"], x_val, y_val)
        same = [LABELS[UNITS.index(u)] for u in unchanged_units(run["model"], init_state)]
        run["unchanged_from_init"] = same
        print(
            f"{names[key]:<18} {acc[key]:7.3f}   {run['wall_s']:9.1f}  {run['cpu_s']:9.1f}  "
            f"{run['examples_per_s']:10.0f}  {', '.join(same) or '-'}"
        )
    print(f"{'init':<18} {acc['init']:7.3f}")
    events = runs["freeze"]["events"]
    print(
        "freeze-training events: "
        + ", ".join(f"{LABELS[UNITS.index(e['unit'])]}@step {e['step']}" for e in events)
        + f" (of {runs['freeze']['steps']} steps)"
    )
    speed = runs["standard"]["wall_s"] / runs["freeze"]["wall_s"]
    print(
        f"freeze vs standard fit time: {runs['freeze']['wall_s']:.1f} s vs {runs['standard']['wall_s']:.1f} s "
        f"(x{speed:.2f} throughput; CPU time {runs['freeze']['cpu_s']:.1f} s vs {runs['standard']['cpu_s']:.1f} s)"
    )
    # per-phase median step time: robust to the other processes sharing the CPU
    bounds = [0, *[e["step"] for e in events], runs["freeze"]["steps"]]
    phases = []
    print("median training-step time per freeze phase (ms): phase  steps  standard  freeze  speed-up")
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        std = 1e3 * float(np.median(runs["standard"]["step_s"][lo:hi]))
        frz = 1e3 * float(np.median(runs["freeze"]["step_s"][lo:hi]))
        frozen_now = ",".join(LABELS[:i]) or "none"
        phases.append({"frozen": frozen_now, "steps": [lo, hi], "standard_ms": std, "freeze_ms": frz})
        print(f"  frozen: {frozen_now:<22} {lo:4d}-{hi:<4d} {std:8.2f} {frz:7.2f}  x{std / frz:.2f}")
    micro = step_time_by_frozen_prefix(init_state, args, repeats=args.timing_repeats)
    print("plain-PyTorch step time (min of interleaved repeats), first k units frozen:")
    for k, t in enumerate(micro):
        print(f"  k={k} ({','.join(LABELS[:k]) or 'none'} frozen): {1e3 * t:6.2f} ms/step  x{micro[0] / t:.2f}")
    for n in random_ns:
        r = runs[f"random_{n}"]
        print(
            f"  random net {n} (conv/fc up to {LABELS[n - 1]} frozen throughout): "
            f"{1e3 * float(np.median(r['step_s'])):.2f} ms/step vs standard "
            f"{1e3 * float(np.median(runs['standard']['step_s'])):.2f}"
        )

    # comparisons, on the validation images, block outputs only
    models = {key: run["model"] for key, run in runs.items()}
    models["init"] = init_model
    others = ["freeze", *[f"random_{n}" for n in random_ns], "standard_reshuffled"]
    pairs = [(a, "standard") for a in others] + [(a, "init") for a in ["standard", *others]]
    comparisons = {}
    out: Path = args.out
    for a, b in pairs:
        result = compare(models[a], models[b], probe=x_val, measures=MEASURES, layers=UNITS, names=(names[a], names[b]))
        assert result.layers_a == UNITS and result.layers_b == UNITS, (result.layers_a, result.layers_b)
        comparisons[(a, b)] = result
        result.to_csv(out / "csv" / f"{a}_vs_{b}")
        for measure in MEASURES:  # (Comparison.plot would use RV2's default range -0.1..1 and module paths)
            figure = heatmap_figure(
                result[measure].cpu().numpy(),
                LABELS,
                LABELS,
                measure=measure,
                title=f"{measure}: {names[a]} vs {names[b]} (n = {result.n})",
                row_title=names[a],
                col_title=names[b],
                value_range=(0.0, 1.0),
            )
            save_png(figure, out / "heatmaps" / f"{a}_vs_{b}_{measure}.png")

    for measure in MEASURES:
        save_png(grid_figure(pairs, comparisons, measure, names), out / f"grid_{measure}.png")
        save_png(diagonal_figure(pairs, comparisons, measure, names), out / f"diagonal_{measure}.png")

    print("\ndiagonal (layer i vs layer i)      " + "".join(f"{label:>7}" for label in LABELS))
    for measure in MEASURES:
        for a, b in pairs:
            diag = comparisons[(a, b)][measure].diagonal().tolist()
            print(f"{measure:<10} {names[a] + ' vs ' + names[b]:<28}" + "".join(f"{v:7.3f}" for v in diag))

    summary = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "layers": dict(zip(LABELS, UNITS)),
        "probe": {"n": len(x_val), "hash": next(iter(comparisons.values())).probe_hash},
        "accuracy": acc,
        "fit": {
            k: {
                f: r[f]
                for f in ("wall_s", "cpu_s", "steps", "examples_per_s", "frozen_units", "events", "unchanged_from_init")
            }
            for k, r in runs.items()
        },
        "diagonal": {
            m: {f"{a}_vs_{b}": comparisons[(a, b)][m].diagonal().tolist() for a, b in pairs} for m in MEASURES
        },
        "matrices": {m: {f"{a}_vs_{b}": comparisons[(a, b)][m].tolist() for a, b in pairs} for m in MEASURES},
        "step_time_phases": phases,
        "plain_torch_step_ms_by_frozen_prefix": [1e3 * t for t in micro],
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "median_step_ms": {k: 1e3 * float(np.median(r["step_s"])) for k, r in runs.items()},
        "train_s": train_s,
        "total_s": time.perf_counter() - start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"\nfigures: {out}/grid_rv2.png, grid_linear_cka.png, diagonal_rv2.png, diagonal_linear_cka.png, "
        f"heatmaps/, csv/, summary.json"
    )
    print(f"total {summary['total_s']:.0f} s (training {train_s:.0f} s)")
    return {
        "epochs": args.epochs,
        "random_n": random_ns,
        "names": dict(names),
        "accuracy": {k: round(float(v), 3) for k, v in acc.items()},
        "diagonal": {
            m: {
                f"{a}_vs_{b}": [round(float(v), 3) for v in comparisons[(a, b)][m].diagonal().tolist()]
                for a, b in pairs
            }
            for m in MEASURES
        },
        "labels": list(LABELS),
        # timings: they vary with the machine and its load (examples/results.py says which machine)
        "fit_wall_s": {k: round(r["wall_s"], 2) for k, r in runs.items()},
        "fit_cpu_s": {k: round(r["cpu_s"], 2) for k, r in runs.items()},
        "median_step_ms": {k: round(v, 2) for k, v in summary["median_step_ms"].items()},
        "step_time_phases": [
            {"frozen": ph["frozen"], "standard_ms": round(ph["standard_ms"], 2), "freeze_ms": round(ph["freeze_ms"], 2)}
            for ph in phases
        ],
        "plain_torch_step_ms": [round(1e3 * t, 2) for t in micro],
        "freeze_events": [{"unit": LABELS[UNITS.index(e["unit"])], "step": e["step"]} for e in events],
        "steps": runs["freeze"]["steps"],
        "total_s": round(summary["total_s"], 1),
    }


if __name__ == "__main__":
    main()
