"""RepresentationSimilarity: every layer against a reference, during training, in TensorBoard.

When: at step 0 (the network at init), every ``every_n_epochs`` epochs or ``every_n_steps``
optimizer steps, and at the end of training. Against what: ``"init"`` (the network before the
first optimisation step), ``"previous"`` (the previous logging point), another ``nn.Module`` or a
Lightning checkpoint (its weights in a copy of the trained module), and ``"final"``: at the end of
training, every stored snapshot against the last one, from the snapshot store on disk.
"""
from __future__ import annotations

import copy
import functools
import itertools
import os
import re
import secrets
import shutil
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from tqdm.auto import tqdm

from lightning_repsim import report
from lightning_repsim.callbacks._background import Background
from lightning_repsim.capture import LayerSelector, OutputSelector, Probe, capture
from lightning_repsim.capture.outputs import check_reduction
from lightning_repsim.errors import RepSimError, RepSimValueError, RepSimWarning
from lightning_repsim.functional import Representations, similarity_matrix
from lightning_repsim.functional._measures import gram_spec, resolve_measures
from lightning_repsim.analysis import similarity_to_final, write_convergence_report
from lightning_repsim.store import DEFAULT_MAX_BYTES, SnapshotStore, default_store_dir
from lightning_repsim.store.format import occupied

# jsonargparse (LightningCLI) tries a Union's members in order and str takes anything, so lists
# and modules (YAML: class_path / init_args) come before str.
ReferenceLike = Union[nn.Module, str, "os.PathLike[str]"]
References = Union[Sequence[ReferenceLike], ReferenceLike]
_KEYWORDS = ("init", "previous", "final")
_PROBE_SPEC = re.compile(r"^(val|train):(\d+)$")
# Each side of a comparison keeps its n x n Grams between measures and logging points (a fixed
# reference is prepared once for the whole run) within this much memory; past it they are recomputed.
_GRAM_CACHE_BYTES = 128 << 20


@dataclass
class _Reference:
    """One thing the layers are compared with; ``label`` is its name in tags and file names."""

    label: str
    kind: str  # "init" | "previous" | "final" | "module"
    source: Any = None  # the nn.Module or checkpoint path
    features: Optional[dict[str, torch.Tensor]] = None


