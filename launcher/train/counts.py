"""A step that gives counts (tokens, say) is weighted by them: micro-step k backpropagates its mean loss ×
count_k / c, and the gradients are then scaled by c·K·P / N, N the count of the whole global batch (one
all-reduce), so that the update follows the sum of per-item losses over the global batch divided by N however
it was split. c, the same on every rank, is the previous step's mean count per micro-batch (at first, the first
micro-batches'): the backward's scale stays that of a mean loss, which fp16's loss scaler needs."""

from __future__ import annotations

import torch

from ..recipe.steps import Output


class Counts:
    def __init__(self, micro_batches: int, world: int, device: torch.device):
        self.micro_batches, self.world, self.device = micro_batches, world, device  # K·P, P
        self.counted: bool | None = None  # whether the step gives counts: its first output tells
        self.scale: torch.Tensor | None = None  # c, on the device

    def weighted(self, out: Output) -> torch.Tensor:
        """The micro-step's loss to backpropagate: with counts, weighted by its count over c."""
        if not out.counted:
            return out.loss
        if self.scale is None:  # the first micro-step's count, averaged over the ranks
            self.scale = self.reduced(out.count) / self.world
        return out.loss * (out.count / self.scale).to(out.loss.dtype)

    def global_count(self, step_count) -> tuple[torch.Tensor | None, object]:
        """With counts: (the gradients' rescale c·K·P / N, N the count of the whole global batch), and c for the
        next step; without: (None, this rank's count)."""
        if not self.counted:
            return None, step_count
        total = self.reduced(step_count)
        rescale = (self.scale * self.micro_batches / total).float()
        self.scale = torch.where(total > 0, total / self.micro_batches, self.scale)
        return rescale, total

    def reduced(self, count) -> torch.Tensor:
        total = torch.as_tensor(count, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(total)
        return total

    def state_dict(self) -> float | None:
        return None if self.scale is None else self.scale.item()

    def load_state_dict(self, scale: float | None) -> None:
        if scale is not None:
            self.scale = torch.tensor(scale, dtype=torch.float64, device=self.device)


def grad_scale(scaler, rescale: torch.Tensor | None) -> float:
    """What the gradients carry beyond what the update sees: the fp16 loss scale, over the counts' rescale."""
    return (scaler.get_scale() if scaler else 1.0) / (1.0 if rescale is None else float(rescale))
