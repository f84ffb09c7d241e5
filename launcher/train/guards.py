"""What the loop checks as it goes, and the recipe-facing words when a check fails: each names the mistake and
its remedy in one line."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import RecipeError, TrainingError
from ..plan import Plan
from ..recipe.steps import Output

METRICS_NEED = ("metrics(hp) needs the step's predictions: return {'loss': ..., 'preds': ..., 'target': ...} from the "
                "step (metric.update(preds, target) receives them)")


def first_output(out: Output, counted: bool | None, unit: str | None, needs_preds: bool) -> None:
    """The first output of the step decides whether it gives counts (`counted`, None until then); every later
    one must agree."""
    if counted is not None:
        raise RecipeError("the step returned a count in some steps and not in others: return one always (the "
                          "batch's sample count where nothing else applies)")
    if unit and not out.counted:
        raise RecipeError(f"the recipe says its counts are {unit} (counts = {unit!r}), but step() returns no count: "
                          "return (loss, count) or {'loss': ..., 'count': ...}")
    if needs_preds and out.preds is None:
        raise RecipeError(METRICS_NEED)
    if not out.loss.requires_grad:
        raise RecipeError("the step's loss does not depend on any trainable parameter (computed under "
                          "torch.no_grad(), detached, or every parameter frozen?)")


def unused_parameters(module: torch.nn.Module) -> None:
    """DDP all-reduces in buckets that a parameter without a gradient never fills: name such parameters after
    the first backward, before the first update, instead of torch's error in the second step."""
    unused = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    if unused:
        raise RecipeError(f"{', '.join(unused[:5])}{' …' if len(unused) > 5 else ''} got no gradient in the first "
                          "step: under DDP every trainable parameter must take part in every step. Set "
                          "find_unused_parameters = True in the recipe (or pass --find-unused-parameters) if they "
                          "are used only in some steps; else remove them or freeze them (launcher.freeze)")


def stream_ended(step: int, total: int, batch_size: int) -> TrainingError:
    return TrainingError(f"the training stream ran out at step {step} of {total} ({step * batch_size:,} samples): "
                         "lower --max-steps, or make its length (__len__) the number of samples it yields in one "
                         "epoch")


def nonfinite(step: int, name: str | None, loss: float) -> TrainingError:
    return TrainingError(f"non-finite gradient at step {step}{f', first in {name}' if name else ''} (loss "
                         f"{loss:.4g}); lower the learning rate, clip gradients (--clip-grad), check the inputs, or "
                         "pass --skip-nonfinite to skip such steps")


def shared_run_dir(plan: Plan, main: bool) -> None:
    """Checkpoints are written by every rank into one directory: every node must see the same one."""
    probe = Path(plan.run_dir) / f".shared-{plan.name}"
    if main:
        probe.write_text("")
    torch.distributed.barrier()
    seen = probe.exists()
    torch.distributed.barrier()
    if main:
        probe.unlink()
    if not seen:
        raise TrainingError(f"{plan.run_dir} on node {plan.node_rank} is not the directory node 0 writes to: with "
                            "--nodes, the run directory must be on a filesystem every node shares")
