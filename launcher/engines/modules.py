"""What every engine does to the recipe's module alike: mixed precision by autocast, and its buffers
broadcast from rank zero or kept as they were."""

from __future__ import annotations

from contextlib import contextmanager
from types import MethodType

import torch
from torch import nn

from ..plan import Plan

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(module: nn.Module, plan: Plan) -> None:
    """Mixed precision as Accelerate's prepare_model applies it: the forward under autocast, outputs in fp32."""
    if plan.precision in AUTOCAST:
        from accelerate.utils import convert_outputs_to_fp32

        context = torch.autocast(plan.device, dtype=AUTOCAST[plan.precision])
        module.forward = MethodType(convert_outputs_to_fp32(context(module.forward.__func__)), module)


def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank zero's buffers (batch-norm statistics drift apart between forwards)."""
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
