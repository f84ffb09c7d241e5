"""Build the run with Accelerate, and the few operations the loop calls each step.

Accelerate builds: process group, device, DDP wrapper, autocast, loss scaler.
The per-step path then does only what a careful hand-written loop does (no
prepared dataloader or optimizer wrappers, which cost about half the speed on
short steps; see benchmarks/overhead.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .plan import Plan

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def accelerator(plan: Plan):
    """The Accelerator the plan asks for; fails loudly rather than run something else."""
    from accelerate import Accelerator

    guard(int(os.environ.get("WORLD_SIZE", "1")), plan)
    if plan.world_size > 1:
        join(plan)
    acc = Accelerator(cpu=plan.device == "cpu", mixed_precision=MIXED_PRECISION[plan.precision])
    guard(acc.num_processes, plan)
    if acc.device.type != plan.device:
        raise RuntimeError(f"planned device {plan.device} but Accelerate chose {acc.device}")
    if plan.precision != "fp32" and not acc.native_amp:
        raise RuntimeError(f"{plan.precision} mixed precision is not available on {acc.device}")
    return acc


def join(plan: Plan) -> None:
    """Join the process group (Accelerate then finds it ready), with two things env:// does not give:
    keys of their own in the launcher's store for every restart attempt (else a restarted worker can read
    the address of a dead one and hang), and the plan's timeout for a collective waiting on a silent rank."""
    env = os.environ
    store = torch.distributed.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), plan.world_size, is_master=False,
                                       timeout=timedelta(seconds=plan.timeout))
    store = torch.distributed.PrefixStore(f"launcher/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    if plan.device == "cuda":
        torch.cuda.set_device(int(env["LOCAL_RANK"]))
    torch.distributed.init_process_group("gloo" if plan.device == "cpu" else "nccl", store=store,
                                         rank=int(env["RANK"]), world_size=plan.world_size,
                                         timeout=timedelta(seconds=plan.timeout))


def guard(seen: int, plan: Plan) -> None:
    """A worker that sees another world than planned would train a separate model, silently: stop it."""
    if seen != plan.world_size:
        raise RuntimeError(
            f"this process sees a world of {seen} process(es) but the plan has {plan.world_size}: "
            "it would train a separate model instead of joining the job (were RANK/WORLD_SIZE/LOCAL_RANK lost?)"
        )


@dataclass
class Engine:
    """The wrapped model plus the per-step operations, for DDP (or one process)."""

    model: nn.Module  # what training calls: DDP-wrapped when distributed, autocast applied
    module: nn.Module  # the recipe's own module: the same parameters, no communication hooks
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    accum: int
    scaler: torch.amp.GradScaler | None

    def __post_init__(self):
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.ddp = isinstance(self.model, DistributedDataParallel)

    def sync(self, enabled: bool) -> None:
        """All-reduce gradients in the next backward only when enabled (the last micro-step)."""
        if self.ddp:
            self.model.require_backward_grad_sync = enabled

    def backward(self, loss: torch.Tensor) -> None:
        if self.accum > 1:
            loss = loss / self.accum  # the one place the loss is normalised for accumulation
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def grad_norm(self, clip: float) -> torch.Tensor:
        """Total gradient norm before clipping; clips to `clip` when it is > 0. Sync steps only."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if clip > 0:
            return torch.nn.utils.clip_grad_norm_(self.params, clip)
        return torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])

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
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])

    def first_nonfinite(self) -> str | None:
        """The name of the first parameter whose gradient is not finite."""
        for name, p in self.module.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return name
        return None

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def sync_buffers(self) -> None:
        """Give every rank rank zero's buffers (batch-norm statistics drift apart between forwards)."""
        if self.ddp:
            for b in self.module.buffers():
                torch.distributed.broadcast(b, 0)


def build(acc, module: nn.Module, optimizer, scheduler, accum: int) -> Engine:
    return Engine(acc.prepare_model(module), module, optimizer, scheduler, accum, acc.scaler)
