"""The probe's features recorded during Lightning's own validation pass, so a logging point runs no extra forward.

When the probe is the validation loader's first N examples (``"val:N"``, the default) and validation
runs on the weights of a logging point, the layers' outputs for those examples already flow through
the model: :class:`ValidationRecording` puts the capture hooks on the module for the first batches
of validation dataloader 0 and takes them off once N examples are recorded (or validation ends).

It records only what a separate probe pass would compute: each batch's input, as the module's
``forward`` receives it, must equal the probe's next examples (after the precision plugin's input
conversion), in order; the module must be called with that tensor alone; validation runs it in
eval mode under the precision plugin's ``val_step_context``, as the probe pass does. Anything else
(a shuffled or shorter loader, a ``validation_step`` that transforms its input or calls submodules
directly, a hook that fails) abandons the recording silently, and the logging point runs the
separate probe pass instead. The hooks never raise into the validation step.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_repsim.callbacks._probing import ProbeRunner
from lightning_repsim.capture.layers import _unwrap
from lightning_repsim.capture.outputs import check_reduction
from lightning_repsim.capture.recorder import _install, _recording, block_recording


class ValidationRecording:
    """Records the probe's features during one validation epoch of ``trainer``, at global step ``step``.

    Call :meth:`batch_start` from ``on_validation_batch_start``, :meth:`release` from
    ``on_validation_batch_end`` and ``on_validation_end``, and :meth:`take` at the logging point.
    """

    def __init__(self, runner: ProbeRunner, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        self.runner = runner
        self.trainer = trainer
        self.pl_module = pl_module  # the key of the runner's default blocks
        self.module = _unwrap(pl_module)
        self.step = step
        self.n = len(runner.probe)
        self.offset = 0  # probe examples recorded so far
        self._keep = 0  # of the batch being recorded
        self.failed = False
        self.armed = False  # inside the module's forward of a recorded batch
        self._batch_open = False  # the current batch's first forward has not started yet
        self._handles: list[Any] = []
        self._recorder: Any = None
        self._selected: list[str] = []

    @property
    def complete(self) -> bool:
        return not self.failed and self.offset >= self.n

    def batch_start(self, batch_idx: int, dataloader_idx: int) -> None:
        """A validation batch starts: the first batch of dataloader 0 installs the hooks."""
        self._batch_open = dataloader_idx == 0 and not self.failed and not self.complete
        if not self._batch_open or self._handles:
            return
        if batch_idx != 0 or self.offset:
            self._fail()
            return
        try:
            runner = self.runner
            settings: dict[str, Any] = {
                "layouts": check_reduction(runner.max_features, runner.layout, runner.token_reduction),
                "token_reduction": runner.token_reduction,
                "max_features": runner.max_features,
                "output_selector": runner.output_selector,
            }
            if runner.layers is None:  # the default layers: the blocks the first probe pass found
                blocks = runner.known_blocks(self.pl_module)
                if not blocks:
                    self._fail()
                    return
                self._recorder, self._selected = block_recording(self.module, blocks, **settings)
            else:
                self._recorder, self._selected = _recording(self.module, runner.layers, **settings)
            self._handles = _install(self._recorder, self._selected, gate=self._recording, on_error=self._error)
            self._handles.append(
                self.module.register_forward_pre_hook(self._module_pre_hook, with_kwargs=True, prepend=True)
            )
            self._handles.append(self.module.register_forward_hook(self._module_hook))
        except Exception:  # a selector the probe pass will report: no recording here
            self._fail()

    def release(self) -> None:
        """Take the hooks off once the recording is complete or abandoned."""
        if self.failed or self.complete:
            self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.armed = self._batch_open = False

    def take(self, step: int) -> dict[str, torch.Tensor] | None:
        """The recorded features when they are complete and of global step ``step``, else None."""
        self.remove()
        if not self.complete or step != self.step or self._recorder is None:
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a layer left out: the probe pass decides and warns
                features = self._recorder.block_features(self._selected)
        except Exception:
            return None
        # validation runs under inference mode: its tensors become ordinary ones here, outside it
        return {name: x.clone() if x.is_inference() else x for name, x in features.items()}

    # ------------------------------------------------------------------ hooks

    def _recording(self) -> bool:
        return self.armed

    def _error(self, err: Exception) -> None:
        self._fail()

    def _fail(self) -> None:
        self.failed = True
        self.armed = self._batch_open = False

    def _module_pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._batch_open:
            return
        self._batch_open = False  # only the batch's first forward is the probe's
        try:
            x = args[0] if len(args) == 1 and not kwargs else None
            if not isinstance(x, torch.Tensor) or x.ndim == 0:
                self._fail()
                return
            keep = min(x.shape[0], self.n - self.offset)
            expected = self.runner.probe.to(x.device)[self.offset : self.offset + keep]
            expected = self.trainer.precision_plugin.convert_input(expected)
            if x.dtype != expected.dtype or x.shape[1:] != expected.shape[1:] or not torch.equal(x[:keep], expected):
                self._fail()
                return
            self._recorder.start_batch(x.shape[0], keep if keep < x.shape[0] else None)
            self._keep = keep
            self.armed = True
        except Exception:
            self._fail()

    def _module_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.armed:
            self.armed = False
            if not self.failed:
                self.offset += self._keep


def rides_validation(
    trainer: pl.Trainer, every_n_epochs: int | None, every_n_train_steps: int | None, custom_forward: bool
) -> bool:
    """Whether the validation starting now runs on the weights of the next logging point (the end of a
    logging epoch of ``fit``) and can record the probe: not in the sanity check, not with a custom
    ``forward`` (the validation step cannot tell it ran it), not under DDP (each rank validates its share)."""
    return not (
        trainer.sanity_checking
        or trainer.state.fn != "fit"  # not validate()
        or every_n_train_steps is not None
        or every_n_epochs is None
        or (trainer.current_epoch + 1) % every_n_epochs
        or custom_forward
        or trainer.world_size > 1
    )
