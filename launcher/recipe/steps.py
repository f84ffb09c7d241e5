"""The step: one batch in, its loss out, with what the loss averages over and what the metrics need; and the
recipe's parts built the one way --check and training both use (`build`).

A recipe may define `step(model, batch, hp)` (and `eval_step`, for evaluation only) returning

    loss                                      a scalar: the mean over the batch's samples
    loss, count                               the mean over `count` items: tokens that are not padding, say
    {"loss": loss, "count": count, "preds": logits, "target": labels}
                                              any of "count", "preds", "target" may be left out; metrics
                                              receive update(preds, target). A Hugging Face model's output
                                              (a dict with "loss") can be returned as it is. Any other
                                              number in it (a scalar tensor, an int or a float: "ce",
                                              "aux") is logged as train/NAME, averaged as the loss is, and
                                              as val/NAME, test/NAME at evaluation; other values (logits)
                                              are left alone.

Without one, the step is `loss(hp)(model(x), y)` over (x, y) batches, counting samples, and the metrics
receive (model(x), y). A loss summed over the items is expressed as (summed_loss / count, count).

Counts make the loss exact however the batch is split: the gradient of a step is that of the sum of the
per-item losses over the whole global batch divided by its total count, not the mean of the micro-batches'
means (see train/loop.py), and `val/loss` is the count-weighted mean over the whole split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..errors import RecipeError
from . import data
from .data import describe, size

RESERVED = ("loss", "count", "preds", "target")  # what a step's dict says; its other numbers are extras


@dataclass(slots=True)
class Output:
    loss: torch.Tensor  # a scalar: the mean over `count` items
    count: torch.Tensor | int | float
    counted: bool  # the step said what the loss averages over; else count is the batch's samples
    preds: Any = None  # what the metrics receive: update(preds, target)
    target: Any = None
    extras: dict | None = None  # the dict's other numbers, by name: each a mean over the same items as the loss

    def weighted_extras(self) -> dict:
        """Each extra as the loss is summed: × count where the step gives one."""
        return {k: (v.detach() if isinstance(v, torch.Tensor) else v) * (self.count if self.counted else 1)
                for k, v in self.extras.items()}


def steps(recipe: ModuleType, hp, device: torch.device) -> tuple[Callable, Callable, Any]:
    """(training step, evaluation step, the loss function of loss(hp) or None), each step a function
    (model, batch) -> Output. A loss that is a module (holding class weights, say) is moved to the device."""
    loss_fn = recipe.loss(hp) if hasattr(recipe, "loss") else None
    if hasattr(recipe, "loss") and not callable(loss_fn):
        raise RecipeError(f"loss(hp) returned {describe(loss_fn)}; it returns the loss function, e.g. "
                          "nn.CrossEntropyLoss()")
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(device)
    train = custom(recipe.step, hp, "step()") if hasattr(recipe, "step") else default(loss_fn)
    evaluate = custom(recipe.eval_step, hp, "eval_step()") if hasattr(recipe, "eval_step") else train
    return train, evaluate, loss_fn


def default(loss_fn) -> Callable:
    """The default step. Its first call checks the batch and the loss; the recipe's data and loss give the same
    kinds of each every step after it, which then go straight through."""
    checked = False

    def step(model: nn.Module, batch) -> Output:
        nonlocal checked
        if checked:
            x, y = batch
            out = model(x)
            return Output(loss_fn(out, y), y.shape[0], False, out, y)
        result = first(model, batch)
        checked = isinstance(result.target, torch.Tensor) and result.target.ndim > 0
        return result

    def first(model: nn.Module, batch) -> Output:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise RecipeError(f"the default step takes (input, target) batches and computes "
                              f"loss(hp)(model(input), target), but a batch is {describe(batch)}: define "
                              "step(model, batch, hp) in the recipe (docs/recipes.md: Writing a recipe)")
        x, y = batch
        out = model(x)
        try:
            loss = loss_fn(out, y)
        except (TypeError, AttributeError) as e:
            if isinstance(out, torch.Tensor):
                raise
            raise RecipeError(f"the model returns {describe(out)}, which the loss from loss(hp) cannot take "
                              f"({type(e).__name__}: {e}): define step(model, batch, hp) to compute the loss from it "
                              "(for a model that computes its own loss, return that)") from None
        return Output(scalar(loss, "the loss from loss(hp)"), len(y), False, out, y)
    return step


def custom(fn: Callable, hp, name: str) -> Callable:
    def step(model: nn.Module, batch) -> Output:
        return read(fn(model, batch, hp), batch, name)
    return step


def read(result, batch, name: str) -> Output:
    """A step's result as an Output, or the one line that says what a step returns."""
    if isinstance(result, torch.Tensor):
        return Output(scalar(result, f"{name}'s loss"), size(batch), False)
    if isinstance(result, tuple) and len(result) == 2 and not hasattr(result, "_fields"):
        return Output(scalar(result[0], f"{name}'s loss"), count(result[1], name), True)
    if isinstance(result, Mapping) and "loss" in result:
        given = result.get("count")
        extras = {k: v for k, v in result.items() if k not in RESERVED and number(v)}
        return Output(scalar(result["loss"], f"{name}'s loss"), size(batch) if given is None else count(given, name),
                      given is not None, result.get("preds"), result.get("target"), extras or None)
    raise RecipeError(f"{name} returned {describe(result)}; a step returns the loss, (loss, count), or a dict "
                      "with 'loss' and any of 'count', 'preds', 'target'")


