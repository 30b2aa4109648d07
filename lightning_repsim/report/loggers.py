"""Scalars, images and text to every Lightning logger of a Trainer, each through the API it has.

Scalars go to every logger (``log_metrics``: TensorBoard, CSV, MLflow, W&B, ...). Images go to the
loggers that store images: TensorBoard (an image summary, PNG bytes as encoded once), MLflow (a
PNG artifact ``<tag>/step-<step>.png`` of the run) and W&B (``log_image``). Text goes to TensorBoard
(its text plugin renders markdown) and MLflow (a ``.md`` artifact). Loggers without such an API
get the scalars only.

A logger that fails (a full disk, a dead writer thread, a lost connection) is dropped for the rest
of the sink's life and ``on_failure`` is told once; the other loggers go on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
        on_failure: ``(logger description, step, exception)``, called once for a logger that
            raised (it is then dropped); None re-raises.

    Attributes:
        tensorboard: a reporter on the first TensorBoard logger, for what only TensorBoard shows
            (custom-scalars layout), or None.
    """

    def __init__(
        self, loggers: Sequence[Any], on_failure: Callable[[str, int | None, BaseException], None] | None = None
    ) -> None:
        self.loggers = [(logger, _logger_kind(logger)) for logger in loggers]
        self.on_failure = on_failure
        self.tensorboard: TensorBoardReporter | None = next(
            (TensorBoardReporter(lg.experiment) for lg, kind in self.loggers if kind == "tensorboard"), None
        )

    @property
    def kinds(self) -> list[str]:
        return [kind for _, kind in self.loggers]

    def _each(self, write: Callable[[Any, str], None], step: int | None) -> None:
        """``write(logger, kind)`` for every logger still on; one that raises is dropped."""
        for logger, kind in list(self.loggers):
            try:
                write(logger, kind)
            except Exception as err:
                if self.on_failure is None:
                    raise
                self.loggers = [(lg, k) for lg, k in self.loggers if lg is not logger]
                if (
                    kind == "tensorboard"
                    and self.tensorboard is not None
                    and not any(k == "tensorboard" for _, k in self.loggers)
                ):
                    self.tensorboard = None
                self.on_failure(f"the {type(logger).__name__}", step, err)

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """``{tag: value}`` at ``step`` to every logger (NaN stays NaN: a degenerate layer shows at its step)."""
        values = {tag: float(value) for tag, value in metrics.items()}
        self._each(lambda logger, kind: logger.log_metrics(values, step=int(step)), step)

    def log_png(self, tag: str, png: bytes, step: int) -> None:
        """One PNG-encoded image: as it is to TensorBoard, decoded to an array for MLflow and W&B."""
        tag = make_tag(tag)
        decoded: list[np.ndarray] = []

        def image() -> np.ndarray:
            if not decoded:
                decoded.append(decode_png(png))
            return decoded[0]

        def write(logger: Any, kind: str) -> None:
            if kind == "tensorboard":
                TensorBoardReporter(logger.experiment).log_png(tag, png, step)
            elif kind == "mlflow":
                logger.experiment.log_image(logger.run_id, image(), artifact_file=f"{tag}/step-{int(step):08d}.png")
            elif kind == "wandb":
                logger.log_image(key=tag, images=[image()], step=int(step))

        self._each(write, step)

    def log_text(self, tag: str, markdown: str, step: int) -> None:
        """Markdown text: TensorBoard's text plugin, or an MLflow artifact ``<tag>/step-<step>.md``."""
        tag = make_tag(tag)

        def write(logger: Any, kind: str) -> None:
            if kind == "tensorboard":
                TensorBoardReporter(logger.experiment).log_text(tag, markdown, step)
            elif kind == "mlflow":
                logger.experiment.log_text(logger.run_id, markdown, artifact_file=f"{tag}/step-{int(step):08d}.md")

        self._each(write, step)

    def custom_scalars(self, layout: Any) -> None:
        """TensorBoard's custom-scalars layout (a ``Layout`` proto), to every TensorBoard logger."""
        self._each(
            lambda logger, kind: logger.experiment.add_custom_scalars(layout) if kind == "tensorboard" else None, 0
        )

    def flush(self) -> None:
        self._each(lambda logger, kind: logger.experiment.flush() if kind == "tensorboard" else None, None)
