"""Contrastive views of the digits, for the pre-flight's tests: an encoder of two views of each image (the image,
and the image mirrored), scored by InfoNCE against the other images of its batch (labels 0 … N-1: in-batch
negatives), as SimCLR and CLIP train.

--random-views   the second view is the image with Gaussian noise drawn inside step(): evaluation (which runs
                 step, there being no eval_step) sees other inputs each time
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
import digits  # noqa: E402

data = digits.data
best = ("val/loss", "min")


@dataclass
class Hparams(digits.Hparams):
    temperature: float = 0.1
    random_views: bool = False


def model(hp: Hparams) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hp.hidden), nn.GELU(), nn.Linear(hp.hidden, 32))


def step(model, batch, hp: Hparams):
    x, _ = batch
    other = x + 0.3 * torch.randn_like(x) if hp.random_views else x.reshape(-1, 8, 8).flip(-1).reshape(-1, 64)
    a, b = F.normalize(model(x), dim=-1), F.normalize(model(other), dim=-1)
    return F.cross_entropy(a @ b.T / hp.temperature, torch.arange(len(x), device=x.device))
