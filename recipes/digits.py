"""Handwritten digits with a small MLP: the embedded default.

Real data that ships with the repository (recipes/data/digits.csv.gz, 1,797 8×8
images of the digits 0-9, see recipes/data/README.md), so it runs anywhere,
offline, in seconds on a laptop CPU:

    launch recipes/digits.py --cpu --procs 2

A recipe is this whole file: hyperparameters, data, model, loss, metrics.
Copy it to start your own.
"""

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from launcher import Splits

DATA = Path(__file__).parent / "data" / "digits.csv.gz"


@dataclass
class Hparams:
    epochs: int = 30
    batch_size: int = 64  # global: samples per optimizer step, however many processes share them
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of the optimizer steps
    hidden: int = 256
    dropout: float = 0.2


best = ("val/acc", "max")  # the evaluation that picks checkpoints/best


def data(hp: Hparams) -> Splits:
    with gzip.open(DATA, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(table[:, :-1]) / 8 - 1  # pixel counts 0..16 → [-1, 1]
    y = torch.from_numpy(table[:, -1]).long()
    # a fixed split, whatever the training seed: 20 % test, 10 % validation
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, val, train = order[:360], order[360:540], order[540:]
    return Splits(train=TensorDataset(x[train], y[train]), val=TensorDataset(x[val], y[val]),
                  test=TensorDataset(x[test], y[test]))


def model(hp: Hparams) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, hp.hidden), nn.GELU(), nn.Dropout(hp.dropout),
        nn.Linear(hp.hidden, hp.hidden), nn.GELU(), nn.Dropout(hp.dropout),
        nn.Linear(hp.hidden, 10),
    )


def loss(hp: Hparams):
    return nn.CrossEntropyLoss()


def metrics(hp: Hparams) -> dict:
    return {"acc": MulticlassAccuracy(num_classes=10, average="micro")}