def store_tensors(features: Mapping[str, torch.Tensor], n: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What the store keeps per layer: the features when p <= n, else a Gram factor F = Rᵀ.

    With Xᵀ = QR, X Xᵀ = Rᵀ R exactly, so the n x n factor Rᵀ gives every Gram-based measure and
    SVCCA as the features would, in at most n columns; PWCCA needs the neurons themselves and is
    unavailable for such layers. A layer with NaN/Inf is stored as one NaN column.
    """
    tensors, kinds = {}, {}
    for name, x in features.items():
        x = x.detach().to("cpu", torch.float64)
        if x.shape[1] <= n:
            tensors[name], kinds[name] = x.float(), "features"
        elif not bool(torch.isfinite(x).all()):
            tensors[name], kinds[name] = torch.full((x.shape[0], 1), float("nan"), dtype=torch.float32), "gram_factor"
        else:
            tensors[name], kinds[name] = torch.linalg.qr(x.T, mode="r").R.T.float(), "gram_factor"
    return tensors, kinds


class RepresentationSimilarity(Callback):
    r"""Track the representational similarity of every layer against references while training.

    Rows are probe examples and columns neurons: at each logging point the fixed probe set runs
    through the model (no grad, eval mode, hooks only for the pass; every module's train/eval
    flag restored), each selected layer's output becomes an (n, p) matrix (conv maps average
    pooled so that p <= ``max_features``, token sequences reduced by ``token_reduction``; the
    rule of :func:`lightning_repsim.capture.reduce_output`, the same for the trained model and
    for module / checkpoint references), and every measure is computed for all layer pairs
    against each reference. See :mod:`lightning_repsim.functional` for the measures' conventions.

    TensorBoard (when the Trainer has a ``TensorBoardLogger``; only global rank 0 writes):

    - ``repsim/<measure>/<reference>/heatmap``: the L x L_ref heatmap image, layer names on both
      axes, colour range fixed per measure so frames are comparable across steps;
    - ``repsim/<measure>/<reference>/<layer>``: scalar, layer i against the reference's layer of
      the same name (or the same index when the architectures differ but have as many layers);
    - ``repsim/<measure>/final/...``: at the end, the layer x step convergence map, one curve per
      layer and a table of the step at which each layer reaches ``threshold`` of its final value;
    - ``repsim/probe``: probe size, hash and settings, as text.

    Open it with ``tensorboard --logdir runs --samples_per_plugin images=0`` (TensorBoard keeps
    only 10 images per tag otherwise). PNG and CSV files of every matrix go to
    ``<log_dir>/repsim/figures``, and the snapshot store (per step, per layer, what the measures
    need, without pickle) to ``<log_dir>/repsim``, so a run and its store travel together. A fit
    never writes into another fit's outputs: when ``<log_dir>/repsim`` already holds some (a fixed
    logger version or the same ``default_root_dir`` fitted again), it warns and uses the first free
    ``repsim-1``, ``repsim-2``, ... A resumed fit continues the store its checkpoint records
    when it is in the same run directory; what the interrupted fit stored and drew after the
    checkpoint moves to ``superseded/``. When the logger has moved on to a new version (or
    several fits resume one checkpoint), the resumed fit writes its own store beside its events,
    starting from copies of the snapshots and figures up to the checkpoint, and warns; the
    recorded ones stay as they are.

    Args:
        probe: the fixed probe set: a tensor, an ``(x, y)`` tuple, a DataLoader, or
            ``"val:512"`` / ``"train:512"`` for the first 512 examples of the validation /
            training dataloader. ``None``: ``"val:512"`` when there is a validation loader,
            else ``"train:512"``.
        reference: ``"final"``, ``"init"``, ``"previous"``, an ``nn.Module``, a checkpoint path,
            or a list of these (in YAML, a module is given by ``class_path`` and ``init_args``).
        measures: measure names, or one name (see :data:`lightning_repsim.functional.MEASURES`).
        layers: ``None`` for every leaf module with parameters, in execution order; or names,
            glob patterns or module types: classes, or import paths such as ``"torch.nn.Linear"``
            (how YAML names them; see :func:`lightning_repsim.capture.select_layers`).
        reference_layers: the same selector for module / checkpoint references (default: theirs).
        every_n_epochs: log at the end of every n-th training epoch.
        every_n_steps: log every n optimizer steps instead (then ``every_n_epochs`` is ignored).
        max_features: cap on p per layer for conv maps (adaptive average pooling).
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
            ``"auto"``: tokens for 3-D outputs of the known sequence modules (``nn.Embedding``,
            ``nn.MultiheadAttention``, ``nn.Transformer*``, RNNs) and of modules acting on the
            last axis (``nn.Linear``, ``nn.LayerNorm``: a transformer's layers), conv maps
            otherwise (``nn.Conv1d``, ``nn.BatchNorm1d``, parameter-free modules). Also a mapping
            from layer name or glob to one of these (unmatched layers use ``"auto"``), e.g.
            ``{"encoder.*": "tokens"}``.
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
        measures: Union[Sequence[str], str] = ("linear_cka", "rv2"),
        layers: LayerSelector = None,
        reference_layers: LayerSelector = None,
        every_n_epochs: Optional[int] = 1,
        every_n_steps: Optional[int] = None,
        max_features: int = 256,
        batch_size: int = 256,
        measure_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
        threshold: float = 0.95,
        store: bool = True,
        max_store_bytes: int = DEFAULT_MAX_BYTES,
        write_files: bool = True,
        strict: bool = False,
        background: Optional[bool] = None,
        layout: Union[Mapping[str, str], str] = "auto",
        token_reduction: str = "mean",
        output_selector: OutputSelector = None,
        forward: Optional[Callable[[nn.Module, torch.Tensor], Any]] = None,
    ) -> None:
        self.options = resolve_measures(measures, measure_options)
        self.measures = tuple(self.options)
        self._references = self._parse_references(reference)
        if any(r.kind == "final" for r in self._references) and not store:
            raise RepSimValueError("reference='final' is computed from the snapshot store; keep store=True.")
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise RepSimValueError(f"{name} must be a positive int or None; got {value!r}.")
        if every_n_epochs is None and every_n_steps is None:
            raise RepSimValueError("set every_n_epochs or every_n_steps (both are None, so nothing would be logged).")
        if not 0.0 < threshold <= 1.0:
            raise RepSimValueError(f"threshold is a fraction of the final similarity in (0, 1]; got {threshold}.")
        check_reduction(max_features, layout, token_reduction)
        if not (output_selector is None or callable(output_selector) or isinstance(output_selector, str)
                or (isinstance(output_selector, int) and not isinstance(output_selector, bool))):
            raise RepSimValueError(f"output_selector must be None, an int index, a str key or a callable; got "
                                   f"{output_selector!r}.")
        if forward is not None and not callable(forward):
            raise RepSimValueError(f"forward must be None or a callable forward(model, batch); got {forward!r}.")
        if isinstance(probe, str) and (not _PROBE_SPEC.match(probe) or int(probe.split(":")[1]) < 1):
            raise RepSimValueError(f"probe string must look like 'val:512' or 'train:512' (a split and a positive "
                                   f"number of examples); got {probe!r}.")
        self.probe_source = probe
        self.layers = layers
        self.reference_layers = reference_layers
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
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

        self._probe: Optional[Probe] = None
        self._layer_names: list[str] = []
        self._store: Optional[SnapshotStore] = None
        self._run_dir: Optional[Path] = None
        self._tensorboard: Optional[report.TensorBoardReporter] = None
        self._previous: Optional[dict[str, torch.Tensor]] = None
        self._previous_step: Optional[int] = None
        self._last_logged_step: Optional[int] = None
        self._attempted_step: Optional[int] = None
        self._unlogged_start: Optional[dict[str, torch.Tensor]] = None
        self._warned: set[str] = set()
        self._resumed = False
        self._frames: dict[tuple, report.HeatmapFrames] = {}
        self._prepared: dict[str, tuple[Mapping[str, torch.Tensor], Representations]] = {}
        self._worker: Optional[Background] = None
        self._output_dir: Optional[Path] = None  # the store and figures: <run dir>/repsim, or repsim-1, ...
        self._recorded_output: Optional[str] = None  # where the checkpoint says they are
        self._seed_from: Optional[Path] = None  # a resume elsewhere copies the checkpointed outputs from here
        self._run_id: Optional[str] = None  # names the fit (and its resumptions) in the store's settings

    # ------------------------------------------------------------------ configuration

    @staticmethod
    def _parse_references(reference: Any) -> list[_Reference]:
        items = list(reference) if isinstance(reference, (list, tuple)) else [reference]
        if not items:
            raise RepSimValueError("reference is empty: use 'final', 'init', 'previous', a module or a checkpoint.")
        parsed, modules = [], 0
        for item in items:
            if isinstance(item, str) and item in _KEYWORDS:
                parsed.append(_Reference(item, item))
            elif isinstance(item, nn.Module):
                modules += 1
                parsed.append(_Reference(f"model{modules}" if modules > 1 else "model", "module", item))
            elif isinstance(item, (str, os.PathLike)):
                label = re.sub(r"[^\w.\-]", "_", Path(item).stem) or "checkpoint"
                parsed.append(_Reference(label, "module", Path(item)))
            else:
                raise RepSimValueError(f"reference {item!r} is not one of {_KEYWORDS}, an nn.Module or a checkpoint "
                                       "path.")
        labels = [r.label for r in parsed]
        if len(set(labels)) != len(labels):
            raise RepSimValueError(f"references repeat: {labels}; give each once.")
        return parsed

    @property
    def references(self) -> list[str]:
        return [r.label for r in self._references]

    @property
    def state_key(self) -> str:
        return self._generate_state_key(references=self.references, measures=list(self.measures))

    @property
    def store_path(self) -> Optional[Path]:
        """The snapshot store's directory (on global rank 0, once training has started)."""
        return None if self._store is None else self._store.path

    @property
    def layer_names(self) -> list[str]:
        return list(self._layer_names)

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._forget_previous_fit()
        for ref in self._references:
            if ref.kind == "module" and isinstance(ref.source, Path) and not ref.source.is_file():
                raise RepSimValueError(f"reference checkpoint {str(ref.source)!r} does not exist. A reference is one "
                                       f"of {', '.join(map(repr, _KEYWORDS))} (lower case), an nn.Module or the path "
                                       "of a Lightning checkpoint.")
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise RepSimValueError(f"RepresentationSimilarity captures whole-layer outputs and does not support "
                                   f"sharded strategies ({strategy}); use 'ddp' or 'ddp_spawn'.")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        background = self.background if self.background is not None else pl_module.device.type != "cpu"
        self._worker = Background(initializer=_one_cpu_thread) if background and not self.strict else None
        self._probe = self._materialise_probe(trainer)
        n = len(self._probe)
        needs_four = [m for m in self.measures if m != "svcca" and m != "pwcca"
                      and gram_spec(m, **self.options[m]).min_examples > 2]
        minimum = 4 if needs_four else 2
        if n < minimum:
            raise RepSimValueError(f"the probe has {n} example(s); {', '.join(needs_four) or 'the measures'} need at "
                                   f"least {minimum}. Use a larger probe.")
        features = self._capture_trained(trainer, pl_module)
        self._layer_names = list(features)
        for ref in self._references:
            if ref.kind == "module":
                ref.features = self._capture_reference(ref, trainer, pl_module)
        run_dir = trainer.log_dir  # a broadcast from rank 0 under DDP: every rank must call it
        if trainer.is_global_zero:
            self._open_outputs(trainer, run_dir)
        if not self._resumed:
            self._unlogged_start = features  # the step-0 snapshot: weights cannot change before on_train_start
            init = self._reference("init")
            if init is not None:
                init.features = features

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0 and self._last_logged_step is None:
            self._guarded(trainer, pl_module, self._log_point, "the step-0 snapshot")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_logged_step:
            self._guarded(trainer, pl_module, self._log_point, f"step {step}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps is None and (trainer.current_epoch + 1) % self.every_n_epochs == 0 \
                and trainer.global_step != self._last_logged_step:
            self._guarded(trainer, pl_module, self._log_point, f"epoch {trainer.current_epoch}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step not in (self._last_logged_step, self._attempted_step):  # a failed step is not retried
            self._guarded(trainer, pl_module, self._log_point, "the last step")
        self._finish_background(trainer)
        if any(r.kind == "final" for r in self._references) and trainer.is_global_zero:
            self._guarded(trainer, pl_module, lambda t, m: self._log_final(t), "the final-snapshot comparison")
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish_background(trainer)  # keep every snapshot already taken

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._finish_background(trainer)

    def _finish_background(self, trainer: pl.Trainer) -> None:
        if self._worker is not None:
            self._worker.close()
            self._report_background_failures(trainer)

    def _forget_previous_fit(self) -> None:
        """Start each fit afresh, also with a callback object that monitored an earlier fit (a re-run notebook cell).

        Runs in ``setup``, before Lightning loads a checkpoint's state into the callback on resume.
        """
        self._resumed = False
        self._expected_probe_hash = None
        self._recorded_output = self._run_id = None
        self._store = self._tensorboard = self._output_dir = self._run_dir = None
        self._previous = self._previous_step = self._last_logged_step = self._attempted_step = None
        self._unlogged_start = None
        self._warned = set()
        self._frames, self._prepared = {}, {}
        for ref in self._references:  # "init" is set and modules are captured again at fit start
            ref.features = None

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        if self._worker is not None:
            self._worker.wait_milestones()  # the checkpoint's last_logged_step must be in the store
        init = self._reference("init")
        return {
            "version": 2,
            "probe_hash": None if self._probe is None else self._probe.hash,
            "output_dir": None if self._output_dir is None else str(self._output_dir.resolve()),
            "run_id": self._run_id,
            "layer_names": self._layer_names,
            "last_logged_step": self._last_logged_step,
            "previous_step": self._previous_step,
            "previous": _to_cpu(self._previous),
            "init": _to_cpu(init.features) if init is not None else None,
            "warned": sorted(self._warned),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed = True
        self._expected_probe_hash = state_dict.get("probe_hash")
        self._last_logged_step = state_dict.get("last_logged_step")
        self._recorded_output = state_dict.get("output_dir")  # absent from checkpoints of version 1
        self._run_id = state_dict.get("run_id")
        self._previous_step = state_dict.get("previous_step")
        self._previous = state_dict.get("previous")
        self._warned = set(state_dict.get("warned", []))
        init = self._reference("init")
        if init is not None:
            init.features = state_dict.get("init")

    # ------------------------------------------------------------------ the work

    def _reference(self, kind: str) -> Optional[_Reference]:
        return next((r for r in self._references if r.kind == kind), None)

    def _materialise_probe(self, trainer: pl.Trainer) -> Probe:
        source = self.probe_source
        if source is None or isinstance(source, str):
            split, count = ("val", 512) if source is None else (source.split(":")[0], int(source.split(":")[1]))
            loader = _dataloader(trainer, split)
            if loader is None and source is None:
                split, loader = "train", _dataloader(trainer, "train")
            if loader is None:
                raise RepSimValueError(f"probe={source or 'val:512'!r} needs a {split} dataloader, and the Trainer has "
                                       "none; pass probe= a tensor, an (x, y) tuple or a DataLoader.")
            probe = Probe(loader, max_examples=count)
        else:
            probe = Probe(source)
        expected = getattr(self, "_expected_probe_hash", None)
        if self._resumed and expected and expected != probe.hash:
            raise RepSimError(f"the probe set changed since the checkpoint (hash {expected} then, {probe.hash} now); "
                              "resume with the same probe so the store stays comparable.")
        return probe

    def _capture(self, module: nn.Module, layers: LayerSelector = None,
                 trainer: Optional[pl.Trainer] = None) -> dict[str, torch.Tensor]:
        """The probe's features; with ``trainer``, the pass runs as its validation steps do: inputs converted
        and the forward wrapped by its precision plugin (autocast for "16-mixed"/"bf16-mixed", the module's
        dtype for "bf16-true"/"16-true"). Features are upcast to float32 by capture()."""
        assert self._probe is not None
        forward = self.forward  # forward(model, batch), or None for model(batch)
        if trainer is not None:
            precision, user_forward = trainer.precision_plugin, self.forward

            def forward_with_precision(model: nn.Module, batch: torch.Tensor) -> Any:
                with precision.val_step_context():
                    batch = precision.convert_input(batch)
                    return model(batch) if user_forward is None else user_forward(model, batch)

            forward = forward_with_precision

        return capture(module, self._probe, self.layers if layers is None else layers, batch_size=self.batch_size,
                       max_features=self.max_features, layout=self.layout, token_reduction=self.token_reduction,
                       output_selector=self.output_selector, forward=forward)

    def _capture_trained(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """The trained module's features; a probe it cannot run is reported as such, with its shape."""
        try:
            return self._capture(pl_module, trainer=trainer)
        except RepSimValueError:
            raise
        except Exception as err:  # the user's model, the user's probe: say which pairing failed
            raise self._probe_failure(type(pl_module).__name__, err) from err

    def _probe_failure(self, who: str, err: Exception) -> RepSimValueError:
        """The error for a model that cannot run the probe: which model, the probe's shape and dtype, the cause."""
        assert self._probe is not None
        return RepSimValueError(f"{who} cannot run the probe of shape {tuple(self._probe.inputs.shape)} "
                                f"({self._probe.inputs.dtype}): {type(err).__name__}: {err}. Pass probe= inputs "
                                "that the module's forward accepts (its first tensor is what is fed to forward).")

    def _capture_reference(self, ref: _Reference, trainer: pl.Trainer,
                           pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """A reference's features. A checkpoint, loaded into a copy of the trained module, runs under the
        Trainer's precision like it; an ``nn.Module`` runs as given (its own dtype, no autocast)."""
        if isinstance(ref.source, Path):
            checkpoint = torch.load(ref.source, map_location="cpu", weights_only=True)
            model = copy.deepcopy(pl_module)
            try:
                model.load_state_dict(checkpoint["state_dict"])
            except (KeyError, RuntimeError) as err:
                raise RepSimValueError(f"reference checkpoint {str(ref.source)!r} does not fit "
                                       f"{type(pl_module).__name__}: {err}") from None
        else:
            model = ref.source
        try:
            model.to(pl_module.device)
            return self._capture(model, self.reference_layers, trainer if isinstance(ref.source, Path) else None)
        except RepSimValueError:
            raise
        except Exception as err:  # the user's model, the user's probe: say which pairing failed
            raise self._probe_failure(f"reference {ref.label!r} ({type(model).__name__})", err) from err

    def _open_outputs(self, trainer: pl.Trainer, log_dir: Optional[str]) -> None:
        assert self._probe is not None
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is not None:
            self._run_dir = Path(logger.log_dir)
            self._tensorboard = report.TensorBoardReporter(logger.experiment)
        else:
            self._run_dir = Path(log_dir or trainer.default_root_dir)
        continued = self._place_outputs(self._run_dir)
        if logger is None:
            self._warn_once("no-tensorboard", "RepresentationSimilarity found no TensorBoardLogger: heatmaps and curves "
                            f"go to PNG/CSV files under {self._output_dir} only.")
        settings = {"measures": list(self.measures), "options": self.options, "references": self.references,
                    "max_features": self.max_features, "layout": self.layout, "token_reduction": self.token_reduction,
                    "output_selector": _describe(self.output_selector), "forward": _describe(self.forward),
                    "layers": self._layer_names, "layer_selector": repr(self.layers)}
        if self._seed_from is not None and self._last_logged_step is not None:
            self._seed_outputs(self._seed_from, self._last_logged_step)  # sets _store when it keeps one
        if self.keep_store and self._store is None:
            if continued:
                self._store = SnapshotStore.open(self._output_dir, mode="a", probe_hash=self._probe.hash)
                self._run_id = self._store.settings.get("run_id")
            else:
                self._store = SnapshotStore.create(self._output_dir, probe_hash=self._probe.hash, n=len(self._probe),
                                                   settings={**settings, "run_id": self._run_id},
                                                   max_bytes=self.max_store_bytes)
        if self._last_logged_step is not None and continued:
            self._set_aside_after(self._last_logged_step)
        if self._tensorboard is not None:
            rows = "\n".join(f"| {k} | `{v}` |" for k, v in {"examples": len(self._probe), "hash": self._probe.hash,
                                                            **settings}.items())
            self._tensorboard.log_text("repsim/probe", "| setting | value |\n|---|---|\n" + rows, 0)

    def _seed_outputs(self, source: Path, step: int) -> None:
        """A resume writing to a new place starts from copies of the snapshots (with their thinning record) and
        figures up to ``step`` that ``source`` holds, so that "final" covers the whole run. A copy that fails
        (a full disk, say) leaves this fit with a store of its own steps only, and a warning: never a failed fit."""
        assert self._output_dir is not None and self._probe is not None
        try:
            if self.keep_store:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RepSimWarning)  # damage there is that store's own business
                    earlier = SnapshotStore.open(source, mode="r", probe_hash=self._probe.hash)
                    self._store = earlier.copy_until(self._output_dir, step)
            for folder_step, folder in _step_folders(source / "figures").items():
                if folder_step <= step:
                    shutil.copytree(folder, self._output_dir / "figures" / folder.name, dirs_exist_ok=True)
        except Exception as err:  # only copies were written: start this fit's outputs afresh
            self._store = None
            shutil.rmtree(self._output_dir, ignore_errors=True)
            self._warn_once(f"seed-failed:{self._output_dir}", (
                f"RepresentationSimilarity could not copy the snapshots and figures up to step {step} from {source} "
                f"to {self._output_dir} ({type(err).__name__}: {err}); this fit's store starts without them, and "
                "reference 'final' covers only the steps from here on."))

    def _set_aside_after(self, step: int) -> None:
        """Resuming at ``step``: what the interrupted fit stored and drew after it leaves the store and figures
        for ``superseded/after-step-<step>/`` (nothing stored is deleted), so the resumed fit has every step once."""
        assert self._output_dir is not None
        figures = self._output_dir / "figures"
        later = [folder for folder_step, folder in _step_folders(figures).items() if folder_step > step]
        later += [figures / "final"] if (figures / "final").exists() else []
        stored_later = self._store is not None and any(s > step for s in self._store.steps)
        if not later and not stored_later:
            return
        base = aside = self._output_dir / "superseded" / f"after-step-{step:08d}"
        for k in itertools.count(1):  # a second resume at the same step keeps the first one's
            if not aside.exists():
                break
            aside = base.with_name(f"{base.name}-{k}")
        moved = self._store.truncate_after(step, move_to=aside / "store") if self._store is not None else []
        for folder in later:
            (aside / "figures").mkdir(parents=True, exist_ok=True)
            os.replace(folder, aside / "figures" / folder.name)
        if moved:  # a finished fit trained further only has its old final-snapshot figures moved: no news
            self._warn_once("superseded", f"RepresentationSimilarity resumes at step {step}; what the interrupted fit "
                            f"stored after it (steps {moved}) and its figures were moved to {aside}, so the store "
                            "holds every step once.")

    def _place_outputs(self, run_dir: Path) -> bool:
        """Choose ``_output_dir``, the directory of the store and the figures; True to continue the store there.

        A resumed fit continues its own store when it is in ``run_dir`` and writable (found where the
        checkpoint says, else by its run id in ``run_dir``); when it is elsewhere or read-only, the
        fit starts a new store seeded from it (``_seed_from``). Otherwise the fit never writes into
        another fit's outputs: when ``<run_dir>/repsim`` holds anything, it takes the first free
        ``repsim-1``, ``repsim-2``, ...
        """
        default = default_store_dir(run_dir)
        self._seed_from = None
        if not (self.keep_store or self.write_files):  # nothing goes to disk
            self._output_dir = default
            return False
        recorded = Path(self._recorded_output) if self._recorded_output else None
        if self._resumed:
            # the recorded place, else the default one (the run directory was moved since), where a store tells
            # by its run id whether it is this run's; figures alone cannot tell, so then only the recorded place
            candidates = [recorded, default] if recorded is None or self.keep_store else [recorded]
            holders = [c for c in dict.fromkeys(p for p in candidates if p is not None) if self._holds_this_run(c)]
            for candidate in holders:
                if candidate.parent.resolve() == run_dir.resolve() and _writable(candidate):
                    self._output_dir = candidate
                    return True
            if holders and self._last_logged_step is not None:
                # The logger moved on (a new version), several fits resume one checkpoint (a sweep), or the
                # run is archived read-only: this fit keeps its own outputs beside its events, starting from
                # copies of the recorded ones up to the checkpoint, which stay as they are.
                self._seed_from = holders[0]
        index = next(i for i in itertools.count() if not occupied(default_store_dir(run_dir, i)))
        self._output_dir = default_store_dir(run_dir, index)
        if self._seed_from is not None:
            elsewhere = self._seed_from.parent.resolve() != run_dir.resolve()
            why = (f"outside this fit's run directory {run_dir} (a logger with a new version, or several fits "
                   "resuming one checkpoint)" if elsewhere else "and cannot be written to (read-only)")
            tip = (" To continue in one directory, resume with the first fit's logger version, e.g. TensorBoardLogger("
                   f"<same save_dir and name>, version={self._seed_from.parent.name!r})." if elsewhere else "")
            self._warn_once(f"seeded:{self._seed_from}:{self._output_dir}", (
                f"RepresentationSimilarity: the checkpointed fit's snapshot store and figures are in "
                f"{self._seed_from}, {why}: this fit writes its own to {self._output_dir}, starting from copies of "
                f"those up to step {self._last_logged_step}, and {self._seed_from} stays as it is.{tip}"))
        elif self._resumed and self.keep_store and self._last_logged_step is not None:
            where = (f"the checkpoint's snapshot store {recorded} is gone or another run's" if recorded else
                     f"the checkpoint does not say where its snapshot store is (it was saved by an older "
                     f"lightning_repsim) and {default} holds none of this run")
            self._warn_once(f"lost:{recorded or default}:{self._output_dir}", (
                f"RepresentationSimilarity: {where}; a new store starts at {self._output_dir}, without the snapshots "
                f"up to step {self._last_logged_step}: reference 'final' and its convergence map cover only the "
                "steps from here on."))
        elif index and not self._resumed:
            self._warn_once(f"occupied:{default}", (
                f"RepresentationSimilarity: {default} already holds the snapshot store or figures of an earlier fit, "
                f"which stay as they are; this fit writes its own to {self._output_dir}. To keep fits apart, give "
                "each its own run directory (a new logger version, e.g. TensorBoardLogger(..., version=None), or "
                "another default_root_dir); to continue the earlier fit, pass its checkpoint to fit(ckpt_path=...)."))
        self._run_id = self._run_id or secrets.token_hex(8)
        return False

    def _holds_this_run(self, directory: Path) -> bool:
        """Whether ``directory`` holds the checkpointed fit's outputs: its store (same run id and probe), or figures."""
        if not self.keep_store:
            return directory.is_dir()
        assert self._probe is not None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RepSimWarning)  # damage is reported once it is opened for appending
                store = SnapshotStore.open(directory, mode="r")
        except RepSimError:
            return False
        # a checkpoint without a run id (state version 1) takes the store by its probe alone, as it did then
        return store.probe_hash == self._probe.hash and self._run_id in (None, store.settings.get("run_id"))

    def _guarded(self, trainer: pl.Trainer, pl_module: pl.LightningModule, work: Any, what: str) -> None:
        """Run monitor work; an exception never kills fit unless ``strict`` (then it re-raises)."""
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RepSimWarning)
                work(trainer, pl_module)
        except Exception as err:
            self._replay(caught)  # warnings issued before the failure (their keys are marked as warned)
            if self.strict:
                raise
            self._report_failure(trainer, f"{what} (global step {trainer.global_step})", err,
                                 traceback.format_exc(limit=3), trainer.global_step)
        else:
            self._replay(caught)
        self._report_background_failures(trainer)

    def _report_failure(self, trainer: pl.Trainer, where: str, err: BaseException, trace: str, step: int) -> None:
        rank_zero_warn(f"RepresentationSimilarity failed at {where} and is skipping it; training continues. "
                       f"{type(err).__name__}: {err}\n{trace}", category=RepSimWarning)
        if self._tensorboard is not None and trainer.is_global_zero:
            self._tensorboard.log_text("repsim/errors", f"`{type(err).__name__}: {err}` at {where}", step)

    def _report_background_failures(self, trainer: pl.Trainer) -> None:
        if self._worker is None:
            return
        for failure in self._worker.failures():
            self._report_failure(trainer, failure.label, failure.error, failure.traceback, failure.context)

    def _replay(self, caught: list[warnings.WarningMessage]) -> None:
        for w in caught:
            if issubclass(w.category, RepSimWarning):
                self._warn_once(str(w.message), str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=RepSimWarning)

    def _log_point(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        features = self._unlogged_start if step == 0 and self._unlogged_start is not None \
            else self._capture_trained(trainer, pl_module)
        self._unlogged_start = None
        self._attempted_step = step
        for name, x in features.items():
            if not bool(torch.isfinite(x).all()):
                self._warn_once(f"nonfinite:{name}", f"layer {name!r} produced NaN/Inf activations at step {step}: "
                                "its similarities are NaN; training continues.")
            elif _is_constant(x):
                self._warn_once(f"constant:{name}", f"layer {name!r} is constant over the probe at step {step} (a dead "
                                "layer?): its centred similarities are NaN; training continues.")
        if trainer.is_global_zero:  # the other ranks hold the same numbers and write nothing
            work = functools.partial(self._compare_and_write, features, self._previous, step)
            if self._worker is None:
                work(lambda: None)
            else:
                self._worker.submit(f"the snapshot of global step {step}", work, context=step)
        self._previous, self._previous_step, self._last_logged_step = features, step, step

    def _compare_and_write(self, features: dict[str, torch.Tensor], previous: Optional[dict[str, torch.Tensor]],
                           step: int, stored: Callable[[], None]) -> None:
        """Store one snapshot (then call ``stored``), compare it with every reference, draw and write the results.

        Runs on the worker thread when ``background``: it reads nothing that the training loop changes.
        """
        if self._store is not None:
            tensors, kinds = store_tensors(features, len(features[self._layer_names[0]]))
            self._store.add(step, tensors, kinds, overwrite=self._resumed)
        stored()
        current = Representations(features, max_cache_bytes=_GRAM_CACHE_BYTES)  # shared by every measure
        for ref in self._references:
            if ref.kind == "final":
                continue
            other = self._prepared_reference(ref, previous if ref.kind == "previous" else ref.features, features)
            if other is None:
                continue
            for measure in self.measures:
                # warn=False: NaN layers were reported by name at capture time, once
                matrix = similarity_matrix(current, other, measure, warn=False, **self.options[measure])
                self._report_matrix(measure, ref.label, matrix, other.names, step)
        if self._reference("previous") is not None:
            self._prepared["previous"] = (features, current)  # its Grams serve the next point's "previous"

    def _prepared_reference(self, ref: _Reference, features: Optional[Mapping[str, torch.Tensor]],
                            like: Mapping[str, torch.Tensor]) -> Optional[Representations]:
        """The reference's layers on the current device, prepared once and reused while they stay the same."""
        if features is None:
            return None
        cached = self._prepared.get(ref.label)
        if cached is None or cached[0] is not features:
            cached = (features, Representations(_on(features, like), max_cache_bytes=_GRAM_CACHE_BYTES))
            self._prepared[ref.label] = cached
        return cached[1]

    def _report_matrix(self, measure: str, label: str, matrix: torch.Tensor, ref_names: list[str], step: int) -> None:
        names = self._layer_names
        values = matrix.cpu().numpy()
        key = (measure, label, tuple(ref_names))
        if key not in self._frames:  # labels and colour bar are drawn once; each step repaints the cells
            self._frames[key] = report.HeatmapFrames(names, ref_names, measure=measure, title=f"{measure} vs {label}",
                                                     row_title="layers", col_title=label)
        png = report.encode_png(self._frames[key].render(values))  # once, for TensorBoard and the file
        if self._tensorboard is not None:
            prefix = f"repsim/{measure}/{label}"
            self._tensorboard.log_png(f"{prefix}/heatmap", png, step)
            self._tensorboard.log_layer_scalars(prefix, _matched_diagonal(values, names, ref_names), step)
        if self.write_files and self._output_dir is not None:
            folder = self._output_dir / "figures" / _STEP_FOLDER.format(step)
            report.write_matrix_csv(folder / f"{measure}__{label}.csv", values, names, ref_names)
            report.write_png_bytes(png, folder / f"{measure}__{label}.png")

    def _log_final(self, trainer: pl.Trainer) -> None:
        """Every stored snapshot of every layer against the last snapshot (Raghu et al. 2017)."""
        assert self._store is not None and self._output_dir is not None
        steps = self._store.steps
        if len(steps) < 2:
            self._warn_once("final-too-short", "reference='final' needs at least two snapshots; training was too "
                            "short for a convergence map.")
            return
        for name in self._layer_names:
            if "pwcca" in self.measures and self._store.kinds.get(name) != "features":
                self._warn_once(f"pwcca-factor:{name}", f"pwcca against the final snapshot is NaN for layer "
                                f"{name!r}: it was stored as a Gram factor (p > n), without its neurons.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RepSimWarning)  # NaN layers were reported by name at capture time
            values = similarity_to_final(self._store, self.options, progress=lambda layers: tqdm(
                layers, desc="repsim: similarity to the final snapshot", leave=False,
                disable=trainer.progress_bar_callback is None or len(steps) * len(layers) < 200))
        if self._tensorboard is not None:
            for measure, table in values.items():
                for t, step in enumerate(steps):
                    self._tensorboard.log_layer_scalars(f"repsim/{measure}/final",
                                                        dict(zip(self._layer_names, table[:, t].tolist())), step)
        reports = write_convergence_report({m: v.numpy() for m, v in values.items()}, self._layer_names, steps,
                                           self._output_dir / "figures" / "final", threshold=self.threshold,
                                           tensorboard=self._tensorboard)
        for measure, written in reports.items():
            rank_zero_info(f"{measure}: step at which each layer reaches {self.threshold:.0%} of its similarity to "
                           f"the final snapshot\n{written.table}")


_STEP_FOLDER = "step-{:08d}"  # figures of one logging point, under <output dir>/figures


def _step_folders(figures: Path) -> dict[int, Path]:
    """The per-step figure folders under ``figures``, by step, ascending."""
    found = {int(f.name[5:]): f for f in figures.glob("step-*") if f.name[5:].isdigit() and f.is_dir()}
    return dict(sorted(found.items()))


def _describe(value: Any) -> Any:
    """A setting as JSON: a callable by its qualified name, anything else as it is."""
    if callable(value):
        name = getattr(value, "__qualname__", None) or type(value).__qualname__
        return f"{getattr(value, '__module__', None) or type(value).__module__}.{name}"
    return value


def _writable(directory: Path) -> bool:
    """Whether the files of ``directory`` (a store and its figures) can be replaced and added to."""
    return os.access(directory, os.W_OK | os.X_OK) and all(
        os.access(path, os.W_OK) for path in (directory / "figures", directory / "superseded") if path.exists())


def _one_cpu_thread() -> None:
    """The worker's torch ops run on one CPU thread (a per-thread setting: training keeps its own).

    Two OpenMP teams on the same cores, the training loop's and the worker's, spin-wait against
    each other and slow both down several times over."""
    torch.set_num_threads(1)


def _is_constant(x: torch.Tensor) -> bool:
    """No variation over the probe examples (relative to the magnitude, as the functional API decides)."""
    x = x.to(torch.float64)
    return float((x - x.mean(0)).square().sum()) <= 1e-20 * float(x.square().sum())


def _matched_diagonal(values: Any, names: list[str], ref_names: list[str]) -> dict[str, float]:
    """Layer i against the reference layer of the same name, or of the same index as a fallback."""
    index = {name: j for j, name in enumerate(ref_names)}
    if any(name in index for name in names):
        return {name: float(values[i, index[name]]) for i, name in enumerate(names) if name in index}
    if len(names) == len(ref_names):
        return {name: float(values[i, i]) for i, name in enumerate(names)}
    return {}


def _on(reference: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = next(iter(like.values())).device
    return {name: x.to(device) for name, x in reference.items()}


def _to_cpu(features: Optional[Mapping[str, torch.Tensor]]) -> Optional[dict[str, torch.Tensor]]:
    return None if features is None else {k: v.detach().cpu() for k, v in features.items()}


def _dataloader(trainer: pl.Trainer, split: str) -> Any:
    """The Trainer's train or val dataloader (the first one when there are several), or None."""
    loop = trainer.fit_loop if split == "train" else trainer.fit_loop.epoch_loop.val_loop
    source = getattr(loop, "_data_source", None)
    try:
        loader = source.dataloader() if source is not None and source.is_defined() else None
    except Exception:  # a LightningModule without the hook
        loader = None
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()), None)
    return loader
