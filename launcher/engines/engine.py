"""What the training loop asks of an engine, and the engine the plan names: DDP or one process (ddp.py),
torch's FSDP2 (fsdp.py) or DeepSpeed ZeRO (zero.py).

Mixed precision means the same in every engine and on every device: autocast over fp32 weights, applied by
the launcher (modules.py; Accelerate would silently train fp16 in fp32 on the CPU), with a loss scaler for
fp16 that FSDP makes shard-aware and DeepSpeed leaves out.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..plan import Plan


class Engine(Protocol):
    """The wrapped model and the per-step operations of the training loop (train/loop.py), with what the engine
    can do as plain attributes rather than its type."""

    model: nn.Module  # what training calls (DDP's wrapper, DeepSpeed's engine), autocast applied
    module: nn.Module  # the recipe's own module (sharded in place by FSDP2)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None  # fp16's loss scaler, where the launcher keeps one
    clip: float  # the total gradient norm is clipped to this (0: off), from the plan at build time in every engine
    whole_gradients: bool  # every rank holds whole gradients after the backward (what the health checks read)
    buckets: bool  # DDP's reducer: every trainable parameter must get a gradient, in buckets to settle on resume

    def sync(self, enabled: bool) -> None:
        """Reduce gradients in the next backward only when enabled: the last micro-step."""

    def backward(self, loss: torch.Tensor) -> None:
        """The backward of a micro-step's loss, divided by the accumulation steps once."""

    def update(self, rescale: torch.Tensor | None = None) -> float:
        """Clip to `clip` and step unless the gradient norm is not finite; the norm before clipping, read back once."""

    def skip(self) -> None:
        """Drop this step's gradients without an update; the schedule advances with the data."""

    def lr(self) -> float: ...

    def first_nonfinite(self) -> str | None:
        """The name of the first parameter whose gradient is not finite, where the gradients are still there."""

    def reshard(self) -> None:
        """Free parameters gathered by a forward without a backward (an evaluation)."""

    def sync_buffers(self) -> None:
        """Give every rank rank zero's buffers (batch-norm statistics drift apart between forwards)."""

    def state_dict(self) -> dict:
        """What state.pt holds beside the shards: the schedule, the loss scaler (every rank calls it, rank 0's is
        written)."""

    def load_state_dict(self, state: dict) -> None: ...

    def sharded(self) -> dict | None:
        """The model and optimizer as each rank holds them, for DCP (runs/sharded.py); None where the engine
        writes files of its own instead (DeepSpeed)."""

    def load_sharded(self, state: dict) -> None:
        """sharded()'s state, filled by DCP, into the model and optimizer."""

    def load_model(self, weights: dict) -> None:
        """Whole tensors by parameter name into the model alone: another engine's checkpoint, whose optimizer
        state this engine cannot take (DeepSpeed's partitions to DDP or FSDP, and the other way)."""

    def save_files(self, folder: Path) -> None:
        """Files of the engine's own in the checkpoint folder (DeepSpeed's partitions), from every rank."""

    def load_files(self, folder: Path) -> None: ...


def build(acc, plan: Plan, module: nn.Module, make_optimizer: Callable) -> Engine:
    """The engine the plan names, around the recipe's module; `make_optimizer(module)` gives (optimizer,
    scheduler), created once the engine has placed the parameters. Fails rather than run another engine than
    asked for."""
    if plan.engine == "deepspeed":
        from . import zero

        return zero.build(plan, module, make_optimizer)
    if plan.engine == "fsdp":
        from . import fsdp

        return fsdp.build(plan, module, make_optimizer)
    from . import ddp

    return ddp.build(acc, plan, module, make_optimizer)
