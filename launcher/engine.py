"""Build the run with Accelerate (DDP), torch's FSDP2 or DeepSpeed (zero.py), and the few operations the
loop calls each step.

Accelerate builds the device and the DDP wrapper. FSDP2 is torch's `fully_shard`, applied here:
Accelerate 1.15 silently trains DDP instead when asked for FSDP on the CPU. The per-step path then does
only what a careful hand-written loop does (no prepared dataloader or optimizer wrappers, which cost about
half the speed on short steps; see benchmarks/overhead.py). Mixed precision means the same in every engine
and on every device: autocast over fp32 weights, applied here (Accelerate would silently train fp16 in
fp32 on the CPU), with a loss scaler for fp16 that FSDP makes shard-aware.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import MethodType

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .plan import Plan

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def accelerator(plan: Plan):
    """The Accelerator the plan asks for; fails loudly rather than run something else."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    guard(int(os.environ.get("WORLD_SIZE", "1")), plan)
    if plan.world_size > 1 or plan.engine != "ddp":  # sharding needs a process group, even of one
        join(plan)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=plan.find_unused_parameters)
    acc = Accelerator(cpu=plan.device == "cpu", kwargs_handlers=[ddp])  # precision is the launcher's: see autocast()
    guard(acc.num_processes, plan)
    if acc.device.type != plan.device:
        raise RuntimeError(f"planned device {plan.device} but Accelerate chose {acc.device}")
    return acc


