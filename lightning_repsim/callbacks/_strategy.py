"""What the callbacks require of the Trainer's strategy, checked in one place.

Both callbacks act on whole layers of the LightningModule on every rank, so sharded strategies
(FSDP, DeepSpeed, model parallel), whose ranks hold slices of the parameters, are refused.
"""

from __future__ import annotations

from typing import Any

from lightning_repsim.errors import RepSimValueError


def _sharded_strategies() -> tuple[type, ...]:
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy

    sharded: tuple[type, ...] = (DeepSpeedStrategy, FSDPStrategy)
    try:
        from pytorch_lightning.strategies import ModelParallelStrategy

        sharded += (ModelParallelStrategy,)
    except ImportError:  # pragma: no cover - older Lightning
        pass
    return sharded


def refuse_sharded(strategy: Any, why: str) -> None:
    """Raise a RepSimValueError naming ``strategy`` when it shards the parameters.

    ``why`` says what needs whole layers."""
    if isinstance(strategy, _sharded_strategies()):
        raise RepSimValueError(
            f"{why}, so the sharded strategy {type(strategy).__name__} is not supported: use "
            "strategy='ddp' (or 'ddp_spawn'), a single device, or remove the callback."
        )


def ddp_finds_unused_parameters(strategy: Any) -> tuple[bool, bool]:
    """``(is DDP, finds unused parameters without a static graph)`` for a strategy.

    Once the strategy has wrapped the model (from ``on_fit_start`` on), torch's own
    ``DistributedDataParallel.find_unused_parameters`` and ``static_graph`` say it. Before that,
    in ``setup``, Lightning offers no public view of the options it will pass to DDP; they are read
    from the strategy's ``_ddp_kwargs`` when present, so that the error comes before any work, and
    otherwise the check waits for the wrapped model.
    """
    from pytorch_lightning.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(strategy, DDPStrategy):
        return False, True
    wrapped = getattr(strategy, "model", None)
    if isinstance(wrapped, DistributedDataParallel):
        return True, bool(wrapped.find_unused_parameters) and not bool(getattr(wrapped, "static_graph", False))
    options = getattr(strategy, "_ddp_kwargs", None)
    if not isinstance(options, dict):
        return True, True  # decided once the model is wrapped
    return True, bool(options.get("find_unused_parameters", False)) and not options.get("static_graph", False)


def require_unused_parameter_search(strategy: Any) -> None:
    """FreezeTraining's requirements: no sharded strategy, and DDP only with ``find_unused_parameters=True``."""
    refuse_sharded(
        strategy,
        "FreezeTraining freezes units one by one, and sharded parameters are flattened and spread across ranks",
    )
    is_ddp, finds_unused = ddp_finds_unused_parameters(strategy)
    if is_ddp and not finds_unused:
        raise RepSimValueError(
            "FreezeTraining freezes units after DDP has wrapped the model; DDP then waits for gradients of "
            "the frozen parameters that never come and Lightning stops with 'parameters that were not used "
            "in producing the loss'. Create the Trainer with strategy='ddp_find_unused_parameters_true' (or "
            "'ddp_spawn_find_unused_parameters_true'), or strategy=DDPStrategy(find_unused_parameters=True), "
            "without static_graph=True."
        )
