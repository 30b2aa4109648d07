"""Quickstart: watch every layer of a small CNN converge, in TensorBoard.

Trains a CNN on sklearn's digits (1,797 8x8 images, no download) with RepresentationSimilarity
against the network at init and against the final snapshot. Afterwards:

    tensorboard --logdir runs --samples_per_plugin images=0

shows, under IMAGES, the labelled layer x layer heatmaps per step and the layer x step convergence
map; under SCALARS, one curve per layer (repsim/<measure>/<reference>/<layer>); under TEXT, the
probe and the step at which each layer reached 95 % of its final similarity. The same figures are
written as PNG and CSV under runs/digits_cnn/version_N/repsim/figures.

Run: python examples/quickstart.py [--epochs 12] [--out runs]
"""

import argparse
import sys
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsCNN, digits_dataloaders

from lightning_repsim import RepresentationSimilarity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", default="runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pl.seed_everything(args.seed)
    train, val = digits_dataloaders(seed=args.seed)
    monitor = RepresentationSimilarity(
        probe="val:256",  # the first 256 validation images, fixed and hashed
        reference=["init", "final"],
        measures=("linear_cka", "rv2"),
        every_n_epochs=1,
    )
    logger = TensorBoardLogger(args.out, name="digits_cnn")
    trainer = pl.Trainer(
        max_epochs=args.epochs, callbacks=[monitor], logger=logger, enable_model_summary=False, log_every_n_steps=10
    )
    trainer.fit(DigitsCNN(), train, val)
    print(f"\nval_acc = {trainer.callback_metrics['val_acc']:.3f}")
    print(f"layers (execution order): {monitor.layer_names}")
    print(f"snapshot store: {monitor.store_path}")
    print(f"figures: {Path(logger.log_dir) / 'repsim' / 'figures'}")
    print(f"open TensorBoard: tensorboard --logdir {args.out} --samples_per_plugin images=0")


if __name__ == "__main__":
    main()
