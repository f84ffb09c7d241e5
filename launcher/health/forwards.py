"""The pre-flight's forwards: the recipe's step on a few training batches in training mode, watched. The first layer
with parameters shows the inputs as the model receives them, and the torch loss functions the step calls show
what the loss is and what it should be at the start."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..engines.modules import buffers_kept
from ..errors import RecipeError
from ..recipe import steps
from ..text import count
from .report import Call, Report, checked

LOSS_RATIO = (0.7, 1.4)  # initial loss / expected outside this range earns a warning
CLASSIFICATION = ("cross_entropy", "nll_loss")
BINARY = ("binary_cross_entropy", "binary_cross_entropy_with_logits")
ELEMENTWISE = ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss")  # these broadcast mismatched shapes
LOSSES = {getattr(F, name): name for name in CLASSIFICATION + BINARY + ELEMENTWISE}


class LossCalls(TorchFunctionMode):
    """Records every call of a torch loss function (nn.CrossEntropyLoss and the like call them too), and
    refuses labels that the model's class count cannot score before torch fails on them."""

    def __init__(self):
        super().__init__()
        self.calls: list[Call] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = LOSSES.get(func)
        if name is None:
            return func(*args, **kwargs)
        bound = inspect.signature(func).bind(*args, **kwargs)
        bound.apply_defaults()
        if name in CLASSIFICATION:
            classes_fit(name, bound.arguments)
        value = func(*args, **kwargs)
        self.calls.append(Call(name, dict(bound.arguments), value))
        return value


def classes_fit(name: str, args: dict) -> None:
    scores, target = args["input"], args["target"]
    if not isinstance(target, torch.Tensor) or target.is_floating_point():
        return  # class probabilities
    if scores.ndim >= 3 and target.shape == scores.shape[:-1] and target.shape != scores.shape[:1] + scores.shape[2:]:
        raise RecipeError(f"{name} takes the classes in dimension 1, but the model's scores are "
                          f"{tuple(scores.shape)} and the targets {tuple(target.shape)}, classes last as a sequence "
                          "model gives them: pass scores.flatten(0, -2) and targets.flatten() (or "
                          "scores.transpose(1, -1))")
    classes = scores.shape[1] if scores.ndim >= 2 else scores.shape[0]
    valid = target[target != args["ignore_index"]]
    if valid.numel() and (int(valid.max()) >= classes or int(valid.min()) < 0):
        bad = int(valid.max()) if int(valid.max()) >= classes else int(valid.min())
        raise RecipeError(f"the model scores {count(classes, 'class')} (its output is {tuple(scores.shape)}), but a "
                          f"training label is {bad}: labels are class indices 0 … {classes - 1}; make the model's last "
                          "layer output one score per class, or check the labels that data() gives")


@contextmanager
def first_inputs(module: nn.Module, seen: list):
    """Appends (name, module, input) of the first module with parameters of its own that a forward calls."""
    def hook(name):
        def record(mod, args):
            if not seen and args and isinstance(args[0], torch.Tensor):
                seen.append((name, mod, args[0].detach()))
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in module.named_modules()
               if any(True for _ in m.parameters(recurse=False))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def forwards(module: nn.Module, step: Callable, batches: list, report: Report) -> list[list[Call]]:
    """The step on the sample batches in training mode (batch norm normalises by the batch, as in the first
    step): the input and loss checks; the loss calls of each batch."""
    training = module.training
    module.train()
    firsts, outputs, calls = [], [], []
    try:
        with buffers_kept(module):
            for b in batches:
                seen, recorder = [], LossCalls()
                with first_inputs(module, seen), recorder:
                    outputs.append(step(module, b))
                firsts += seen
                calls.append(recorder.calls)
    finally:
        module.train(training)
    checked(report, "inputs", lambda: input_stats(firsts, report))
    checked(report, "loss", lambda: initial_loss(outputs, calls, report))
    checked(report, "batch", lambda: per_process_batch(calls, report))
    return calls


