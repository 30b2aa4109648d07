"""Benchmark of FreezeTraining: standard training vs the linear and similarity schedules.

Two workloads, each trained three (four) times with the same seed and data:

* a small CNN on scikit-learn's digits (8 x 8 images, 1437 train / 360 test), CPU;
* a ResNet-18-like network on CIFAR-shaped synthetic data (3 x 32 x 32, 10 classes, labels from a
  fixed random teacher so that accuracy means something): full width on a GPU when one is
  available, a reduced width / size run on the CPU otherwise.

Reported side by side: wall time of ``trainer.fit``, throughput (training samples / s over the
whole run), final test accuracy, and the units frozen. A second table times one training step
(forward, backward) with the first k units frozen, which is where freezing saves compute.

Writes ``benchmarks/results/freeze.md`` (a markdown section) and prints it.

    python benchmarks/bench_freeze.py            # CPU: about 3-5 minutes
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_repsim.callbacks import FreezeTraining, LinearSchedule, SimilaritySchedule

RESULTS = Path(__file__).resolve().parent / "results" / "freeze.md"
GPU = torch.cuda.is_available()


# --------------------------------------------------------------------------- models


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, pool: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x):
        return self.pool(torch.relu(self.bn(self.conv(x))))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class Head(nn.Module):
    def __init__(self, c: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Classifier(pl.LightningModule):
    def __init__(self, kind: str, width: int, lr: float, epochs: int, steps_per_epoch: int) -> None:
        super().__init__()
        self.lr, self.total = lr, epochs * steps_per_epoch
        if kind == "digits":
            self.stem = ConvBlock(1, width)
            self.blocks = nn.Sequential(
                ConvBlock(width, width), ConvBlock(width, 2 * width, pool=True), ConvBlock(2 * width, 2 * width)
            )
            self.head = Head(2 * width, 10)
        else:  # ResNet-18 layout: stem, 4 stages x 2 BasicBlocks, head
            self.stem = ConvBlock(3, width)
            chans = [width, 2 * width, 4 * width, 8 * width]
            blocks, c_in = [], width
            for i, c in enumerate(chans):
                blocks += [BasicBlock(c_in, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)]
                c_in = c
            self.blocks = nn.Sequential(*blocks)
            self.head = Head(8 * width, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=self.total)
        return [opt], [{"scheduler": sched, "interval": "step"}]


# --------------------------------------------------------------------------- data


def digits_data():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1437], y[:1437]), (x[1437:], y[1437:])


def cifar_like_data(n_train: int, n_test: int):
    """Noise images carrying a faint, randomly shifted class template: learnable, not trivial."""
    g = torch.Generator().manual_seed(0)
    n = n_train + n_test
    templates = nn.functional.avg_pool2d(torch.randn(10, 3, 40, 40, generator=g), 5, 1, 2)
    templates = templates / templates.std()
    y = torch.randint(0, 10, (n,), generator=g)
    dx, dy = torch.randint(0, 9, (2, n), generator=g)
    x = torch.randn(n, 3, 32, 32, generator=g)
    for i in range(n):
        x[i] += 0.6 * templates[y[i], :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


# --------------------------------------------------------------------------- runs


def accuracy(model: nn.Module, data) -> float:
    model.eval()
    x, y = data
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), 512):
            xb = x[i : i + 512].to(model.device)
            correct += int((model(xb).argmax(1).cpu() == y[i : i + 512]).sum())
    return correct / len(y)


def fit(kind: str, label: str, freeze: FreezeTraining | None, train, test, cfg: dict) -> dict:
    pl.seed_everything(0, verbose=False)
    loader = DataLoader(
        TensorDataset(*train),
        batch_size=cfg["batch"],
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    model = Classifier(kind, cfg["width"], cfg["lr"], cfg["epochs"], len(loader))
    trainer = pl.Trainer(
        accelerator="gpu" if GPU else "cpu",
        devices=1,
        max_epochs=cfg["epochs"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[freeze] if freeze else [],
    )
    if GPU:
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.fit(model, loader)
    if GPU:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    samples = trainer.global_step * cfg["batch"]
    frozen = ""
    if freeze is not None:
        frozen = ", ".join(f"{e['unit']}@{e['step']}" for e in freeze.events) or "none"
    return dict(
        label=label,
        wall=wall,
        throughput=samples / wall,
        acc=accuracy(model, test),
        frozen=frozen,
        steps=trainer.global_step,
        units=len(freeze.units) if freeze and freeze.units else None,
    )


def step_times(kind: str, cfg: dict, x: torch.Tensor, y: torch.Tensor, repeats: int) -> list[dict]:
    """Forward / backward time of one training step with the first k units frozen."""
    model = Classifier(kind, cfg["width"], cfg["lr"], 1, 1).to("cuda" if GPU else "cpu")
    model.train()
    x, y = x.to(model.device), y.to(model.device)
    units = ["stem"] + [f"blocks.{i}" for i in range(len(model.blocks))] + ["head"]
    total = sum(p.numel() for p in model.parameters())
    rows = []
    sync = torch.cuda.synchronize if GPU else (lambda: None)
    for k in range(len(units)):
        for p in model.parameters():
            p.requires_grad_(True)
        for unit in units[:k]:
            for p in model.get_submodule(unit).parameters():
                p.requires_grad_(False)
        fwd, bwd = [], []
        for rep in range(repeats + 2):
            model.zero_grad(set_to_none=True)
            sync()
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            sync()
            t1 = time.perf_counter()
            loss.backward()
            sync()
            t2 = time.perf_counter()
            if rep >= 2:  # warm-up
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
        frozen = sum(p.numel() for u in units[:k] for p in model.get_submodule(u).parameters())
        rows.append(
            dict(
                k=k,
                unit=units[k - 1] if k else "-",
                frac=frozen / total,
                fwd=1e3 * sorted(fwd)[len(fwd) // 2],
                bwd=1e3 * sorted(bwd)[len(bwd) // 2],
            )
        )
    return rows


def workload(kind: str, cfg: dict, train, test) -> tuple[list[dict], list[dict]]:
    steps_per_epoch = len(train[1]) // cfg["batch"]
    check = max(1, steps_per_epoch // 2)
    fit(kind, "warm-up", None, train, test, dict(cfg, epochs=1))  # first-fit costs (allocator, kernels) out
    configs = [
        ("standard", None),
        ("linear (start=0, end=1)", FreezeTraining(schedule="linear", verbose=False)),
        ("linear (start=0.5, end=1)", FreezeTraining(schedule=LinearSchedule(start=0.5), verbose=False)),
        (
            f"similarity (CKA>=0.99 x2, every {check} steps)",
            FreezeTraining(
                schedule=SimilaritySchedule(threshold=0.99, patience=2, check_every_n_steps=check, probe_size=256),
                verbose=False,
            ),
        ),
        ("standard (again, last)", None),
    ]
    runs = []
    for label, freeze in configs:
        run = fit(kind, label, freeze, train, test, cfg)
        print(
            f"  {kind:7s} {label:40s} {run['wall']:7.1f} s  {run['throughput']:8.0f} samples/s  "
            f"acc {100 * run['acc']:.2f}%  frozen: {run['frozen']}",
            flush=True,
        )
        runs.append(run)
    xb, yb = train[0][: cfg["batch"]], train[1][: cfg["batch"]]
    return runs, step_times(kind, cfg, xb, yb, cfg["repeats"])


def machine() -> str:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if GPU else "CPU"
    return (
        f"CPU {cpu} ({os.cpu_count()} logical cores visible, torch threads {torch.get_num_threads()}); "
        f"device {device}; torch {torch.__version__}; pytorch-lightning {pl.__version__}; "
        f"Python {platform.python_version()}; load average at the end {os.getloadavg()[0]:.1f}"
    )


def render(sections: list[tuple[str, dict, list[dict], list[dict]]], elapsed: float) -> str:
    out = [
        "## FreezeTraining",
        "",
        f"Machine: {machine()}.",
        "",
        "Produced by `python benchmarks/bench_freeze.py` "
        f"(total {elapsed:.0f} s). Same seed, data order and optimizer (SGD + Nesterov momentum, "
        "weight decay 5e-4, one-cycle LR) in every run; wall time is `trainer.fit` alone; throughput is "
        "training samples / wall second over the whole run; speed-up and Δ acc. are relative to the mean of the "
        "two standard runs (run first and last, after an untimed warm-up fit, to expose drift from machine load).",
        "",
    ]
    for title, cfg, runs, steps in sections:
        base = dict(
            throughput=(runs[0]["throughput"] + runs[-1]["throughput"]) / 2, acc=(runs[0]["acc"] + runs[-1]["acc"]) / 2
        )
        out += [
            f"### {title}",
            "",
            f"Config: {cfg['desc']}",
            "",
            "| run | wall (s) | samples/s | speed-up | test acc. | Δ acc. (points) | frozen (unit@step) |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in runs:
            out.append(
                f"| {r['label']} | {r['wall']:.1f} | {r['throughput']:.0f} "
                f"| {r['throughput'] / base['throughput']:.2f}x "
                f"| {100 * r['acc']:.2f}% | {100 * (r['acc'] - base['acc']):+.2f} | {r['frozen'] or '-'} |"
            )
        out += [
            "",
            f"One training step (batch {cfg['batch']}, median of {cfg['repeats']}) with the first k units "
            "frozen (`requires_grad=False`, as FreezeTraining does):",
            "",
            "| k | last frozen unit | params frozen | forward (ms) | backward (ms) | fwd+bwd (ms) | backward saved |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        b0 = steps[0]["bwd"]
        for s in steps:
            out.append(
                f"| {s['k']} | {s['unit']} | {100 * s['frac']:.1f}% | {s['fwd']:.2f} | {s['bwd']:.2f} | "
                f"{s['fwd'] + s['bwd']:.2f} | {100 * (1 - s['bwd'] / b0):.0f}% |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs, 2 repeats, results to a temporary file")
    args = parser.parse_args()
    if not GPU:
        # one thread: on a shared, loaded machine OpenMP threads spin against other processes
        # and make every run several times slower (and noisier); one thread keeps runs comparable
        torch.set_num_threads(1)
    start = time.perf_counter()
    sections = []
    train, test = digits_data()
    cfg = dict(
        width=32,
        lr=0.1,
        epochs=12,
        batch=64,
        repeats=20,
        desc="digits CNN (stem + 3 conv blocks + linear head, 5 units, width 32), 1437 train / 360 test, "
        "batch 64, 12 epochs",
    )
    if args.quick:
        cfg.update(epochs=2, repeats=2, desc=str(cfg["desc"]).replace("12 epochs", "2 epochs"))
    print("digits CNN", flush=True)
    runs, steps = workload("digits", cfg, train, test)
    sections.append(("Digits CNN (CPU)" if not GPU else "Digits CNN", cfg, runs, steps))

    if GPU:
        cfg = dict(width=64, lr=0.2, epochs=10, batch=256, repeats=20, n_train=20000, n_test=2000)
    else:  # reduced CPU run
        cfg = dict(width=16, lr=0.2, epochs=4, batch=64, repeats=8, n_train=1024, n_test=512)
    if args.quick:
        cfg.update(epochs=1, repeats=2, n_train=256, n_test=128)
    cfg["desc"] = (
        f"ResNet-18 layout (stem + 8 BasicBlocks + head = 10 units) at width {cfg['width']}"
        f"{'' if cfg['width'] == 64 else ' (reduced from 64 for the CPU)'}, CIFAR-shaped synthetic data "
        f"{cfg['n_train']} train / {cfg['n_test']} test, batch {cfg['batch']}, {cfg['epochs']} epochs"
    )
    train, test = cifar_like_data(cfg["n_train"], cfg["n_test"])
    print("ResNet-18-like", flush=True)
    runs, steps = workload("resnet", cfg, train, test)
    sections.append((f"ResNet-18-like, CIFAR-shaped data ({'GPU' if GPU else 'reduced CPU run'})", cfg, runs, steps))

    text = render(sections, time.perf_counter() - start)
    out = Path(tempfile.gettempdir()) / "freeze-quick.md" if args.quick else RESULTS  # a smoke test keeps the record
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print()
    print(text)


if __name__ == "__main__":
    main()
