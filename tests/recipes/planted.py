"""recipes/digits.py with one fault planted (--fault), for the second round of health checks; --fault none is
digits.py as it is, and --batchnorm adds a healthy batch-norm layer.

--fault near-duplicates   the first --copies test inputs are training inputs plus Gaussian noise of --noise
                          (with the training labels): the byte hash cannot see them
--fault shifted-test      every test label is the next class (a class mapping of the test split's own)
--fault batchnorm-train   a batch-norm layer that stays in training mode: eval() does not reach it
--fault dropout-eval      dropout that stays on in eval mode (training=True passed to the functional call)
--fault frozen-in-optimizer  the first layer frozen, and the optimizer handed every parameter anyway
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from launcher import Splits, warmup_cosine

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
import digits  # noqa: E402

best, loss, metrics = digits.best, digits.loss, digits.metrics


@dataclass
class Hparams(digits.Hparams):
    fault: Literal["none", "near-duplicates", "shifted-test", "batchnorm-train", "dropout-eval",
                   "frozen-in-optimizer"] = "none"
    copies: int = 60
    noise: float = 1e-3
    batchnorm: bool = False


def data(hp: Hparams) -> Splits:
    splits = digits.data(hp)
    (x_train, y_train), (x_test, y_test) = splits.train.tensors, splits.test.tensors
    if hp.fault == "near-duplicates":
        noise = torch.randn(hp.copies, x_train.shape[1], generator=torch.Generator().manual_seed(1))
        x_test, y_test = x_test.clone(), y_test.clone()
        x_test[:hp.copies], y_test[:hp.copies] = x_train[:hp.copies] + hp.noise * noise, y_train[:hp.copies]
    if hp.fault == "shifted-test":
        y_test = (y_test + 1) % 10
    return Splits(train=splits.train, val=splits.val, test=TensorDataset(x_test, y_test))


class StuckInTraining(nn.BatchNorm1d):
    def train(self, mode: bool = True):
        return super().train(True)


class AlwaysDropout(nn.Dropout):
    def forward(self, x):
        return F.dropout(x, self.p, training=True)


def model(hp: Hparams) -> nn.Module:
    norm = StuckInTraining if hp.fault == "batchnorm-train" else nn.BatchNorm1d
    dropout = AlwaysDropout if hp.fault == "dropout-eval" else nn.Dropout
    layers = [nn.Linear(64, hp.hidden), *([norm(hp.hidden)] if hp.batchnorm or hp.fault == "batchnorm-train" else []),
              nn.GELU(), dropout(hp.dropout), nn.Linear(hp.hidden, 10)]
    net = nn.Sequential(*layers)
    if hp.fault == "frozen-in-optimizer":
        net[0].requires_grad_(False)
    return net


def optimizer(model: nn.Module, hp: Hparams, total_steps: int):
    """AdamW over every parameter, as a recipe written without freezing in mind would."""
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    return opt, warmup_cosine(opt, total_steps, hp.warmup)
