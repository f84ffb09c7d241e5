"""DDP (or one process) as an engine: Accelerate's DDP wrapper around the recipe's module, and the per-step
operations a careful hand-written loop does — no prepared dataloader or optimizer wrappers, which cost about
half the speed on short steps (benchmarks/overhead.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..plan import Plan
from .modules import autocast, broadcast_buffers


def build(acc, plan: Plan, module: nn.Module, make_optimizer) -> Ddp:
    autocast(module, plan)
    if plan.compile:
        module.compile()  # in place: parameter names, and so checkpoints, stay those of the recipe's module
    optimizer, scheduler = make_optimizer(module)
    scaler = torch.amp.GradScaler(plan.device) if plan.precision == "fp16" else None
    return Ddp(acc.prepare_model(module), module, optimizer, scheduler, plan.grad_accum, scaler, plan.clip_grad)


@dataclass
class Ddp:
    """The wrapped model plus the per-step operations (see engine.Engine), with whole gradients on every rank."""

    model: nn.Module  # what training calls: DDP-wrapped when distributed, autocast applied
    module: nn.Module  # the recipe's own module: no DDP communication hooks
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    accum: int
    scaler: torch.amp.GradScaler | None
    clip: float
    whole_gradients = True
    params: list = field(init=False)

    def __post_init__(self):
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    @property
    def buckets(self) -> bool:
        return isinstance(self.model, DistributedDataParallel)

    def sync(self, enabled: bool) -> None:
        """All-reduce gradients in the next backward only when enabled: the last micro-step."""
        if self.buckets:
            self.model.require_backward_grad_sync = enabled

    def backward(self, loss: torch.Tensor) -> None:
        if self.accum > 1:
            loss = loss / self.accum  # the one place the loss is normalised for accumulation
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def local(self, grad: torch.Tensor) -> torch.Tensor:
        """The part of a gradient this rank holds."""
        return grad

    def grad_norm(self, rescale: torch.Tensor | None) -> torch.Tensor:
        """Total gradient norm before clipping; clips to `clip` when it is > 0. Sync steps only. `rescale`
        multiplies the gradients first (a step's counts, see train/counts.py)."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if rescale is not None:
            grads = [self.local(p.grad) for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, rescale.to(grads[0].device))
        if self.clip > 0:
            return torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        return torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])

    def update(self, rescale: torch.Tensor | None = None) -> float:
        """Clip and step unless the gradient norm is not finite (a loss scaler skips such steps itself and is
        stepped anyway); the norm before clipping, read back once."""
        norm = self.grad_norm(rescale).item()
        if math.isfinite(norm) or self.scaler:
            self.step()
        return norm

    def step(self) -> None:
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        """Drop this step's gradients without an update; the schedule advances with the data."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def state_dict(self) -> dict:
        """What state.pt holds: the schedule and the loss scaler; the model and optimizer are sharded()."""
        return {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict) -> None:
        if "model" in state:  # a checkpoint from before they were sharded: whole tensors in state.pt
            self.load_whole(state)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):  # DeepSpeed's checkpoints keep theirs in its partitions
            self.scaler.load_state_dict(state["scaler"])

    def load_whole(self, state: dict) -> None:
        self.load_model(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def load_model(self, weights: dict) -> None:
        """Whole tensors by parameter name (another engine's checkpoint) into the model; the optimizer as built."""
        self.module.load_state_dict(weights)

    def sharded(self) -> dict:
        """The model and optimizer as DCP saves and loads them: keyed by parameter name whatever the engine, each
        rank's own tensors (FSDP's shards), the optimizer's state made if no step has run yet."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.module, self.optimizer)
        return {"model": model, "optimizer": optimizer}

    def load_sharded(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def first_nonfinite(self) -> str | None:
        """The name of the first parameter whose gradient (this rank's part of it) is not finite."""
        for name, p in self.module.named_parameters():
            if p.grad is not None and not torch.isfinite(self.local(p.grad)).all():
                return name
        return None

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save_files(self, folder: Path) -> None:
        """Whole tensors go into state.pt (state_dict): nothing else to write."""

    def load_files(self, folder: Path) -> None:
        pass

    def reshard(self) -> None:
        """Nothing is gathered."""

    def sync_buffers(self) -> None:
        if self.buckets:
            broadcast_buffers(self.module)
