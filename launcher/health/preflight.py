"""The pre-flight checks: the practitioners' checklist before the first step, run for the user on rank zero, on
the recipe's own model before any engine wraps or shards it.

A few training batches go through the recipe's step in training mode, watched: the first layer with
parameters shows the inputs as the model receives them, and the torch loss functions the step calls show
what the loss is (cross-entropy over C classes expects ln C at the start, binary cross-entropy the entropy of
the label prior; other losses no value, and the line says so): forwards.py. Then evaluation mode and the
parameters (here), the labels and inputs shared between splits (splits.py). One report line per check
(report.py); a check that does not apply says why; none can crash a run. The thresholds are wide on purpose,
so that a healthy recipe raises no warning.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from ..engines.modules import buffers_kept
from ..recipe import data, steps
from ..recipe.optim import default_optimizer
from ..text import count
from .forwards import forwards
from .report import Report, checked, console_lines
from .splits import labels, leakage

SAMPLE_BATCHES = 4
EVAL_SAMPLES = 64  # of the sample batch, evaluated three times by the eval-mode check
CALLS = 4  # the calls of one module the evaluation-mode check compares
EVAL_TOLERANCE = 1e-3  # of an output's largest value: what two evaluations of the same sample may differ by


def preflight(module: nn.Module, train, evals: dict, step: Callable, augment, batch: int, seed: int,
              evaluate: Callable) -> Report:
    """Every pre-flight check. Leaves the model as it found it (buffers such as batch-norm statistics are put
    back) and draws its sample from a generator of its own."""
    report = Report()
    sampled = train.sample(SAMPLE_BATCHES, max(batch, 2), seed)
    calls = forwards(module, step, [augment(b, 0) for b in sampled] if augment else sampled, report)
    checked(report, "eval", lambda: eval_mode(module, evaluate, sampled[0], report))
    checked(report, "labels", lambda: labels(train, calls, seed, report))
    checked(report, "splits", lambda: leakage({"train": train, **evals}, seed, report))
    checked(report, "model", lambda: parameters(module, report))
    return report


def check_only(plan, recipe, hp) -> int:
    """`launch RECIPE --check`: the pre-flight report in this process, nothing trained or written; exit 1 when
    something looks wrong."""
    parts = steps.build(recipe, hp, plan.seed, torch.device(plan.device), 0, plan.device_data)
    report = preflight(parts.module, parts.train, parts.evals, parts.step, parts.augment, plan.micro_batch, plan.seed,
                       parts.evaluate)
    # the schedule's length does not matter to what the optimizer holds
    optimizer, _ = getattr(recipe, "optimizer", default_optimizer)(parts.module, hp, plan.max_steps or 100)
    checked(report, "optimizer", lambda: optimizer_holds_frozen(parts.module, optimizer, report))
    print("\n".join(console_lines(report)), flush=True)
    return 1 if report.warnings else 0


# ---------------------------------------------------------------- evaluation mode


@contextmanager
def module_outputs(module: nn.Module, into: dict):
    """Fills `into` with each module's tensor outputs, call by call (up to CALLS: a step may call the model on two
    views), whether the module was in training mode, and each call's first tensor input; in the order the modules
    first finish."""
    def hook(name):
        def record(mod, args, kwargs, out):
            if not isinstance(out, torch.Tensor):
                return
            _, _, outs, inputs = into.setdefault(name, (mod, mod.training, [], []))
            if len(outs) < CALLS:
                given = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
                outs.append(out.detach().float())
                inputs.append(None if given is None else given.detach().float())
        return record

    handles = [m.register_forward_hook(hook(name), with_kwargs=True) for name, m in module.named_modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Beyond the rounding of a matrix product that a batch of another size computes in another order."""
    return a.shape != b.shape or bool((a - b).abs().max() > EVAL_TOLERANCE * max(a.abs().max().item(), 1e-6))


