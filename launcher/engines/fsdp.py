"""FSDP2 as an engine: torch's `fully_shard`, applied here (Accelerate 1.15 silently trains DDP instead when
asked for FSDP on the CPU). The loop is DDP's (ddp.py) on sharded tensors: what differs is below."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from ..plan import Plan
from .ddp import Ddp
from .modules import autocast, broadcast_buffers


def build(plan: Plan, module: nn.Module, make_optimizer) -> Fsdp:
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    autocast(module, plan)
    shard(module, plan)
    if not all(isinstance(p, DTensor) for p in module.parameters()):
        raise RuntimeError("--engine fsdp: some parameters were not sharded")
    optimizer, scheduler = make_optimizer(module)  # after sharding: it holds the sharded parameters
    # each rank sees only its shard's gradients: the scaler agrees on an overflow across ranks
    scaler = ShardedGradScaler(plan.device) if plan.precision == "fp16" else None
    return Fsdp(module, module, optimizer, scheduler, plan.grad_accum, scaler, plan.clip_grad)


class Fsdp(Ddp):
    """DDP's per-step operations on a module sharded in place: each rank holds a shard of every gradient."""

    whole_gradients = False

    @property
    def buckets(self) -> bool:
        return False

    def sync(self, enabled: bool) -> None:
        """Reduce-scatter gradients in the next backward only when enabled: the last micro-step."""
        self.module.set_requires_gradient_sync(enabled)

    def local(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.to_local()

    def grad_norm(self, rescale: torch.Tensor | None) -> torch.Tensor:
        return super().grad_norm(rescale).full_tensor()  # a replicated DTensor of the global norm

    def load_whole(self, state: dict) -> None:
        """A checkpoint from before they were sharded: every rank holds the whole state and keeps its shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        self.load_model(state["model"])
        set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))

    def load_model(self, weights: dict) -> None:
        """Every rank holds the whole tensors and keeps its shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.module, weights, options=StateDictOptions(full_state_dict=True))

    def reshard(self) -> None:
        """--sharding grad-op keeps parameters gathered after a forward without a backward (an evaluation):
        free them."""
        for m in self.module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def sync_buffers(self) -> None:
        broadcast_buffers(self.module)


def shard(module: nn.Module, plan: Plan) -> None:
    """FSDP2 in place: each block (a child with a forward of its own and parameters nobody else shares) is
    one communication group, and the root holds the rest. `--sharding full` frees gathered parameters after
    the forward (ZeRO-3-like), `grad-op` keeps them until the backward (ZeRO-2-like, more memory, less
    communication); `--offload both` keeps parameters, gradients and the optimizer step on the CPU."""
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
