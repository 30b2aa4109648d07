"""The layer-identification sanity check of Kornblith et al. 2019 (Section 6.1, Table 2), on digits.

Train ``--seeds`` architecturally identical CNNs from different random initialisations. For every
ordered pair of networks (A, B) and every layer l of A, find the layer of B most similar to it
(argmax over B's layers); the similarity index "identifies" l when that argmax is l itself. The
accuracy is the fraction of (pair, layer) cases identified, averaged over all ordered pairs. A good
index finds the architecturally corresponding layer; Kornblith et al. found that CKA does (99 %)
and the CCA family does not (10-15 %).

The network has the layout of the paper's own Table 2 network, the 10-layer "Tiny-10" CNN of its
appendix, adapted to sklearn's 8x8 digits (``Tiny10``): eight convs with 32, 32, 64, 64, 64, 128,
128 and 128 channels, 3x3 except the last (1x1), stride 2 at conv3 and conv6, no padding at conv7,
each followed by BatchNorm and ReLU; then global average pooling and a linear logits layer, with no
hidden fully connected layer. ``forward`` upsamples the digits to 16x16 (bilinear), so the maps
of conv1-conv8 are 16, 16, 8, 8, 8, 4, 2 and 2 pixels wide. Training: Adam with a one-cycle
learning-rate schedule (peak 3e-3, stepped per batch), ``--epochs`` epochs, batch 64. The paper
trained 10 seeds on CIFAR-10; we train ``--seeds`` (default 5).

As in the paper, the logits layer is excluded and the compared layers are the eight post-ReLU
outputs, relu1-relu8. The probe is the 397 validation images (at 8x8; the network upsamples them).
Conv maps are average pooled to at most ``--max-features`` (512) features per layer for the CKA/RV
measures and to at most ``--cca-max-features`` (192) for SVCCA and PWCCA. With n = 397 examples,
CCA needs the two sides' compared dimensions kx + ky < n - 1; otherwise some canonical correlations
are 1 for any data and the library returns NaN. At 192 the widest layers have 128 features, so
every pair is defined. At 512, PWCCA, which compares each layer's full rank, has a NaN in every row
(SVCCA keeps only the directions that hold 99 % of the variance and may stay defined). So each
network's layers are captured twice, once per cap. A NaN row counts as a miss and is reported.

Writes, under --out: one heatmap per measure for the first seed pair, the library's own heatmaps of
linear CKA and SVCCA for that pair (``compare``, ``Comparison.plot``) with their matrices as CSV
(seed_pair_csv/), a bar chart of the accuracies beside the paper's, and accuracies.csv.

Run: python examples/sanity_check.py [--seeds 5] [--epochs 10] [--max-features 512] [--cca-max-features 192]
     [--quick]
"""

from __future__ import annotations

import argparse
import csv
import itertools
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import N_TRAIN, DigitsCNN, digits_dataloaders, digits_tensors

from lightning_repsim import RepSimWarning, compare
from lightning_repsim.capture import capture
from lightning_repsim.functional import Representations, interval_matrix, similarity_matrix
from lightning_repsim.functional.intervals import INTERVAL_MEASURES
from lightning_repsim.report import row_ties

# measure label -> (library measure, options)
MEASURES = OrderedDict(
    [
        ("CKA (linear)", ("linear_cka", {})),
        ("CKA (RBF 0.8)", ("rbf_cka", {"sigma": 0.8})),
        ("CKA (RBF 0.4)", ("rbf_cka", {"sigma": 0.4})),
        ("debiased CKA", ("debiased_cka", {})),
        ("RV2", ("rv2", {})),
        ("RV (= linear CKA)", ("rv", {})),
        ("SVCCA (ρ̄, keep 0.99)", ("svcca", {"keep": 0.99})),
        ("PWCCA", ("pwcca", {})),
    ]
)

