"""The layer-identification sanity check of Kornblith et al. 2019 (Section 6.1, Table 2), on digits.

Train ``--seeds`` architecturally identical CNNs from different random initialisations. For every
ordered pair of networks (A, B) and every layer l of A, find the layer of B most similar to it
(argmax over B's layers); the similarity index "identifies" l when that argmax is l itself. The
accuracy is the fraction of (pair, layer) cases identified, averaged over all ordered pairs. A good
index finds the architecturally corresponding layer; Kornblith et al. found that CKA does (99 %)
and the CCA family does not (10-15 %).

Our networks are a plain 9-layer CNN on sklearn's 8x8 digits (6 conv + 2 hidden fully connected
layers + logits; BatchNorm; the paper used 10-layer All-CNN-C-like nets on CIFAR-10 and 10 seeds).
As in the paper, the logits layer is excluded and layers are the post-ReLU activations. The probe
is the 397 validation images. Conv maps are average pooled to at most ``--max-features`` features
per layer *for every measure*, so that the CCA-family measures are defined: with n = 397 examples,
CCA needs the two sides' dimensions kx + ky < n - 1 (otherwise some canonical correlations are 1
for any data and the library returns NaN). A NaN row counts as a miss and is reported.

Writes, under --out: one heatmap per measure for the first seed pair, a bar chart of the
accuracies beside the paper's, and accuracies.csv.

Run: python examples/sanity_check.py [--seeds 5] [--epochs 20] [--max-features 128] [--quick]
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
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import N_TRAIN, DigitsCNN, digits_dataloaders, digits_tensors  # noqa: E402

from lightning_repsim import RepSimWarning, compare  # noqa: E402

# measure label -> (library measure, options)
MEASURES = OrderedDict([
    ("CKA (linear)", ("linear_cka", {})),
    ("CKA (RBF 0.8)", ("rbf_cka", {"sigma": 0.8})),
    ("CKA (RBF 0.4)", ("rbf_cka", {"sigma": 0.4})),
    ("debiased CKA", ("debiased_cka", {})),
    ("RV2", ("rv2", {})),
    ("RV (= linear CKA)", ("rv", {})),
    ("SVCCA (ρ̄, keep 0.99)", ("svcca", {"keep": 0.99})),
    ("PWCCA", ("pwcca", {})),
])

#: Kornblith et al. 2019, Table 2 (10 ten-layer CNNs on CIFAR-10, logits excluded), in percent.
PAPER = OrderedDict([
    ("CCA (ρ̄)", 1.4), ("CCA (R²)", 10.6), ("SVCCA (ρ̄)", 9.9), ("SVCCA (R²)", 15.1), ("PWCCA", 11.1),
    ("Linear Reg.", 45.4), ("Linear HSIC", 22.2), ("CKA (Linear)", 99.3), ("CKA (RBF 0.2)", 80.6),
    ("CKA (RBF 0.4)", 99.1), ("CKA (RBF 0.8)", 99.3),
])
PAPER_FOR = {"CKA (linear)": "CKA (Linear)", "CKA (RBF 0.8)": "CKA (RBF 0.8)", "CKA (RBF 0.4)": "CKA (RBF 0.4)",
             "SVCCA (ρ̄, keep 0.99)": "SVCCA (ρ̄)", "PWCCA": "PWCCA"}


class PlainCNN(DigitsCNN):
    """9 layers: conv1-conv6 (3x3, BatchNorm, ReLU; stride 2 at conv3 and conv5), fc7, fc8, logits."""

    def __init__(self, lr: float = 1e-3, width: int = 32) -> None:
        super().__init__(lr=lr, width=width)
        w = width
        blocks: list[tuple[str, nn.Module]] = []
        for i, (c_in, c_out, stride) in enumerate([(1, w, 1), (w, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1),
                                                   (2 * w, 4 * w, 2), (4 * w, 4 * w, 1)], start=1):
            blocks += [(f"conv{i}", nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)),
                       (f"bn{i}", nn.BatchNorm2d(c_out)), (f"relu{i}", nn.ReLU())]
        self.features = nn.Sequential(OrderedDict(blocks))  # 8x8 -> 4x4 (conv3) -> 2x2 (conv5)
        self.classifier = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc7", nn.Linear(4 * w * 2 * 2, 128)), ("relu7", nn.ReLU()),
            ("fc8", nn.Linear(128, 64)), ("relu8", nn.ReLU()),
            ("logits", nn.Linear(64, 10)),
        ]))


def train(seed: int, epochs: int) -> tuple[PlainCNN, float]:
    pl.seed_everything(seed, workers=False)
    model = PlainCNN()
    train_loader, val_loader = digits_dataloaders(seed=seed)
    trainer = pl.Trainer(max_epochs=epochs, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, train_loader, val_loader)
    return model.eval(), float(trainer.callback_metrics["val_acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--max-features", type=int, default=128,
                        help="cap on features per conv layer (average pooling) for every measure")
    parser.add_argument("--out", default="examples/output/sanity_check")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is as fast for these small nets and robust on a busy machine)")
    parser.add_argument("--quick", action="store_true", help="3 seeds, 4 epochs")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs = 3, 4
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
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        model, acc = train(seed, args.epochs)
        models.append(model)
        accuracies.append(acc)
        print(f"seed {seed}: val_acc = {acc:.3f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    train_seconds = time.perf_counter() - start

    images, _ = digits_tensors()
    probe = images[N_TRAIN:]  # the 397 validation images
    layers = nn.ReLU  # post-activation outputs of conv1-conv6, fc7, fc8; the logits are not a ReLU
    names = {label: m for label, (m, _) in MEASURES.items()}
    options = {label: o for label, (_, o) in MEASURES.items()}

    hits = {label: 0 for label in MEASURES}
    near = {label: 0 for label in MEASURES}  # argmax within one layer of the right one
    nan_rows = {label: 0 for label in MEASURES}
    confusion = {label: None for label in MEASURES}
    total = 0
    first_pair = None
    layer_names: list[str] = []
    # two compare() calls per ordered pair: rbf_cka appears with two bandwidths
    calls = [[label for label in MEASURES if label != "CKA (RBF 0.4)"], ["CKA (RBF 0.4)"]]
    t0 = time.perf_counter()
    for a, b in itertools.permutations(range(args.seeds), 2):
        matrices = {}
        for group in calls:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RepSimWarning)
                result = compare(models[a], models[b], probe=probe, measures=[names[label] for label in group],
                                 layers=layers, measure_options={names[label]: options[label] for label in group},
                                 max_features=args.max_features, names=(f"seed {a}", f"seed {b}"))
            for label in group:
                matrices[label] = result[names[label]].cpu().numpy()
        layer_names = [n.split(".")[-1] for n in result.layers_a]
        if first_pair is None:
            first_pair = (a, b, matrices)
        n_layers = len(layer_names)
        total += n_layers
        for label, matrix in matrices.items():
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
    compare_seconds = time.perf_counter() - t0

    # layer widths after the reduction, for the CCA degeneracy statement
    from lightning_repsim.capture import capture
    feats = capture(models[0], probe, layers, max_features=args.max_features)
    widths = {name.split(".")[-1]: f.shape[1] for name, f in feats.items()}
    n = probe.shape[0]
    pairs = args.seeds * (args.seeds - 1)

    print(f"\n{args.seeds} seeds x {args.epochs} epochs; val_acc mean {np.mean(accuracies):.3f} "
          f"(min {min(accuracies):.3f}); {pairs} ordered seed pairs x {len(layer_names)} layers = {total} cases")
    print(f"probe: the {n} validation images; layers (post-ReLU): {', '.join(layer_names)}")
    print(f"features per layer after pooling conv maps to <= {args.max_features}: "
          + ", ".join(f"{k} {v}" for k, v in widths.items()))
    largest = sorted(widths.values())[-2:]
    print(f"CCA is defined when kx + ky < n - 1 = {n - 1}; the widest pair here has {sum(largest)} features "
          f"({'defined' if sum(largest) < n - 1 else 'DEGENERATE: NaN'}).")
    print("\nLayer-identification accuracy (argmax over the other seed's layers == same layer)")
    print(f"{'measure':<24} {'ours (digits)':>14} {'within ±1':>10} {'NaN rows':>9} {'paper':>7}")
    rows = []
    for label in MEASURES:
        accuracy = 100.0 * hits[label] / total
        paper = PAPER.get(PAPER_FOR.get(label, ""), None)
        print(f"{label:<24} {accuracy:>13.1f}% {100.0 * near[label] / total:>9.1f}% {nan_rows[label]:>9d} "
              + (f"{paper:>6.1f}%" if paper is not None else f"{'—':>7}"))
        rows.append([label, names[label], options[label], f"{accuracy:.2f}", f"{100.0 * near[label] / total:.2f}",
                     nan_rows[label], total,
                     "" if paper is None else paper])
    print("paper = Kornblith et al. 2019, Table 2 (10 ten-layer CNNs, CIFAR-10, logits excluded). Its other rows: "
          + ", ".join(f"{k} {v}%" for k, v in PAPER.items() if k not in PAPER_FOR.values()))

    print(f"chance (uniform argmax): {100.0 / len(layer_names):.1f}%")
    for label in ("CKA (linear)", "SVCCA (ρ̄, keep 0.99)"):
        print(f"\nwhere the argmax lands, {label} (rows: layer of seed A, columns: argmax layer of seed B, "
              f"counts over {pairs} ordered pairs)")
        print(" " * 8 + "".join(f"{n:>7}" for n in layer_names))
        for name, row in zip(layer_names, confusion[label]):
            print(f"{name:<8}" + "".join(f"{v:>7d}" for v in row))

    with open(out / "accuracies.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "measure", "options", "accuracy_percent", "within_one_layer_percent", "nan_rows",
                         "cases", "paper_percent"])
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
        axis.set_xlabel(f"seed {b}", fontsize=8)
        axis.set_ylabel(f"seed {a}", fontsize=8)
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    figure.suptitle(f"seed {a} vs seed {b} on {n} validation images (cyan: row argmax)", fontsize=11)
    figure.tight_layout()
    figure.savefig(out / "heatmaps_seed_pair.png", dpi=110)
    plt.close(figure)

    # the library's own heatmap for linear CKA too (Comparison.plot)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RepSimWarning)
        comparison = compare(models[a], models[b], probe=probe, measures=("linear_cka", "svcca"), layers=layers,
                             max_features=args.max_features, names=(f"seed {a}", f"seed {b}"))
    comparison.plot("linear_cka", out / "linear_cka_seed_pair.png")
    comparison.plot("svcca", out / "svcca_seed_pair.png")
    comparison.to_csv(out / "seed_pair_csv")

    # bar chart: ours beside the paper's
    figure, axis = plt.subplots(figsize=(9, 4.2))
    labels = list(MEASURES)
    ours = [100.0 * hits[label] / total for label in labels]
    x = np.arange(len(labels))
    axis.bar(x - 0.2, ours, 0.4, label=f"ours: digits, {args.seeds} seeds, 8 layers", color="C0")
    paper = [PAPER.get(PAPER_FOR.get(label, ""), np.nan) for label in labels]
    axis.bar(x + 0.2, paper, 0.4, label="Kornblith et al. 2019, Table 2 (CIFAR-10)", color="C7")
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

    print(f"\nfigures: {out / 'heatmaps_seed_pair.png'}, {out / 'linear_cka_seed_pair.png'}, "
          f"{out / 'svcca_seed_pair.png'}, {out / 'accuracy_bars.png'}; table: {out / 'accuracies.csv'}")
    print(f"runtime: {time.perf_counter() - start:.1f} s (training {train_seconds:.1f} s, "
          f"comparisons {compare_seconds:.1f} s)")


if __name__ == "__main__":
    main()
