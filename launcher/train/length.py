"""How long a run is: its optimizer steps per epoch and in all, from the plan, the recipe's epochs and the size
of the training split (a pure function: no process group, no data read)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import RecipeError, TrainingError
from ..flags import OVERFIT_STEPS
from ..plan import Plan


@dataclass(frozen=True)
class Length:
    steps_per_epoch: int
    total: int


def run_length(plan: Plan, epochs: int, size: int | None) -> Length:
    """`size` samples in the training split, None for a stream without a length (one epoch, as long as the run).
    --overfit-batches repeats its few batches as an epoch; --find-lr sweeps 100 steps unless told otherwise."""
    if size is None:
        per_epoch = plan.max_steps or OVERFIT_STEPS * plan.overfit_batches or 100 * plan.find_lr
        if not per_epoch:
            raise RecipeError("the training split is a stream without a length: give --max-steps N, or define "
                              "__len__ on it (the samples of one epoch)")
    else:
        per_epoch = size // plan.batch_size
    if per_epoch == 0:
        raise TrainingError(f"batch_size {plan.batch_size} is larger than the training set ({size} samples)")
    total = plan.max_steps or epochs * per_epoch
    if plan.overfit_batches:  # the same few batches, as they are, over and over
        if plan.overfit_batches > per_epoch:
            raise TrainingError(f"--overfit-batches {plan.overfit_batches}: the training set holds only "
                                f"{per_epoch} batches of {plan.batch_size}")
        per_epoch, total = plan.overfit_batches, plan.max_steps or OVERFIT_STEPS * plan.overfit_batches
    if plan.find_lr:
        total = plan.max_steps or 100
    return Length(per_epoch, total)
