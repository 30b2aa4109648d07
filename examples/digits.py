"""Shared by the examples and benchmarks: sklearn's digits (ships offline) and a small CNN on them."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_TRAIN = 1400  # of 1,797 images; the remaining 397 are the validation split


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 digit images as (N, 1, 8, 8) float32 in [0, 1], and their labels."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target)


def digits_dataloaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Train (shuffled with ``seed``) and validation loaders; the split is fixed."""
    images, labels = digits_tensors()
    train = TensorDataset(images[:N_TRAIN], labels[:N_TRAIN])
    val = TensorDataset(images[N_TRAIN:], labels[N_TRAIN:])
    generator = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator),
        DataLoader(val, batch_size=256),
    )


class DigitsCNN(pl.LightningModule):
    """Three conv blocks and two fully connected layers: 5 layers with parameters, in depth order."""

    def __init__(self, lr: float = 1e-3, width: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