@torch.no_grad()
def eval_mode(module: nn.Module, evaluate: Callable, batch, report: Report) -> None:
    """In eval mode a sample's output depends on that sample alone: the same batch twice gives the same outputs
    (no dropout left on), and its first half alone gives the same outputs as inside the whole (batch norm
    normalises by its running statistics, not the batch's). The first module whose output breaks either is
    named."""
    n = data.size(batch)
    if n < 2:
        report.lines.append("eval     not checked: a sample batch of one")
        return

    def first(k: int, tree):
        return data.tree_map(lambda t: t[:k] if isinstance(t, torch.Tensor) and t.ndim and len(t) == n else t, tree)

    batch, n = first(min(n, EVAL_SAMPLES), batch), min(n, EVAL_SAMPLES)
    half = first(n // 2, batch)
    runs = [{}, {}, {}]
    training = module.training
    module.eval()
    try:
        with buffers_kept(module):
            for into, b in zip(runs, (batch, batch, half), strict=True):
                with module_outputs(module, into):
                    evaluate(module, b)
    finally:
        module.train(training)
    whole, again, part = runs
    for name, (mod, stuck, outs, inputs) in whole.items():
        where = f"{name or 'the model'} ({type(mod).__name__}{', still in training mode' * stuck})"
        out = outs[0]
        for call, (first, given) in enumerate(zip(outs, inputs, strict=True)):
            if name not in again or call >= len(again[name][2]) or not differs(first, again[name][2][call]):
                continue
            other = again[name][3][call]
            if given is not None and other is not None and differs(given, other):  # not the layer: what it gets
                return input_warning(report, where)
            return eval_warning(report, where, "the same batch evaluated twice gives other outputs",
                                "the metrics change from one evaluation to the next", "dropout or another random "
                                "layer left on")
        alone = part[name][2][0] if name in part else None  # a per-sample output: n rows inside, n // 2 alone
        if alone is not None and out.shape[1:] == alone.shape[1:] and (len(out), len(alone)) == (n, n // 2) \
                and differs(out[: n // 2], alone):
            return eval_warning(report, where, f"a sample's output depends on the other samples of its batch "
                                f"({n // 2} samples alone and inside {n})", "the metrics change with the batch size "
                                "and order", "batch norm normalising by the batch's statistics instead of its "
                                "running ones")
    report.lines.append(f"eval     outputs in eval mode depend on each sample alone ({n // 2} samples alone, inside "
                        f"{n}, and {n} twice)")


def input_warning(report: Report, where: str) -> None:
    """The same batch evaluated twice reaches the model as other inputs: the step draws them."""
    report.lines.append(f"eval     the same batch evaluated twice reaches {where} as other inputs")
    report.warnings.append(
        f"the same batch evaluated twice reaches {where} as other inputs: the evaluation step draws something random "
        "before the model (augmentation inside step()?), so the metrics change from one evaluation to the next; "
        "augment in Splits(augment=...), which evaluation skips, or give evaluation an eval_step() without it")


def eval_warning(report: Report, where: str, what: str, consequence: str, cause: str) -> None:
    report.lines.append(f"eval     {what}, first at {where}")
    report.warnings.append(
        f"in eval mode, {what}, first at {where}: evaluation does not measure the model as trained, and "
        f"{consequence}; look for {cause} (an overridden train() or eval(), or training=True passed to a functional "
        "call), unless it is deliberate")


def optimizer_holds_frozen(module: nn.Module, optimizer: torch.optim.Optimizer, report: Report) -> None:
    """Parameters that require no gradient in the recipe's optimizer: a sign that the recipe does not do what
    it says (torch's optimizers skip them, but not every optimizer does, and weight decay of its own may not)."""
    names = {id(p): name for name, p in module.named_parameters()}
    frozen = [p for group in optimizer.param_groups for p in group["params"] if not p.requires_grad]
    if not frozen:
        return
    shown = ", ".join(names.get(id(p), "?") for p in frozen[:4]) + (", …" if len(frozen) > 4 else "")
    total = sum(p.numel() for p in frozen)
    report.warnings.append(
        f"the optimizer holds {count(len(frozen), 'frozen parameter tensor')} ({total:,} values: {shown}): frozen "
        "parameters get no gradient, so they do not train; if they should, unfreeze them; if not, hand the "
        "optimizer only the trainable ones ([p for p in model.parameters() if p.requires_grad], or "
        "launcher.param_groups)")


def parameters(module: nn.Module, report: Report) -> None:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    zeros = [name for name, p in module.named_parameters() if p.requires_grad and p.ndim >= 2 and not p.any()]
    report.values["parameters"] = {"trainable": trainable, "frozen": frozen, "all_zero": zeros}
    report.lines.append(f"model    {trainable:,} trainable parameters, {frozen:,} frozen"
                        f"{'; all-zero weights: ' + ', '.join(zeros) if zeros else ''}")
    if not trainable:
        report.warnings.append("the model has no trainable parameter: nothing will learn (everything frozen?)")
    if zeros:
        report.warnings.append(
            f"{', '.join(zeros)} {'is' if len(zeros) == 1 else 'are'} initialised to all zeros: every unit of such a "
            "layer computes the same thing and gets the same gradient, so they never tell apart; initialise "
            "randomly (nn.init.kaiming_normal_ or the layer's default) unless the zeros are deliberate")
