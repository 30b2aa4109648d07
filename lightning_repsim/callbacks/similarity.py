"""RepresentationSimilarity: every layer against a reference, during training, in TensorBoard.

When: at step 0 (the network at init), every ``every_n_epochs`` epochs or ``every_n_train_steps``
optimizer steps, and at the end of training. Against what: ``"init"`` (the network before the
first optimisation step), ``"previous"`` (the previous logging point), another ``nn.Module`` or a
Lightning checkpoint (its weights in a copy of the trained module), and ``"final"``: at the end of
training, every stored snapshot against the last one, from the snapshot store on disk.

The callback decides *when* and *against what*; beside it, :mod:`._config` checks its arguments,
:mod:`._probing` runs the probe and the references, :mod:`._outputs` places the store and figures
(resume included), :mod:`._logging_point` opens a fit's outputs, stores each snapshot, delivers the
scalars and writes the final report, :mod:`._reporting` compares, draws and writes each logging
point, :mod:`._guard` keeps failures from stopping the fit, :mod:`._background` runs the comparing
and writing on a worker thread, and :mod:`._validation_pass` records the probe during Lightning's own
validation when that runs on a logging point's weights.
"""

from __future__ import annotations

import collections
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from lightning_repsim import report
from lightning_repsim.callbacks._background import Background, one_cpu_thread
from lightning_repsim.callbacks._config import check_monitor_arguments, check_monitor_setup
from lightning_repsim.callbacks._guard import Guard
from lightning_repsim.callbacks._logging_point import deliver, log_final, open_outputs, store_snapshot
from lightning_repsim.callbacks._outputs import Checkpointed, RunOutputs, resumed_probe, run_directory
from lightning_repsim.callbacks._probing import (
    ProbeRunner,
    Reference,
    check_features,
    check_probe_arguments,
    check_probe_size,
    materialise_probe,
    parse_references,
)
from lightning_repsim.callbacks._reporting import PointReporter
from lightning_repsim.callbacks._validation_pass import ValidationRecording, rides_validation
from lightning_repsim.capture import LayerSelector, OutputSelector, Probe
from lightning_repsim.measures import resolve_measures
from lightning_repsim.store import DEFAULT_MAX_BYTES, SnapshotStore

# jsonargparse (LightningCLI) tries a Union's members in order and str takes anything, so lists
# and modules (YAML: class_path / init_args) come before str.
ReferenceLike = nn.Module | str | os.PathLike[str]
References = Sequence[ReferenceLike] | ReferenceLike
_STATE_VERSION = 2


