"""Scalars, images and text to every Lightning logger of a Trainer, each through the API it has.

Scalars go to every logger (``log_metrics``: TensorBoard, CSV, MLflow, W&B, ...). Images go to the
loggers that store images: TensorBoard (an image summary, PNG bytes as encoded once), MLflow (a
PNG artifact ``<tag>/step-<step>.png`` of the run) and W&B (``log_image``). Text goes to TensorBoard
(its text plugin renders markdown) and MLflow (a ``.md`` artifact). Loggers without such an API
get the scalars only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lightning_repsim.report.tensorboard import TensorBoardReporter, make_tag

__all__ = ["LoggerSink"]


def decode_png(png: bytes) -> np.ndarray:
    """PNG bytes back to an ``(H, W, C)`` ``uint8`` array."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as decoded:
        return np.asarray(decoded.convert("RGB"))


def _logger_kind(logger: Any) -> str:
    """``"tensorboard"``, ``"mlflow"``, ``"wandb"`` or ``"other"`` (Lightning's logger classes, imported lazily)."""
    from pytorch_lightning import loggers

    for kind, name in (("tensorboard", "TensorBoardLogger"), ("mlflow", "MLFlowLogger"), ("wandb", "WandbLogger")):
        cls = getattr(loggers, name, None)
        if cls is not None and isinstance(logger, cls):
            return kind
    return "other"


class LoggerSink:
    """Sends what the monitor reports to the Trainer's loggers (call it on global rank 0).

    Args:
        loggers: ``trainer.loggers``.

    Attributes:
        tensorboard: a reporter on the first TensorBoard logger, for what only TensorBoard shows
            (custom-scalars layout), or None.
    """

    def __init__(self, loggers: Sequence[Any]) -> None:
        self.loggers = [(logger, _logger_kind(logger)) for logger in loggers]
        self.tensorboard: TensorBoardReporter | None = next(
            (TensorBoardReporter(lg.experiment) for lg, kind in self.loggers if kind == "tensorboard"), None
        )

    @property
    def kinds(self) -> list[str]:
        return [kind for _, kind in self.loggers]

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """``{tag: value}`` at ``step`` to every logger (NaN stays NaN: a degenerate layer shows at its step)."""
        values = {tag: float(value) for tag, value in metrics.items()}
        for logger, _ in self.loggers:
            logger.log_metrics(values, step=int(step))

    def log_png(self, tag: str, png: bytes, step: int) -> None:
        """One PNG-encoded image: as it is to TensorBoard, decoded to an array for MLflow and W&B."""
        tag = make_tag(tag)
        image = None
        for logger, kind in self.loggers:
            if kind == "tensorboard":
                TensorBoardReporter(logger.experiment).log_png(tag, png, step)
                continue
            if kind in ("mlflow", "wandb") and image is None:
                image = decode_png(png)
            if kind == "mlflow":
                logger.experiment.log_image(logger.run_id, image, artifact_file=f"{tag}/step-{int(step):08d}.png")
            elif kind == "wandb":
                logger.log_image(key=tag, images=[image], step=int(step))

    def log_text(self, tag: str, markdown: str, step: int) -> None:
        """Markdown text: TensorBoard's text plugin, or an MLflow artifact ``<tag>/step-<step>.md``."""
        tag = make_tag(tag)
        for logger, kind in self.loggers:
            if kind == "tensorboard":
                TensorBoardReporter(logger.experiment).log_text(tag, markdown, step)
            elif kind == "mlflow":
                logger.experiment.log_text(logger.run_id, markdown, artifact_file=f"{tag}/step-{int(step):08d}.md")

    def flush(self) -> None:
        for logger, kind in self.loggers:
            if kind == "tensorboard":
                logger.experiment.flush()