def join(plan: Plan) -> None:
    """Join the process group (Accelerate then finds it ready), with two things env:// does not give:
    keys of their own in the launcher's store for every restart attempt (else a restarted worker can read
    the address of a dead one and hang), and the plan's timeout for a collective waiting on a silent rank."""
    env = os.environ
    if "MASTER_ADDR" in env:
        store = torch.distributed.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), plan.world_size,
                                           is_master=False, timeout=timedelta(seconds=plan.timeout))
        store = torch.distributed.PrefixStore(f"launcher/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    else:  # one process, inside launch itself
        store = torch.distributed.HashStore()
    if plan.device == "cuda":
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("gloo" if plan.device == "cpu" else "nccl", store=store,
                                         rank=int(env.get("RANK", "0")), world_size=plan.world_size,
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
    """The wrapped model plus the per-step operations, for DDP (or one process) and FSDP2."""

    model: nn.Module  # what training calls: DDP-wrapped when distributed, autocast applied
    module: nn.Module  # the recipe's own module (FSDP2: sharded in place): no DDP communication hooks
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    accum: int
    scaler: torch.amp.GradScaler | None

    def __post_init__(self):
        from torch.distributed.fsdp import FSDPModule

        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.ddp = isinstance(self.model, DistributedDataParallel)
        self.fsdp = isinstance(self.module, FSDPModule)

    def sync(self, enabled: bool) -> None:
        """All-reduce (FSDP: reduce-scatter) gradients in the next backward only when enabled: the last
        micro-step."""
        if self.ddp:
            self.model.require_backward_grad_sync = enabled
        elif self.fsdp:
            self.module.set_requires_gradient_sync(enabled)

    def backward(self, loss: torch.Tensor) -> None:
        if self.accum > 1:
            loss = loss / self.accum  # the one place the loss is normalised for accumulation
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def grad_norm(self, clip: float, rescale: torch.Tensor | None) -> torch.Tensor:
        """Total gradient norm before clipping; clips to `clip` when it is > 0. Sync steps only. `rescale`
        multiplies the gradients first (a step's counts, see trainer.py)."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if rescale is not None:
            grads = [p.grad.to_local() if self.fsdp else p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, rescale.to(grads[0].device))
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        return norm.full_tensor() if self.fsdp else norm  # FSDP: a replicated DTensor of the global norm

    def update(self, clip: float, rescale: torch.Tensor | None = None) -> float:
        """Clip and step unless the gradient norm is not finite (a loss scaler skips such steps itself and is
        stepped anyway); the norm before clipping, read back once."""
        norm = self.grad_norm(clip, rescale).item()
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
        """Whole (unsharded) tensors on the CPU; with FSDP every rank must call it, rank 0 gets them."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )
            whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model = get_model_state_dict(self.module, options=whole)
            optimizer = get_optimizer_state_dict(self.module, self.optimizer, options=whole)
        else:
            model, optimizer = self.module.state_dict(), self.optimizer.state_dict()
        return {"model": model, "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )
            whole = StateDictOptions(full_state_dict=True)  # every rank holds the whole state: keep its shard
            set_model_state_dict(self.module, state["model"], options=whole)
            set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"], options=whole)
        else:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])

    def first_nonfinite(self) -> str | None:
        """The name of the first parameter whose gradient is not finite."""
        for name, p in self.module.named_parameters():
            grad = p.grad.to_local() if self.fsdp and p.grad is not None else p.grad  # this rank's shard
            if grad is not None and not torch.isfinite(grad).all():
                return name
        return None

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save_files(self, folder: Path) -> None:
        """Whole tensors go into state.pt (state_dict): nothing else to write."""

    def load_files(self, folder: Path) -> None:
        pass

    def reshard(self) -> None:
        """FSDP with --sharding grad-op keeps parameters gathered after a forward without a backward (an
        evaluation): free them."""
        if self.fsdp:
            from torch.distributed.fsdp import FSDPModule

            for m in self.module.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

    def sync_buffers(self) -> None:
        """Give every rank rank zero's buffers (batch-norm statistics drift apart between forwards)."""
        if self.ddp or self.fsdp:
            broadcast_buffers(self.module)


def broadcast_buffers(module: nn.Module) -> None:
    for b in module.buffers():
        torch.distributed.broadcast(b, 0)


@contextmanager
def buffers_kept(module: nn.Module):
    """Forwards inside leave the module's buffers (batch-norm statistics) as they found them."""
    saved = [b.clone() for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in zip(module.buffers(), saved, strict=True):
                b.copy_(value)


def build(acc, plan: Plan, module: nn.Module, make_optimizer: Callable) -> Engine:
    """The engine the plan names, around the recipe's module; `make_optimizer(module)` gives (optimizer,
    scheduler), created after sharding so that it holds the sharded parameters. Fails rather than run
    another engine than asked for."""
    if plan.engine == "deepspeed":
        from . import zero

        return zero.build(plan, module, make_optimizer)
    autocast(module, plan)
    if plan.engine == "fsdp":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        from torch.distributed.tensor import DTensor

        shard(module, plan)
        if not all(isinstance(p, DTensor) for p in module.parameters()):
            raise RuntimeError("--engine fsdp: some parameters were not sharded")
        optimizer, scheduler = make_optimizer(module)
        # each rank sees only its shard's gradients: the scaler agrees on an overflow across ranks
        scaler = ShardedGradScaler(plan.device) if plan.precision == "fp16" else None
        return Engine(module, module, optimizer, scheduler, plan.grad_accum, scaler)
    if plan.compile:
        module.compile()  # in place: parameter names, and so checkpoints, stay those of the recipe's module
    optimizer, scheduler = make_optimizer(module)
    scaler = torch.amp.GradScaler(plan.device) if plan.precision == "fp16" else None
    return Engine(acc.prepare_model(module), module, optimizer, scheduler, plan.grad_accum, scaler)


def autocast(module: nn.Module, plan: Plan) -> None:
    """Mixed precision as Accelerate's prepare_model applies it: the forward under autocast, outputs in fp32."""
    if plan.precision in AUTOCAST:
        from accelerate.utils import convert_outputs_to_fp32

        context = torch.autocast(plan.device, dtype=AUTOCAST[plan.precision])
        module.forward = MethodType(convert_outputs_to_fp32(context(module.forward.__func__)), module)


def shard(module: nn.Module, plan: Plan) -> None:
    """FSDP2 in place: each block (a child with a forward of its own and parameters nobody else shares) is
    one communication group, and the root holds the rest. `--sharding full` frees gathered parameters after
    the forward (ZeRO-3-like), `grad-op` keeps them until the backward (ZeRO-2-like, more memory, less
    communication); `--offload both` keeps parameters, gradients and the optimizer step on the CPU."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    options = {"reshard_after_forward": plan.sharding == "full"}
    if plan.offload == "both":
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=plan.device == "cuda")
    for block in blocks(module):
        fully_shard(block, **options)
    fully_shard(module, **options)


def blocks(module: nn.Module) -> list[nn.Module]:
    """The children worth a group of their own, looking into containers without a forward (ModuleList,
    ModuleDict); a child whose parameters are also used outside it (tied weights) stays with the root."""
    uses = Counter(id(p) for _, p in module.named_parameters(remove_duplicate=False))

    def alone(child: nn.Module) -> bool:
        inside = Counter(id(p) for _, p in child.named_parameters(remove_duplicate=False))
        return bool(inside) and all(uses[i] == n for i, n in inside.items())

    found = []
    for child in module.children():
        is_container = isinstance(child, (nn.ModuleList, nn.ModuleDict))
        found += [c for c in child.children() if alone(c)] if is_container else [child] if alone(child) else []
    return found