#: Kornblith et al. 2019, Table 2 (10 Tiny-10 CNNs on CIFAR-10, logits excluded), in percent.
PAPER = OrderedDict(
    [
        ("CCA (ρ̄)", 1.4),
        ("CCA (R²)", 10.6),
        ("SVCCA (ρ̄)", 9.9),
        ("SVCCA (R²)", 15.1),
        ("PWCCA", 11.1),
        ("Linear Reg.", 45.4),
        ("Linear HSIC", 22.2),
        ("CKA (Linear)", 99.3),
        ("CKA (RBF 0.2)", 80.6),
        ("CKA (RBF 0.4)", 99.1),
        ("CKA (RBF 0.8)", 99.3),
    ]
)
#: measured on layers pooled to --cca-max-features, the others to --max-features
CCA = ("SVCCA (ρ̄, keep 0.99)", "PWCCA")
PAPER_FOR = {
    "CKA (linear)": "CKA (Linear)",
    "CKA (RBF 0.8)": "CKA (RBF 0.8)",
    "CKA (RBF 0.4)": "CKA (RBF 0.4)",
    "SVCCA (ρ̄, keep 0.99)": "SVCCA (ρ̄)",
    "PWCCA": "PWCCA",
}


def names_of(label: str) -> str:
    """The library measure of a row label."""
    return MEASURES[label][0]


def tiny10_convs(w: int) -> list[tuple[int, int, int, int, int]]:
    """Tiny-10's eight convs as (c_in, c_out, kernel, stride, padding) for width ``w``."""
    return [
        (1, w, 3, 1, 1),
        (w, w, 3, 1, 1),
        (w, 2 * w, 3, 2, 1),
        (2 * w, 2 * w, 3, 1, 1),
        (2 * w, 2 * w, 3, 1, 1),
        (2 * w, 4 * w, 3, 2, 1),
        (4 * w, 4 * w, 3, 1, 0),
        (4 * w, 4 * w, 1, 1, 0),
    ]