def same_extras(before, now) -> None:
    """The numbers a step returns beside its loss, as the steps before it did: each is summed over steps and ranks."""
    if set(before) != set(now):
        raise RecipeError(f"the step returned {', '.join(sorted(now)) or 'no numbers'} beside its loss, and "
                          f"{', '.join(sorted(before)) or 'none'} before: every step returns the same ones")


def number(value) -> bool:
    """A number a step's dict may hold beside its loss, to be logged."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and value.dtype != torch.bool
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scalar(loss, who: str) -> torch.Tensor:
    if not (isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.is_floating_point()):
        raise RecipeError(f"{who} is {describe(loss)}{f' of {loss.dtype}' if isinstance(loss, torch.Tensor) else ''}, "
                          "not a floating-point scalar: reduce it to the mean over the batch (reduction='mean', "
                          "torch's default)")
    return loss


def count(value, name: str):
    if (isinstance(value, torch.Tensor) and value.ndim == 0) or (isinstance(value, (int, float))
                                                                 and not isinstance(value, bool)):
        return value
    raise RecipeError(f"{name} returned a count that is {describe(value)}: the count is a number, or a scalar "
                      "tensor (e.g. mask.sum()), of the items the loss averages over")


def model(recipe: ModuleType, hp, device: torch.device) -> nn.Module:
    """The recipe's model, checked and on the device. The launcher keeps fp32 weights and applies --precision
    itself: other weights are an error now, rather than a dtype clash in the first forward or an optimizer on
    half-precision weights."""
    module = recipe.model(hp)
    if not isinstance(module, nn.Module):
        raise RecipeError(f"model(hp) returned {describe(module)}; it returns a torch.nn.Module")
    for name, p in module.named_parameters():
        if p.is_floating_point() and p.dtype != torch.float32 and (p.requires_grad or p.dtype == torch.float64):
            raise RecipeError(f"model(hp) returns a model whose parameter {name} is {str(p.dtype)[6:]}: build it in "
                              "float32 (no .double() / .half() / dtype=...) and choose the precision with "
                              "--precision bf16|fp16")
    return module.to(device)


@dataclass
class Parts:
    """A recipe made real on a device, as --check and every training process build it."""

    train: data.Loader
    evals: dict  # split name → data.Loader
    augment: Callable | None  # (batch, epoch) -> batch: data.augmenter of the recipe's augment
    module: nn.Module
    step: Callable  # (model, batch) -> Output
    evaluate: Callable
    loss: Any  # loss(hp), or None


def build(recipe: ModuleType, hp, seed: int, device: torch.device, workers: int, device_data: bool) -> Parts:
    """The data, then the model from the same seed on every process whatever data() drew, then the steps."""
    torch.manual_seed(seed)
    splits = recipe.data(hp)
    train, evals = data.loaders(splits, device, workers, device_data)
    torch.manual_seed(seed)
    module = model(recipe, hp, device)
    return Parts(train, evals, data.augmenter(splits.augment), module, *steps(recipe, hp, device))
