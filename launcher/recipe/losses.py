"""Losses for imbalanced classes, each usable in a recipe's loss(hp) in one line.

    return nn.CrossEntropyLoss(weight=class_weights(train_labels), label_smoothing=0.1)
    return FocalLoss(gamma=2.0, weight=class_weights(train_labels))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def class_weights(labels: torch.Tensor, classes: int | None = None) -> torch.Tensor:
    """Inverse-frequency weights n / (C · count_c) from the training labels: every class then weighs as
    much in the loss as a balanced data set would make it, and the weights average 1 over the samples."""
    counts = torch.bincount(labels.flatten().long().cpu(), minlength=classes or 0).float()
    return len(labels) / (len(counts) * counts.clamp(min=1))


class FocalLoss(nn.Module):
    """Cross-entropy scaled by (1 − p)^gamma, p the predicted probability of the true class (Lin et al., 2017):
    samples the model already gets right weigh little, so the rare and the hard ones lead. gamma = 0 is
    nn.CrossEntropyLoss; `weight` and `label_smoothing` mean what they mean there."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        ce = F.cross_entropy(logits, target, weight=self.weight, reduction="none",
                             label_smoothing=self.label_smoothing)
        p = torch.exp(-F.cross_entropy(logits, target, reduction="none"))
        loss = (1 - p) ** self.gamma * ce
        return loss.sum() / self.weight[target].sum() if self.weight is not None else loss.mean()