class Tiny10(DigitsCNN):
    """Kornblith et al.'s Tiny-10 on 16x16 digits: conv1-conv8 (BatchNorm, ReLU), global average pool, logits."""

    def __init__(self, lr: float = 3e-3, width: int = 32) -> None:
        super().__init__(lr=lr, width=width)
        blocks: list[tuple[str, nn.Module]] = []
        for i, (c_in, c_out, kernel, stride, padding) in enumerate(tiny10_convs(width), start=1):
            blocks += [
                (f"conv{i}", nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)),
                (f"bn{i}", nn.BatchNorm2d(c_out)),
                (f"relu{i}", nn.ReLU()),
            ]
        self.features = nn.Sequential(OrderedDict(blocks))  # 16x16 -> 8x8 (conv3) -> 4x4 (conv6) -> 2x2 (conv7)
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("pool", nn.AdaptiveAvgPool2d(1)),
                    ("flatten", nn.Flatten()),
                    ("logits", nn.Linear(4 * width, 10)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        return self.classifier(self.features(x))

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def train(seed: int, epochs: int) -> tuple[Tiny10, float]:
    pl.seed_everything(seed, workers=False)
    model = Tiny10()
    train_loader, val_loader = digits_dataloaders(seed=seed)
    trainer = pl.Trainer(
        max_epochs=epochs,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, train_loader, val_loader)
    return model.eval(), float(trainer.callback_metrics["val_acc"])


def main(argv: list[str] | None = None) -> dict:
    """Run the example; print the findings and return them as numbers (examples/results.py formats them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="the seeds are first-seed, first-seed + 1, ...")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--max-features",
        type=int,
        default=512,
        help="cap on features per conv layer (average pooling) for the CKA and RV measures",
    )
    parser.add_argument(
        "--cca-max-features",
        type=int,
        default=192,
        help="the same cap for SVCCA and PWCCA; CCA needs kx + ky < n - 1 = 396",
    )
    parser.add_argument("--out", default="examples/output/sanity_check")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is as fast for these small nets and robust on a busy machine)",
    )
    parser.add_argument("--quick", action="store_true", help="3 seeds, 3 epochs")
    parser.add_argument(
        "--interval", type=float, default=0.95, help="coverage of the intervals that tell a tie from a miss"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = min(args.seeds, 3), min(args.epochs, 3)
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models, accuracies = [], []
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    for seed in seeds:
        t0 = time.perf_counter()
        model, acc = train(seed, args.epochs)
        models.append(model)
        accuracies.append(acc)
        print(f"seed {seed}: val_acc = {acc:.3f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    train_seconds = time.perf_counter() - start

    images, _ = digits_tensors()
    probe = images[N_TRAIN:]  # the 397 validation images
    layers = nn.ReLU  # post-activation outputs of conv1-conv8; the logits are not a ReLU
    names = {label: m for label, (m, _) in MEASURES.items()}
    options = {label: o for label, (_, o) in MEASURES.items()}

    hits = dict.fromkeys(MEASURES, 0)
    near = dict.fromkeys(MEASURES, 0)  # argmax within one layer of the right one
    gaps = {label: [] for label in MEASURES}  # per miss: the row's maximum minus the same-layer value
    nan_rows = dict.fromkeys(MEASURES, 0)
    # misses that are statistical ties: the same-layer cell's interval overlaps the best cell's
    # ("overlap"), or the same-layer value lies inside the best cell's interval ("inside")
    ties = {label: {"overlap": 0, "inside": 0} for label in MEASURES if names_of(label) in INTERVAL_MEASURES}
    confusion = dict.fromkeys(MEASURES)
    # the CCA family needs a lower feature cap than the CKA family (see the docstring). Each network's
    # layers are captured once per cap; Representations keeps their centred features and Grams for
    # every pair and measure that meets them.
    caps = {label: args.cca_max_features if label in CCA else args.max_features for label in MEASURES}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RepSimWarning)
        features = {
            cap: [capture(model, probe, layers, max_features=cap) for model in models]
            for cap in sorted(set(caps.values()))
        }
        representations = {cap: [Representations(f) for f in per_model] for cap, per_model in features.items()}
        layer_names = [name.split(".")[-1] for name in features[args.max_features][0]]
        n_layers = len(layer_names)
        total = 0
        first_pair = None
        for a, b in itertools.permutations(range(args.seeds), 2):
            matrices, bounds = {}, {}
            for label, cap in caps.items():
                if label in ties:
                    result = interval_matrix(
                        representations[cap][a], representations[cap][b], names[label], args.interval, **options[label]
                    )
                    matrix = result.value
                    bounds[label] = (result.low.cpu().numpy(), result.high.cpu().numpy())
                else:
                    matrix = similarity_matrix(
                        representations[cap][a], representations[cap][b], names[label], **options[label]
                    )
                matrices[label] = matrix.cpu().numpy()
            if first_pair is None:
                first_pair = (a, b, matrices)
            total += n_layers
            for label, matrix in matrices.items():
                tied = row_ties(matrix, *bounds[label]) if label in bounds else None
                if confusion[label] is None:
                    confusion[label] = np.zeros((n_layers, n_layers), dtype=int)
                for i in range(n_layers):
                    row = matrix[i]
                    if not np.isfinite(row).all():
                        nan_rows[label] += 1
                        continue
                    j = int(np.argmax(row))
                    confusion[label][i, j] += 1
                    hits[label] += int(j == i)
                    near[label] += int(abs(j - i) <= 1)
                    if j != i:
                        gaps[label].append(float(row[j] - row[i]))
                        if tied is not None:
                            low, high = bounds[label][0][i, j], bounds[label][1][i, j]
                            ties[label]["overlap"] += int(tied[i, i])
                            ties[label]["inside"] += int(low <= row[i] <= high)
    compare_seconds = time.perf_counter() - t0

    n = probe.shape[0]
    pairs = args.seeds * (args.seeds - 1)
    print(
        f"\nseeds {seeds[0]}-{seeds[-1]} x {args.epochs} epochs; val_acc mean {np.mean(accuracies):.3f} "
        f"(min {min(accuracies):.3f}); {pairs} ordered seed pairs x {n_layers} layers = {total} cases"
    )
    print(f"probe: the {n} validation images; layers (post-ReLU): {', '.join(layer_names)}")
    for family, max_features in (("CKA/RV", args.max_features), ("SVCCA/PWCCA", args.cca_max_features)):
        widths = [f.shape[1] for f in features[max_features][0].values()]
        largest = sum(sorted(widths)[-2:])
        print(
            f"{family}: features per layer after pooling conv maps to <= {max_features}: "
            + ", ".join(f"{name} {width}" for name, width in zip(layer_names, widths))
            + f"; widest pair {largest} features "
            + (
                f"< n - 1 = {n - 1}: CCA always defined"
                if largest < n - 1
                else f">= n - 1 = {n - 1}: CCA may be degenerate"
            )
        )
    print("\nLayer-identification accuracy (argmax over the other seed's layers == same layer)")
    print(
        f"{'measure':<24} {'ours (digits)':>14} {'within ±1':>10} {'NaN rows':>9} {'misses':>7} "
        f"{'ties':>5} {'inside':>7} {'paper':>7}"
    )
    rows = []
    results: dict = {
        "seeds": args.seeds,
        "epochs": args.epochs,
        "first_seed": args.first_seed,
        "val_acc_mean": round(float(np.mean(accuracies)), 4),
        "val_acc_min": round(float(min(accuracies)), 4),
        "val_acc_max": round(float(max(accuracies)), 4),
        "pairs": pairs,
        "n": n,
        "layers": layer_names,
        "train_s": round(train_seconds, 1),
        "compare_s": round(compare_seconds, 1),
        "cases": total,
        "interval": args.interval,
        "measures": {},
    }
    for label in MEASURES:
        accuracy = 100.0 * hits[label] / total
        paper = PAPER.get(PAPER_FOR.get(label, ""), None)
        misses = total - hits[label]
        tie = ties.get(label)
        print(
            f"{label:<24} {accuracy:>13.1f}% {100.0 * near[label] / total:>9.1f}% {nan_rows[label]:>9d} {misses:>7d} "
            + (f"{tie['overlap']:>5d} {tie['inside']:>7d} " if tie else f"{'—':>5} {'—':>7} ")
            + (f"{paper:>6.1f}%" if paper is not None else f"{'—':>7}")
        )
        results["measures"][label] = {
            "accuracy": round(accuracy, 1),
            "within_one": round(100.0 * near[label] / total, 1),
            "nan_rows": nan_rows[label],
            "misses": misses,
            "ties": None if tie is None else tie["overlap"],
            "ties_inside": None if tie is None else tie["inside"],
            "median_gap": round(float(np.median(gaps[label])), 4) if gaps[label] else None,
            "largest_gap": round(float(max(gaps[label])), 4) if gaps[label] else None,
            "confusion": confusion[label].tolist() if confusion[label] is not None else None,
            "paper": paper,
        }
        rows.append(
            [
                label,
                names[label],
                options[label],
                f"{accuracy:.2f}",
                f"{100.0 * near[label] / total:.2f}",
                nan_rows[label],
                total,
                "" if paper is None else paper,
            ]
        )
    print(
        "paper = Kornblith et al. 2019, Table 2 (10 Tiny-10 CNNs, CIFAR-10, logits excluded). Its other rows: "
        + ", ".join(f"{k} {v}%" for k, v in PAPER.items() if k not in PAPER_FOR.values())
    )

    print(f"chance (uniform argmax): {100.0 / len(layer_names):.1f}%")
    print(
        f"ties: misses whose same-layer {args.interval:g} interval overlaps the best layer's; inside: misses whose "
        "same-layer value lies inside the best layer's interval (no interval for SVCCA and PWCCA)"
    )
    print("\nhow near the misses are: the row's maximum minus the same-layer value")
    for label, gap in gaps.items():
        if gap:
            print(f"{label:<24} {len(gap):>4} misses: median {np.median(gap):.4f}, largest {max(gap):.4f}")
    for label in ("CKA (linear)", "SVCCA (ρ̄, keep 0.99)", "PWCCA"):
        print(
            f"\nwhere the argmax lands, {label} (rows: layer of seed A, columns: argmax layer of seed B, "
            f"counts over {pairs} ordered pairs)"
        )
        print(" " * 8 + "".join(f"{n:>7}" for n in layer_names))
        for name, row in zip(layer_names, confusion[label]):
            print(f"{name:<8}" + "".join(f"{v:>7d}" for v in row))

    with open(out / "accuracies.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "label",
                "measure",
                "options",
                "accuracy_percent",
                "within_one_layer_percent",
                "nan_rows",
                "cases",
                "paper_percent",
            ]
        )
        writer.writerows(rows)

    # heatmaps for the first seed pair, one per measure, in one figure
    a, b, matrices = first_pair
    cols = 4
    figure, axes = plt.subplots(2, cols, figsize=(4.0 * cols, 8.0))
    for axis, (label, matrix) in zip(axes.ravel(), matrices.items()):
        image = axis.imshow(matrix, vmin=min(0.0, np.nanmin(matrix)), vmax=1.0, cmap="magma", origin="upper")
        axis.set_xticks(range(len(layer_names)), layer_names, rotation=90, fontsize=7)
        axis.set_yticks(range(len(layer_names)), layer_names, fontsize=7)
        for i in range(len(layer_names)):
            row = matrix[i]
            if np.isfinite(row).all():
                j = int(np.argmax(row))
                axis.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=1.5))
        axis.set_title(label, fontsize=9)
        axis.set_xlabel(f"seed {seeds[b]}", fontsize=8)
        axis.set_ylabel(f"seed {seeds[a]}", fontsize=8)
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    figure.suptitle(f"seed {seeds[a]} vs seed {seeds[b]} on {n} validation images (cyan: row argmax)", fontsize=11)
    figure.tight_layout()
    figure.savefig(out / "heatmaps_seed_pair.png", dpi=110)
    plt.close(figure)

    # the same pair through the library's one-call API, which makes its own heatmaps and CSVs
    for measure, max_features in (("linear_cka", args.max_features), ("svcca", args.cca_max_features)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RepSimWarning)
            comparison = compare(
                models[a],
                models[b],
                probe=probe,
                measures=(measure,),
                layers=layers,
                max_features=max_features,
                names=(f"seed {seeds[a]}", f"seed {seeds[b]}"),
            )
        comparison.plot(measure, out / f"{measure}_seed_pair.png")
        comparison.to_csv(out / "seed_pair_csv")

    # bar chart: ours beside the paper's
    figure, axis = plt.subplots(figsize=(9, 4.2))
    labels = list(MEASURES)
    ours = [100.0 * hits[label] / total for label in labels]
    x = np.arange(len(labels))
    axis.bar(x - 0.2, ours, 0.4, label=f"ours: Tiny-10 on digits, {args.seeds} seeds, 8 layers", color="C0")
    paper = [PAPER.get(PAPER_FOR.get(label, ""), np.nan) for label in labels]
    axis.bar(x + 0.2, paper, 0.4, label="Kornblith et al. 2019, Table 2 (Tiny-10, CIFAR-10)", color="C7")
    for xi, v in zip(x, ours):
        axis.text(xi - 0.2, v + 1, f"{v:.0f}", ha="center", fontsize=7)
    axis.axhline(100.0 / len(layer_names), color="grey", linestyle=":", linewidth=1)
    axis.text(len(labels) - 0.5, 100.0 / len(layer_names) + 1, "chance", ha="right", fontsize=7, color="grey")
    axis.set_xticks(x, labels, rotation=25, ha="right", fontsize=8)
    axis.set_ylabel("layer-identification accuracy (%)")
    axis.set_ylim(0, 108)
    axis.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    figure.savefig(out / "accuracy_bars.png", dpi=130)
    plt.close(figure)

    print(
        f"\nfigures: {out / 'heatmaps_seed_pair.png'}, {out / 'linear_cka_seed_pair.png'}, "
        f"{out / 'svcca_seed_pair.png'}, {out / 'accuracy_bars.png'}; table: {out / 'accuracies.csv'}"
    )
    print(
        f"runtime: {time.perf_counter() - start:.1f} s (training {train_seconds:.1f} s, "
        f"comparisons {compare_seconds:.1f} s)"
    )
    return results


if __name__ == "__main__":
    main()
