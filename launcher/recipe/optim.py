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


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None,
                 lr_factors: dict[str, float] | None = None) -> list[dict]:
    """Decay matrices and convolution kernels; leave biases and normalisation gains alone. With `lr_factors`
    {parameter-name prefix: factor}, the parameters under a prefix (the longest that matches) learn at
    lr × factor: {"backbone.": 0.1} fine-tunes a pretrained backbone ten times slower than the head."""
    lr_factors = lr_factors or {}
    if lr_factors and lr is None:
        raise ValueError("param_groups: lr_factors need the base lr")
    names = [name for name, _ in model.named_parameters()]
    for prefix in lr_factors:
        if not any(name.startswith(prefix) for name in names):
            raise ValueError(f"param_groups: no parameter name starts with {prefix!r} (names look like {names[0]!r})")
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            prefix = max((q for q in lr_factors if name.startswith(q)), key=len, default=None)
            groups.setdefault((lr_factors.get(prefix, 1.0), p.ndim >= 2), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, **({"lr": lr * f} if lr_factors else {})}
            for (f, decay), params in sorted(groups.items(), key=lambda g: (-g[0][0], not g[0][1]))]


def freeze(model: nn.Module, *prefixes: str) -> int:
    """Stop training every parameter whose name starts with one of the prefixes (call it in model(hp), before
    the optimizer is built); returns how many elements were frozen."""
    frozen, used = 0, set()
    for name, p in model.named_parameters():
        hit = [q for q in prefixes if name.startswith(q)]
        if hit:
            p.requires_grad_(False)
            frozen += p.numel()
            used.update(hit)
    unused = [q for q in prefixes if q not in used]
    if unused:
        raise ValueError(f"freeze: no parameter name starts with {unused[0]!r}")
    return frozen


def default_optimizer(model: nn.Module, hp, total_steps: int):
    """AdamW with warm-up + cosine, from hp.lr and, where the recipe defines them, hp.weight_decay and hp.warmup."""
    opt = torch.optim.AdamW(param_groups(model, getattr(hp, "weight_decay", 0.0)), lr=hp.lr)
    return opt, warmup_cosine(opt, total_steps, getattr(hp, "warmup", 0.0))
