"""The mechanics of :class:`~lightning_repsim.callbacks.FreezeTraining`: finding the units, freezing them.

A unit is a :class:`~lightning_repsim.capture.Block`: the modules that freeze at once. Freezing a
unit sets ``requires_grad=False`` on each of its parameters (autograd then builds no backward
graph for a frozen prefix) and collects its BatchNorm layers, which the callback keeps in eval
mode; the callback drops the frozen parameters' gradients before every optimizer step. When each
unit freezes is the schedules' business (:mod:`.freeze_schedules`, :mod:`.freeze_similarity`).
Also here: the units and frozen set a checkpoint restores, and the freeze curves written to the loggers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_repsim.capture import Block, default_blocks
from lightning_repsim.capture.blocks import no_block_error
from lightning_repsim.errors import RepSimError, RepSimValueError, RepSimWarning


def single_blocks(units: list[str]) -> dict[str, Block]:
    """Units named explicitly: each module its own unit and output."""
    return {unit: Block(unit, (unit,), unit) for unit in units}


def discover_blocks(pl_module: nn.Module, forward: Callable[[], Any], device: torch.device) -> list[Block]:
    """The model's blocks with parameters, in execution order, from one ``forward()`` on the first batch's inputs.

    Raises:
        RepSimValueError: the forward failed, or no block holds parameters.
    """
    try:
        with isolated_rng(device):
            blocks = default_blocks(pl_module, forward)
    except RepSimError:
        raise
    except Exception as err:
        raise RepSimValueError(
            f"FreezeTraining could not run {type(pl_module).__name__} on the inputs of the first training batch "
            f"to find its units ({type(err).__name__}: {err}). Pass units=[...] explicitly, or override "
            "FreezeTraining.batch_inputs / probe_forward."
        ) from err
    if not blocks:
        raise no_block_error(pl_module, "units")
    return blocks


def check_units(pl_module: nn.Module, members: Mapping[str, Sequence[str]]) -> None:
    """Refuse units (``{unit: its module paths}``) that are not submodules or that nest; warn about empty ones."""
    modules = dict(pl_module.named_modules())
    units = list(members)
    missing = [m for unit in units for m in members[unit] if m not in modules or m == ""]
    if missing:
        raise RepSimValueError(
            f"FreezeTraining: units {missing} are not submodules of {type(pl_module).__name__}; "
            f"available top-level modules: {[n for n, _ in pl_module.named_children()]}."
        )
    for a in units:
        for b in units:
            if a != b and any(y.startswith(x + ".") or x == y for x in members[a] for y in members[b]):
                raise RepSimValueError(f"FreezeTraining: unit {b!r} lies inside unit {a!r}; units must not nest.")
    empty = [u for u in units if not any(next(modules[m].parameters(), None) is not None for m in members[u])]
    if empty:
        rank_zero_warn(f"FreezeTraining: units {empty} hold no parameters; freezing them changes nothing.")


def freeze_modules(
    pl_module: nn.Module, paths: Iterable[str], train_bn: bool
) -> tuple[list[nn.Parameter], list[_BatchNorm]]:
    """``requires_grad=False`` on every parameter of the modules at ``paths``; their parameters (each once)
    and, unless ``train_bn``, their BatchNorm layers (for the caller to keep in eval mode)."""
    params: dict[int, nn.Parameter] = {}
    bns: list[_BatchNorm] = []
    for path in paths:
        module = pl_module.get_submodule(path)
        for param in module.parameters():
            params[id(param)] = param
        if not train_bn:
            bns.extend(m for m in module.modules() if isinstance(m, _BatchNorm))
    for param in params.values():
        param.requires_grad_(False)
    return list(params.values()), bns


def restored_units(
    state_dict: Mapping[str, Any], requested: list[str] | None
) -> tuple[list[str] | None, dict[str, Block], list[str]]:
    """``(units, blocks, frozen)`` from a checkpoint's state; units given to the callback (``requested``) win.

    Raises:
        RepSimValueError: the checkpoint's frozen units are not among the units.
    """
    units = state_dict.get("units")
    if requested is not None and units is not None and list(units) != requested:
        rank_zero_warn(
            f"FreezeTraining: the checkpoint was written with units {units}, this callback has "
            f"{requested}; keeping this callback's units."
        )
        units = requested
    blocks = {} if units is None else single_blocks(units)
    if units is not None and requested is None:  # version 1 has no "blocks": one module each
        for unit, block in dict(state_dict.get("blocks") or {}).items():
            if unit in blocks:
                blocks[unit] = Block(unit, tuple(block["modules"]), str(block["output"]))
    frozen = list(state_dict.get("frozen", []))
    if units is not None:
        unknown = [u for u in frozen if u not in units]
        if unknown:
            raise RepSimValueError(
                f"FreezeTraining: the checkpoint's frozen units {unknown} are not among the units {units}."
            )
    return None if units is None else list(units), blocks, frozen


def log_freeze_state(
    loggers: Iterable[Any], points: Sequence[tuple[int, dict[str, float]]], text: str, step: int
) -> None:
    """``points`` (``(step, metrics)``) to every logger and ``text`` to TensorBoard as ``freeze/events``.

    A logger that fails (a full disk, a dead writer) costs a warning, never the fit.
    """
    for logger in loggers:
        try:
            for at, values in points:
                logger.log_metrics(values, step=at)
            if text and isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("freeze/events", text, global_step=step)
        except Exception as err:  # logging must never stop training
            rank_zero_warn(
                f"FreezeTraining could not log to {type(logger).__name__} ({type(err).__name__}: {err}); "
                "freezing goes on.",
                category=RepSimWarning,
            )


def count_parameters(params: Iterable[nn.Parameter]) -> int:
    """Elements in ``params``, each parameter counted once."""
    seen: dict[int, int] = {}
    for p in params:
        seen[id(p)] = p.numel()
    return sum(seen.values())


def bounded(total: int | float | None) -> bool:
    """Whether a training length (``trainer.estimated_stepping_batches``) is finite and positive."""
    return isinstance(total, (int, float)) and math.isfinite(total) and total > 0


def isolated_rng(device: torch.device) -> Any:
    """Run a side pass (discovery, probe) without consuming the training run's random numbers."""
    return torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])