class RepresentationSimilarity(Callback):
    r"""Track the representational similarity of every layer against references while training.

    Rows are probe examples and columns neurons: at each logging point the fixed probe set runs
    through the model (no grad, eval mode, hooks only for the pass; every module's train/eval
    flag restored), each selected layer's output becomes an (n, p) matrix (conv maps average
    pooled so that p <= ``max_features``, token sequences reduced by ``token_reduction``; the
    rule of :func:`lightning_repsim.capture.reduce_output`, the same for the trained model and
    for module / checkpoint references), and every measure is computed for all layer pairs
    against each reference. See :mod:`lightning_repsim.functional` for the measures' conventions.
    When the probe is the validation loader's first examples (``"val:N"``, the default) and validation
    runs at the end of a logging epoch, the hooks record them during that validation instead and
    the point runs no probe pass of its own (the same numbers; any batch whose input is not the
    probe's next examples, in order, falls back to the probe pass).

    Logged (only global rank 0 writes; ``repsim-<name>/`` instead of ``repsim/`` for a named monitor):

    - ``repsim/<measure>/<reference>/<NN>_<layer>``: scalar, layer i (``NN``: its depth) against the
      reference's layer of the same name (or the same index when the architectures differ but have as
      many layers), to every Lightning logger and to ``trainer.callback_metrics`` (so ``EarlyStopping``
      can monitor it);
    - ``repsim/<measure>/<reference>/heatmap``: the L x L_ref heatmap image (step in the title, values
      in the cells up to 12 layers, colour range fixed per measure), to TensorBoard, MLflow and W&B;
    - ``repsim/<measure>/final/...``: at the end, the layer x step convergence map, one curve per
      layer and a table of the step at which each layer reaches ``threshold`` of its final value;
    - ``repsim/probe``: probe size, hash and settings, as text.

    Open it with ``tensorboard --logdir runs --samples_per_plugin images=1000`` (TensorBoard keeps
    only 10 images per tag otherwise). PNG and CSV files of every matrix go to
    ``<log_dir>/repsim/figures`` and the snapshot store to ``<log_dir>/repsim``, so a run and its
    store travel together. A fit never writes into another fit's outputs (a reused run directory
    gets ``repsim-1``, ...), and a resumed fit continues its checkpoint's store without losing or
    repeating a step (the README's "What you get" section says where everything goes on resume).

    Args:
        probe: the fixed probe set: a tensor, an ``(x, y)`` tuple, a DataLoader, or
            ``"val:512"`` / ``"train:512"`` for the first 512 examples of the validation /
            training dataloader. ``None``: ``"val:512"`` when there is a validation loader,
            else ``"train:512"``.
        reference: ``"final"``, ``"init"``, ``"previous"``, an ``nn.Module``, a checkpoint path,
            or a list of these (in YAML, a module is given by ``class_path`` and ``init_args``).
        measures: measure names, or one name (see :data:`lightning_repsim.functional.MEASURES`).
        layers: ``None`` for the model's blocks, in execution order (each transformer / ResNet block of
            a stack, a conv or linear with the norm and activation after it, the embeddings, the head:
            the rule of :mod:`lightning_repsim.capture.blocks`; found once per fit from the probe's
            first two examples); or names, glob patterns or module types: classes, or import paths such
            as ``"torch.nn.Linear"`` (how YAML names them; see :func:`lightning_repsim.capture.select_layers`),
            each the named module's own output.
        reference_layers: the same selector for module / checkpoint references (default: theirs).
        every_n_epochs: log at the end of every n-th training epoch.
        every_n_train_steps: log every n optimizer steps instead (then ``every_n_epochs`` is ignored), as
            Lightning's ``ModelCheckpoint`` names it.
        max_features: cap on p per layer for conv maps (adaptive average pooling). 256 by default:
            the callback compares and stores at every logging point, so it keeps each layer small;
            one-off comparisons (:func:`lightning_repsim.compare`, :func:`~lightning_repsim.capture.capture`)
            default to 4096 to keep more spatial detail.
        batch_size: probe examples per forward pass.
        measure_options: per-measure options, e.g. ``{"svcca": {"keep": 0.99}}``.
        threshold: fraction of the final similarity that counts as converged.
        store: keep the snapshot store (required for ``"final"``).
        max_store_bytes: disk budget of the store; older snapshots are thinned evenly past it.
        write_files: also write PNG and CSV files per logging point.
        strict: re-raise exceptions from the monitor instead of warning and carrying on (the work
            then runs in the training loop, so the exception surfaces at its own step).
        background: compare, store and draw each snapshot on a worker thread while training goes
            on (the probe pass itself always runs in the loop, on the weights of its step). The
            store holds every logged step before a checkpoint is written, and everything is
            written before ``fit`` returns. ``None`` (default): on when the model trains on an
            accelerator, where the host is mostly waiting; off on CPU, where training already
            keeps every core busy and a worker would only compete with it.
        layout: how 3-D and wider outputs are read: ``"conv"`` (``(N, C, *S)``, pooled to
            ``max_features``), ``"tokens"`` (``(N, T, *D)``, reduced by ``token_reduction``), or
            ``"auto"`` (tokens for sequence modules, modules acting on the last axis and default blocks
            holding them without a conv or batch norm, i.e. transformer blocks; conv maps otherwise; see
            :mod:`lightning_repsim.capture`), or a mapping from layer name or glob
            to one of these, e.g. ``{"encoder.*": "tokens"}``.
        token_reduction: ``(N, T, D)`` → ``(N, D)`` by the ``"mean"`` over tokens, the
            ``"first"`` or ``"last"`` token, or ``"flatten"`` to ``(N, T * D)``.
        output_selector: which tensor of a tuple / dict / dataclass output stands for the layer:
            an int index, a key, or a callable ``output -> Tensor`` (called on every selected
            layer's output, tensors included); default: the first tensor, ``last_hidden_state``
            for mappings (see :func:`lightning_repsim.capture.select_output`).
        forward: ``forward(model, batch)`` for models whose forward needs more than the probe
            tensor (default ``model(batch)``); also runs the module / checkpoint references.
            Callables are best module-level functions: YAML names them by import path, and
            ``ddp_spawn`` pickles them.
        name: tells several monitors of one Trainer apart (say one per probe set): their tags start
            with ``repsim-<name>/`` instead of ``repsim/`` and their stores and figures go to
            ``<log_dir>/repsim-<name>``. Needed as soon as a Trainer has two monitors.
        verbose: print each measure's convergence table at the end of training.

    Example:
        >>> import torch, pytorch_lightning as pl
        >>> from lightning_repsim import RepresentationSimilarity
        >>> monitor = RepresentationSimilarity(probe=torch.randn(64, 32), reference=["init", "final"])
        >>> monitor.references
        ['init', 'final']
    """

    def __init__(
        self,
        probe: Any = None,
        reference: References = "final",
        measures: Sequence[str] | str = ("linear_cka", "rv2"),
        layers: LayerSelector = None,
        reference_layers: LayerSelector = None,
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        max_features: int = 256,
        batch_size: int = 256,
        measure_options: Mapping[str, Mapping[str, Any]] | None = None,
        threshold: float = 0.95,
        store: bool = True,
        max_store_bytes: int = DEFAULT_MAX_BYTES,
        write_files: bool = True,
        strict: bool = False,
        background: bool | None = None,
        layout: Mapping[str, str] | str = "auto",
        token_reduction: str = "mean",
        output_selector: OutputSelector = None,
        forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
        name: str | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.options = resolve_measures(measures, measure_options)
        self.measures = tuple(self.options)
        self._references = parse_references(reference)
        check_monitor_arguments(self._references, store, every_n_epochs, every_n_train_steps, name, threshold)
        check_probe_arguments(probe, max_features, layout, token_reduction, output_selector, forward)
        self.probe_source = probe
        self.layers = layers
        self.reference_layers = reference_layers
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.name = name
        self.verbose = verbose
        self.max_features = max_features
        self.batch_size = batch_size
        self.threshold = threshold
        self.keep_store = store
        self.max_store_bytes = max_store_bytes
        self.write_files = write_files
        self.strict = strict
        self.background = background
        self.layout = dict(layout) if isinstance(layout, Mapping) else layout
        self.token_reduction = token_reduction
        self.output_selector = output_selector
        self.forward = forward

        self._runner: ProbeRunner | None = None
        self._layer_names: list[str] = []
        self._outputs: RunOutputs | None = None
        self._sink: report.LoggerSink | None = None
        self._reporter: PointReporter | None = None
        self._scalars: collections.deque[tuple[int, dict[str, float]]] = collections.deque()  # to deliver
        self._guard = Guard(strict)
        self._checkpointed: Checkpointed | None = None  # set by load_state_dict when the fit resumes
        self._previous: dict[str, torch.Tensor] | None = None
        self._previous_step: int | None = None
        self._last_logged_step: int | None = None
        self._attempted_step: int | None = None
        self._unlogged_start: dict[str, torch.Tensor] | None = None
        self._worker: Background | None = None
        self._riding: ValidationRecording | None = None  # the probe recorded during validation

    # ------------------------------------------------------------------ configuration

    @property
    def references(self) -> list[str]:
        return [r.label for r in self._references]

    @property
    def state_key(self) -> str:
        """Tells this monitor's checkpoint state from another's in the same Trainer: its name and every
        argument that decides what it records."""
        return self._generate_state_key(
            name=self.name,
            references=self.references,
            measures=list(self.measures),
            probe=self.probe_source if isinstance(self.probe_source, str | None) else type(self.probe_source).__name__,
            layers=repr(self.layers),
            every=(self.every_n_epochs, self.every_n_train_steps),
        )

    @property
    def tag_prefix(self) -> str:
        """The first component of every tag and the store's folder: ``repsim``, or ``repsim-<name>``."""
        return "repsim" if self.name is None else f"repsim-{self.name}"

    @property
    def store_path(self) -> Path | None:
        """The snapshot store's directory (on global rank 0, once training has started)."""
        return None if self._store is None else self._store.path

    @property
    def layer_names(self) -> list[str]:
        return list(self._layer_names)

    @property
    def probe(self) -> Probe | None:
        """The probe set, materialised once at fit start (its ``hash`` identifies it across runs)."""
        return self._probe

    @property
    def _probe(self) -> Probe | None:
        return None if self._runner is None else self._runner.probe

    @property
    def _store(self) -> SnapshotStore | None:
        return None if self._outputs is None else self._outputs.store

    @property
    def _output_dir(self) -> Path | None:
        return None if self._outputs is None else self._outputs.directory

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._forget_previous_fit()
        monitors = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, RepresentationSimilarity)]
        check_monitor_setup(self._references, self.name, [cb.name for cb in monitors], trainer.strategy)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        background = self.background if self.background is not None else pl_module.device.type != "cpu"
        self._worker = Background(initializer=one_cpu_thread) if background and not self.strict else None
        run_dir = trainer.log_dir  # a broadcast from rank 0 under DDP: every rank must call it
        probe = materialise_probe(self.probe_source, trainer)
        if self._checkpointed is not None and self._checkpointed.probe_hash not in (None, probe.hash):
            run_path = run_directory(trainer, run_dir)
            probe = resumed_probe(self._checkpointed, probe, run_path, self.probe_source, self.name)
        check_probe_size(probe)
        self._runner = ProbeRunner.for_monitor(probe, self)
        features = self._runner.trained(trainer, pl_module)
        self._layer_names = list(features)
        for ref in self._references:
            if ref.kind == "module":
                ref.features = self._runner.reference(ref, trainer, pl_module)
        if trainer.is_global_zero:
            opened = open_outputs(self, trainer, run_dir, self._runner, self._guard, self._checkpointed)
            self._sink, self._outputs, self._reporter = opened
        if self._checkpointed is None:
            self._unlogged_start = features  # the step-0 snapshot: weights cannot change before on_train_start
            init = self._reference("init")
            if init is not None:
                init.features = features

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0 and self._last_logged_step is None:
            self._log_point_guarded(trainer, pl_module, "the step-0 snapshot")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        every = self.every_n_train_steps
        if every and step > 0 and step % every == 0 and step != self._last_logged_step:
            self._log_point_guarded(trainer, pl_module, f"step {step}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self.every_n_train_steps is None
            and self.every_n_epochs is not None
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
            and trainer.global_step != self._last_logged_step
        ):
            self._log_point_guarded(trainer, pl_module, f"epoch {trainer.current_epoch}")

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the probe during this validation when it runs on the weights of the next logging point
        (at the end of a logging epoch): that point then needs no probe pass of its own."""
        self._drop_recording()
        custom_forward = self.forward is not None
        if self._runner is not None and rides_validation(
            trainer, self.every_n_epochs, self.every_n_train_steps, custom_forward
        ):
            self._riding = ValidationRecording(self._runner, trainer, pl_module, trainer.global_step)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._riding is not None:
            self._riding.batch_start(batch_idx, dataloader_idx)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._riding is not None:
            self._riding.release()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._riding is not None:
            self._riding.remove()

    def _drop_recording(self) -> None:
        if self._riding is not None:
            self._riding.remove()
            self._riding = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step not in (self._last_logged_step, self._attempted_step):  # a failed step is not retried
            self._log_point_guarded(trainer, pl_module, "the last step")
        self._finish_background()
        if (
            any(r.kind == "final" for r in self._references)
            and trainer.is_global_zero
            and self._store is not None
            and "the snapshot store" not in self._guard.off
        ):
            self._guard.run(lambda: self._log_final(trainer), "the final-snapshot comparison", trainer.global_step)
        deliver(trainer, self._scalars, self._sink, self._guard)
        if self._sink is not None:
            self._sink.flush()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._drop_recording()
        self._finish_background()  # keep every snapshot already taken

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._finish_background()

    def _log_point_guarded(self, trainer: pl.Trainer, pl_module: pl.LightningModule, what: str) -> None:
        self._guard.run(lambda: self._log_point(trainer, pl_module), what, trainer.global_step)
        self._report_background_failures()
        deliver(trainer, self._scalars, self._sink, self._guard)

    def _finish_background(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._report_background_failures()

    def _report_background_failures(self) -> None:
        if self._worker is not None:
            for failure in self._worker.failures():
                self._guard.report(failure.label, failure.error, failure.traceback, failure.context)

    def _forget_previous_fit(self) -> None:
        """Start each fit afresh, also with a callback object that monitored an earlier fit (a re-run notebook cell).

        Runs in ``setup``, before Lightning loads a checkpoint's state into the callback on resume.
        """
        self._checkpointed = None
        self._outputs = self._sink = self._reporter = None
        self._scalars.clear()
        self._previous = self._previous_step = self._last_logged_step = self._attempted_step = None
        self._unlogged_start = None
        self._drop_recording()
        self._guard = Guard(self.strict)
        for ref in self._references:  # "init" is set and modules are captured again at fit start
            ref.features = None

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        if self._worker is not None:
            self._worker.wait_milestones()  # the checkpoint's last_logged_step must be in the store
        init = self._reference("init")
        return {
            "version": _STATE_VERSION,
            "probe_hash": None if self._runner is None else self._runner.probe.hash,
            "output_dir": None if self._output_dir is None else str(self._output_dir.resolve()),
            "run_id": None if self._outputs is None else self._outputs.run_id,
            "layer_names": self._layer_names,
            "last_logged_step": self._last_logged_step,
            "previous_step": self._previous_step,
            "previous": _to_cpu(self._previous),
            "init": _to_cpu(init.features) if init is not None else None,
            "warned": sorted(self._guard.warned),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._checkpointed = Checkpointed.from_state(state_dict)
        self._last_logged_step = state_dict.get("last_logged_step")
        self._previous_step = state_dict.get("previous_step")
        self._previous = state_dict.get("previous")
        self._guard.warned = set(state_dict.get("warned", []))
        init = self._reference("init")
        if init is not None:
            init.features = state_dict.get("init")

    # ------------------------------------------------------------------ the work

    def _reference(self, kind: str) -> Reference | None:
        return next((r for r in self._references if r.kind == kind), None)

    def _log_point(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._runner is not None
        step = trainer.global_step
        features = (
            self._unlogged_start
            if step == 0 and self._unlogged_start is not None
            else self._features(trainer, pl_module)
        )
        self._unlogged_start = None
        self._attempted_step = step
        check_features(features, step, self._guard.warn_once)
        if trainer.is_global_zero:  # the other ranks hold the same numbers and write nothing
            work = functools.partial(self._compare_and_write, features, self._previous, step)
            if self._worker is None:
                work(lambda: None)
            else:
                self._worker.submit(f"the snapshot of global step {step}", work, context=step)
        self._previous, self._previous_step, self._last_logged_step = features, step, step

    def _features(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """The probe's features at this step: recorded during this step's validation, else by a probe pass."""
        assert self._runner is not None
        riding, self._riding = self._riding, None
        recorded = None if riding is None else riding.take(trainer.global_step)
        if recorded is not None and list(recorded) == self._layer_names:
            return recorded
        return self._runner.trained(trainer, pl_module)

    def _compare_and_write(
        self,
        features: dict[str, torch.Tensor],
        previous: dict[str, torch.Tensor] | None,
        step: int,
        stored: Callable[[], None],
    ) -> None:
        """Store one snapshot (then call ``stored``), compare it with every reference, draw and write the results.

        Runs on the worker thread when ``background``: it reads nothing that the training loop changes.
        """
        assert self._reporter is not None
        store_snapshot(self._store, features, step, self._checkpointed is not None, self._guard)
        stored()
        self._scalars.append((step, self._reporter.point(features, previous, step)))

    def _log_final(self, trainer: pl.Trainer) -> None:
        """Every stored snapshot against the last one, and the convergence report (Raghu et al. 2017)."""
        assert self._store is not None and self._output_dir is not None and self._reporter is not None
        store, output_dir, warn = self._store, self._output_dir, self._guard.warn_once
        log_final(trainer, self._reporter, store, output_dir, self.threshold, warn, self.verbose, self._scalars)


def _to_cpu(features: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if features is None else {k: v.detach().cpu() for k, v in features.items()}
