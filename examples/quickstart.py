"""Quickstart: watch every layer of a small CNN converge, and freeze it layer by layer, in TensorBoard.

Trains a CNN on sklearn's digits (1,797 8x8 images, no download) with both callbacks:
RepresentationSimilarity compares every layer with the network at init and with the final
snapshot, and FreezeTraining freezes the layers one by one from the input side over the second
half of training. Afterwards (from a clone: ``make tensorboard``):

    tensorboard --logdir runs --samples_per_plugin images=1000

shows, under IMAGES, the labelled layer x layer heatmaps per step and the layer x step convergence
map; under SCALARS, one curve per layer (repsim/<measure>/<reference>/<NN>_<layer>, in depth order),
and under CUSTOM SCALARS one chart per measure and reference with every layer; under TEXT, the
probe, the step at which each layer reached 95 % of its final similarity and which layer froze when
(``freeze/*``). The same figures are written as PNG and CSV under
runs/digits_cnn/version_N/repsim/figures, and ``lightning-repsim report runs/digits_cnn/version_N``
draws the convergence report with the freeze events afterwards.

Run: python examples/quickstart.py [--epochs 12] [--out runs]
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsCNN, digits_dataloaders

from lightning_repsim import FreezeTraining, RepresentationSimilarity
from lightning_repsim.callbacks import LinearSchedule


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
    freeze = FreezeTraining(schedule=LinearSchedule(start=0.5))  # the second half of training, input side first
    logger = TensorBoardLogger(args.out, name="digits_cnn")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[monitor, freeze],
        logger=logger,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    trainer.fit(DigitsCNN(), train, val)
    print(f"\nval_acc = {trainer.callback_metrics['val_acc']:.3f}")
    print(f"layers (execution order): {monitor.layer_names}")
    frozen = ", ".join(f"{event['unit']} at step {event['step']}" for event in freeze.events)
    print(f"frozen: {frozen or 'nothing'}")
    print(f"snapshot store: {monitor.store_path}")
    print(f"figures: {Path(logger.log_dir) / 'repsim' / 'figures'}")
    tensorboard = f"{command('tensorboard')} --logdir {shlex.quote(args.out)} --samples_per_plugin images=1000"
    print(f"open TensorBoard: {tensorboard}")
    print(f"convergence report: {command('lightning-repsim')} report {shlex.quote(os.path.relpath(logger.log_dir))}")


def command(name: str) -> str:
    """How to call a console script from here: the one next to this Python (``.venv/bin/...`` after
    ``make demo``) when it is there, else its name on PATH."""
    script = Path(sys.executable).parent / name
    return shlex.quote(os.path.relpath(script)) if script.exists() else name


if __name__ == "__main__":
    main()