def input_stats(firsts: list, report: Report) -> None:
    if not firsts:
        report.lines.append("inputs   not checked: no layer with parameters received a tensor as its first argument")
        return
    name, layer, x = firsts[0]
    if not x.is_floating_point():
        report.lines.append(f"inputs   {tuple(x.shape[1:])} integer ({name} takes indices): not checked")
        return
    dim = 1 if isinstance(layer, nn.modules.conv._ConvNd) else x.ndim - 1  # convolutions: channels first
    # per channel, over every batch (of whatever length)
    flat = torch.cat([t.float().movedim(dim, 0).reshape(t.shape[dim], -1) for _, _, t in firsts], 1)
    mean, std = flat.mean(1), flat.std(1)
    low, high = flat.min().item(), flat.max().item()
    report.values["inputs"] = {"channels": len(mean), "mean_min": mean.min().item(), "mean_max": mean.max().item(),
                               "std_min": std.min().item(), "std_max": std.max().item(), "min": low, "max": high}
    what = (f"{count(len(mean), 'channel')} into {name or 'the model'} "
            f"({type(layer).__name__}): mean {mean.min():.3g} … {mean.max():.3g}"
            f"  std {std.min():.3g} … {std.max():.3g}  min {low:.3g}  max {high:.3g}")
    report.lines.append(f"inputs   {what}")
    if mean.abs().max() > 2 or std.max() > 4:
        report.warnings.append(
            f"inputs are far from zero mean and unit scale ({what}): normalise them per channel (subtract the "
            "mean, divide by the standard deviation of the training set) in data() or at the start of the model")


def initial_loss(outputs: list[steps.Output], calls: list[list[Call]], report: Report) -> None:
    total = sum(float(o.count) for o in outputs)
    loss = sum(float(o.loss) * float(o.count) for o in outputs) / total if total else math.nan
    report.values["initial_loss"] = loss
    broadcast(outputs[0], calls[0], report)
    expected, what, remedy = expectation(outputs, calls)
    if expected is None:
        report.lines.append(f"loss     initial {loss:.4g} (no expected value: {what})")
        return
    report.values["expected_initial_loss"] = expected
    report.lines.append(f"loss     initial {loss:.4g}, expected {what}")
    if not math.isfinite(loss) or not LOSS_RATIO[0] <= loss / expected <= LOSS_RATIO[1]:
        report.warnings.append(f"the initial loss {loss:.4g} is far from {what.split(' for ')[0]}, the loss of a "
                               f"model that has not learned anything yet: {remedy}")


def expectation(outputs: list[steps.Output], calls: list[list[Call]]) -> tuple[float | None, str, str]:
    """(expected initial loss, how it was found, what to check when the loss is far from it), or (None, why
    there is none, "")."""
    first = calls[0]
    if not first:
        return None, "no torch loss function computed it", ""
    if len(first) > 1:
        return None, f"the loss combines {len(first)} loss functions ({', '.join(c.name for c in first)})", ""
    call = first[0]
    for out, made in zip(outputs, calls, strict=True):
        value = mean_of(made[0])
        if not math.isclose(float(out.loss), value, rel_tol=0.01, abs_tol=1e-6):
            return None, f"the step's loss {float(out.loss):.4g} is not the {call.name} it computed ({value:.4g})", ""
    scores = call.args["input"]
    if call.name in CLASSIFICATION and all(in_batch(made[0]) for made in calls):
        n = len(call.args["target"])
        return None, (f"{call.name} over the samples of each batch (labels 0 … {n - 1}, each once: in-batch "
                      "negatives, a contrastive loss), whose start depends on the embeddings' spread and the "
                      "temperature"), ""
    if call.name in CLASSIFICATION:
        classes = scores.shape[1] if scores.ndim >= 2 else scores.shape[0]
        if classes < 2:
            return None, f"{call.name} over {classes} class", ""
        return math.log(classes), f"ln {classes} = {math.log(classes):.4g} for {classes} classes", (
            "check that the model ends in raw logits (no softmax before a cross-entropy), that the labels are class "
            "indices, and the inputs' scale; a too confident initialisation (large final-layer weights) does this "
            "too")
    if call.name in BINARY:
        if call.args.get("pos_weight") is not None or call.args.get("weight") is not None:
            return None, f"{call.name} with weights", ""
        target = torch.cat([c[0].args["target"].detach().float().reshape(len(c[0].args["target"]), -1)
                            for c in calls])
        prior = target.mean(0).clamp(1e-6, 1 - 1e-6)
        entropy = float((-(prior * prior.log() + (1 - prior) * (1 - prior).log())).mean())
        share = float(target.mean())
        bias = math.log(share / (1 - share)) if 0 < share < 1 else 0.0
        return entropy, f"{entropy:.4g} for binary labels, {share:.3g} of them positive (their entropy)", (
            "a model that has learned nothing predicts the share of positives everywhere; set its last layer's bias "
            f"to log(p / (1 - p)) = {bias:.3g} for that start, and check that a sigmoid is not applied before "
            "binary_cross_entropy_with_logits")
    return None, f"{call.name} is a regression loss", ""


