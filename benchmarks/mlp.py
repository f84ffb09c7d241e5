"""The benchmark recipe: a tiny MLP on random data, where per-step overhead dominates.

Both sides of benchmarks/overhead.py build their model and data from this file.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from launcher import Splits


@dataclass
class Hparams:
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.05
    samples: int = 4096


def data(hp: Hparams) -> Splits:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(hp.samples, 64, generator=g)
    return Splits(train=TensorDataset(x, torch.randint(0, 10, (hp.samples,), generator=g)))


def model(hp: Hparams) -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def loss(hp: Hparams):
    return nn.CrossEntropyLoss()
