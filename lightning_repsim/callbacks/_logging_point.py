"""What RepresentationSimilarity writes for a fit, on global rank 0: opened at fit start, one snapshot per
logging point, the comparison with the final snapshot at the end, the scalars delivered to the loggers.

The callback decides *when*; these functions do the writing around :class:`._reporting.PointReporter`
(which compares and draws): the logger sink, the snapshot store (:mod:`._outputs` places it), the probe
saved with the store, the settings and custom-scalar layout in TensorBoard. Every output goes through
the :class:`._guard.Guard`, so that a failure costs a warning and that output, never the fit.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from tqdm.auto import tqdm

from lightning_repsim import report
from lightning_repsim.callbacks._guard import Guard
from lightning_repsim.callbacks._outputs import Checkpointed, RunOutputs, open_run_outputs, run_directory
from lightning_repsim.callbacks._probing import ProbeRunner, describe
from lightning_repsim.callbacks._reporting import IMAGE_LOGGERS, PointReporter, settings_table
from lightning_repsim.capture import Probe
from lightning_repsim.errors import RepSimValueError
from lightning_repsim.store import SnapshotStore, compact_features
from lightning_repsim.store.format import probe_tensors

if TYPE_CHECKING:
    from lightning_repsim.callbacks.similarity import RepresentationSimilarity

Scalars = deque[tuple[int, dict[str, float]]]  # (step, {tag: value}), to deliver to the loggers
_log = logging.getLogger(__name__)


def open_outputs(
    monitor: RepresentationSimilarity,
    trainer: pl.Trainer,
    log_dir: str | None,
    runner: ProbeRunner,
    guard: Guard,
    resumed: Checkpointed | None,
) -> tuple[report.LoggerSink, RunOutputs | None, PointReporter]:
    """Open one fit's outputs: the logger sink, the store and figures directory (``None`` when that failed),
    the reporter; log the settings and the custom-scalar layout. ``resumed``: the checkpoint's record."""
    probe = runner.probe
    run_dir = run_directory(trainer, log_dir)
    prefix = monitor.tag_prefix
    sink = report.LoggerSink(trainer.loggers, on_failure=guard.switch_off)
    guard.log_text = lambda text, step: sink.log_text(f"{prefix}/errors", text, step)
    settings = {
        "measures": list(monitor.measures),
        "options": monitor.options,
        "references": monitor.references,
        "max_features": monitor.max_features,
        "layout": monitor.layout,
        "token_reduction": monitor.token_reduction,
        "output_selector": describe(monitor.output_selector),
        "forward": describe(monitor.forward),
        "layers": monitor.layer_names,
        "layer_selector": repr(monitor.layers),
        "block_outputs": runner.block_outputs(trainer.lightning_module),
    }
    outputs = guard.output(
        f"the snapshot store and figures under {run_dir}",
        trainer.global_step,
        lambda: open_run_outputs(
            run_dir,
            probe_hash=probe.hash,
            n=len(probe),
            keep_store=monitor.keep_store,
            write_files=monitor.write_files,
            max_store_bytes=monitor.max_store_bytes,
            settings=settings,
            resumed=resumed,
            warn=guard.warn_once,
            name=monitor.name,
        ),
    )
    if outputs is not None and outputs.store is not None:
        save_probe(outputs.store, probe, trainer.global_step, guard)
    if not IMAGE_LOGGERS & set(sink.kinds):
        guard.warn_once(
            "no-image-logger",
            "RepresentationSimilarity found no logger that stores images (TensorBoardLogger, MLFlowLogger, "
            "WandbLogger): the "
            f"per-layer scalars go to the Trainer's loggers, heatmaps and curves to PNG/CSV files under "
            f"{None if outputs is None else outputs.directory} only.",
        )
    figures = outputs.directory / "figures" if monitor.write_files and outputs is not None else None
    references = monitor._references
    reporter = PointReporter(
        monitor.layer_names, monitor.options, references, sink, figures, prefix=prefix, guard=guard
    )
    series = reporter.scalar_series()  # one chart per measure and reference, every layer in depth order
    if any(ref.kind == "final" for ref in references):
        series = {k: [*v, f"{k}/final"] for k, v in series.items()}
    sink.custom_scalars(report.custom_scalars_layout(series))
    sink.log_text(f"{prefix}/probe", settings_table({"examples": len(probe), "hash": probe.hash, **settings}), 0)
    return sink, outputs, reporter


def save_probe(store: SnapshotStore, probe: Probe, step: int, guard: Guard) -> None:
    """Save the probe inputs with a store that has none yet (a new one, or one of an older lightning_repsim),
    so that a resume or a later comparison can use the very same examples. A failed write is one warning."""
    if store.has_probe or store.probe_hash != probe.hash:
        return
    try:
        probe_tensors(probe.inputs)
    except RepSimValueError as err:
        _log.debug("RepresentationSimilarity does not save the probe with the store: %s", err)
        return
    guard.output("the probe saved with the snapshot store", step, lambda: store.save_probe(probe.inputs))


def store_snapshot(
    store: SnapshotStore | None, features: Mapping[str, torch.Tensor], step: int, overwrite: bool, guard: Guard
) -> None:
    """Add one logging point's features to the store (compacted), overwriting a step a resumed fit repeats."""
    if store is not None:
        tensors, kinds = compact_features(features)
        guard.output("the snapshot store", step, lambda: store.add(step, tensors, kinds, overwrite=overwrite))


def deliver(trainer: pl.Trainer, scalars: Scalars, sink: report.LoggerSink | None, guard: Guard) -> None:
    """Hand the scalars computed so far to every logger (global rank 0) and to ``trainer.callback_metrics``
    (every rank, so that EarlyStopping and ModelCheckpoint can monitor them), in the training loop.

    Work done on the worker thread is delivered at the next logging point or at the end of training.
    Under DDP every rank calls this at the same points and receives rank 0's values.
    """
    batch = []
    while scalars:
        batch.append(scalars.popleft())
    if trainer.world_size > 1:
        batch = trainer.strategy.broadcast(batch, src=0)
    sink = sink if trainer.is_global_zero else None
    for step, values in batch:
        if sink is not None:
            guard.run(functools.partial(sink.log_scalars, values, step), "logging scalars", step)
        trainer.callback_metrics.update({tag: torch.tensor(value) for tag, value in values.items()})


def log_final(
    trainer: pl.Trainer,
    reporter: PointReporter,
    store: SnapshotStore,
    output_dir: Path,
    threshold: float,
    warn: Callable[[str, str], None],
    verbose: bool,
    scalars: Scalars,
) -> None:
    """Every stored snapshot against the last one, and the convergence report (Raghu et al. 2017); the
    scalars of every stored step join ``scalars``."""
    work = len(store.steps) * len(reporter.layer_names)
    tables, series = reporter.final(
        store,
        output_dir / "figures" / "final",
        threshold,
        progress=lambda layers: tqdm(
            layers,
            desc="repsim: similarity to the final snapshot",
            leave=False,
            disable=trainer.progress_bar_callback is None or work < 200,
        ),
        warn=warn,
    )
    scalars.extend(series)
    if verbose:
        for measure, table in tables.items():
            rank_zero_info(
                f"{measure}: step at which each layer reaches {threshold:.0%} of its similarity to "
                f"the final snapshot\n{table}"
            )
