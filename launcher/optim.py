"""The default optimizer and schedule, and the helpers recipes use to build their own.

Schedules count optimizer steps — one per `engine.step()`, whatever the number
of processes or accumulation steps — so the same hyperparameters give the same
learning-rate curve on 1 or N processes.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.0, final: float = 0.0):
    """Linear warm-up over `warmup` (a fraction of total_steps), then a cosine from 1 to `final` (× base lr)."""
    warm = round(warmup * total_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and convolution kernels; leave biases and normalisation gains alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def default_optimizer(model: nn.Module, hp, total_steps: int):
    """AdamW with warm-up + cosine, from hp.lr and, where the recipe defines them, hp.weight_decay and hp.warmup."""
    opt = torch.optim.AdamW(param_groups(model, getattr(hp, "weight_decay", 0.0)), lr=hp.lr)
    return opt, warmup_cosine(opt, total_steps, getattr(hp, "warmup", 0.0))