def in_batch(call: Call) -> bool:
    """A cross-entropy whose classes are the batch's own samples: a square score matrix and every row's label a
    different one (InfoNCE, CLIP, SimCLR)."""
    scores, target = call.args["input"], call.args["target"]
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.ndim != 1 or scores.ndim != 2:
        return False
    n = len(target)
    return n >= 4 and scores.shape == (n, n) and bool((target.sort().values == torch.arange(n, device=target.device))
                                                      .all())


def per_process_batch(calls: list[list[Call]], report: Report) -> None:
    """A loss over in-batch negatives depends on how many samples each process's micro-batch holds."""
    first = calls[0]
    if len(first) == 1 and first[0].name in CLASSIFICATION and all(made and in_batch(made[0]) for made in calls):
        n = len(first[0].args["target"])
        report.lines.append(
            f"batch    {first[0].name} scores each sample against the {n} of its micro-batch: the loss, and what the "
            f"model learns, change with the batch each process holds ({n} here: --batch-size / (processes × "
            "--grad-accum)), not only with --batch-size; to compare across process counts, gather the embeddings "
            "from every process before the loss (torch.distributed.nn.functional.all_gather)")


def mean_of(call: Call) -> float:
    """What a loss function's result is per counted element, whatever its reduction."""
    value, reduction = call.value.detach().float(), call.args.get("reduction", "mean")
    if reduction == "mean":
        return float(value)
    target = call.args["target"]
    if call.name in CLASSIFICATION and not target.is_floating_point():
        counted = int((target != call.args["ignore_index"]).sum())
    else:
        counted = value.numel() if reduction == "none" else target.numel()
    return float(value.sum()) / max(counted, 1)


def broadcast(out: steps.Output, made: list[Call], report: Report) -> None:
    """A model output (N, 1) against targets (N,) broadcasts to (N, N) in an element-wise loss: every output
    is compared with every target, and nothing fails."""
    pairs = [(c.name, c.args["input"], c.args["target"]) for c in made if c.name in ELEMENTWISE]
    if not made:
        pairs = [("the loss", out.preds, out.target)]
    for name, a, b in pairs:
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape == b.shape:
            continue
        try:
            both = torch.broadcast_shapes(a.shape, b.shape)
        except RuntimeError:
            continue
        if math.prod(both) > max(a.numel(), b.numel()):
            report.warnings.append(
                f"{name} compares the model's output {tuple(a.shape)} with targets {tuple(b.shape)}: they broadcast "
                f"to {tuple(both)}, so every output is compared with every target and the model can only learn "
                f"their mean; give both the same shape (the output's .squeeze(-1), say)")
