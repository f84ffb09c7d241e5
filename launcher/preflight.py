"""The pre-flight checks: the practitioners' checklist before the first step, run for the user on rank zero, on
the recipe's own model before any engine wraps or shards it.

A few training batches go through the recipe's step in training mode, watched: the first layer with
parameters shows the inputs as the model receives them, and the torch loss functions the step calls show
what the loss is (cross-entropy over C classes expects ln C at the start, binary cross-entropy the entropy of
the label prior; other losses no value, and the line says so). Then the labels, inputs shared between
splits, and the parameters. One report line per check; a check that does not apply says why; none can crash
a run. The thresholds are wide on purpose, so that a healthy recipe raises no warning.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, is_dataclass
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import data, neardup, steps
from .bars import progress
from .errors import RecipeError
from .modules import buffers_kept
from .optim import default_optimizer
from .text import count, first_line

SAMPLE_BATCHES = 4
LABEL_SAMPLE = 2_000  # samples read for the class balance when the dataset holds no label tensor
HASH_LIMIT = 200_000  # rows of a tensor data set hashed per split; more are sampled
SAMPLE_HASH_LIMIT = 20_000  # samples of any other dataset (each one read through __getitem__), or of a stream
NEAR_SHARE = 0.01  # near-duplicates of an earlier split's inputs in this share of a split earn a warning
NEAR_EXAMPLES = 20  # (index, index) pairs of each pair of splits kept in the record
IMBALANCE = 3.0  # largest over smallest class count that earns a warning
LOSS_RATIO = (0.7, 1.4)  # initial loss / expected outside this range earns a warning
EVAL_SAMPLES = 64  # of the sample batch, evaluated three times by the eval-mode check
EVAL_TOLERANCE = 1e-3  # of an output's largest value: what two evaluations of the same sample may differ by
LABEL_KEYS = ("label", "labels", "target", "targets", "y")
CLASSIFICATION = ("cross_entropy", "nll_loss")
BINARY = ("binary_cross_entropy", "binary_cross_entropy_with_logits")
ELEMENTWISE = ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss")  # these broadcast mismatched shapes
LOSSES = {getattr(F, name): name for name in CLASSIFICATION + BINARY + ELEMENTWISE}


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)  # one per check
    warnings: list[str] = field(default_factory=list)  # what looks wrong, and what to do
    values: dict = field(default_factory=dict)  # the numbers, for metrics.jsonl and W&B


@dataclass
class Call:
    """A torch loss function the step called: its name, arguments by name, and result."""

    name: str
    args: dict
    value: torch.Tensor


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


def checked(report: Report, what: str, check: Callable[[], None]) -> None:
    """Run one check; one that cannot read this recipe's data or model says so and lets the run go on. A
    recipe that breaks the contract (RecipeError) still stops it."""
    try:
        check()
    except RecipeError:
        raise
    except Exception as e:
        reason = first_line(e)
        report.lines.append(f"{what:<8} not checked ({type(e).__name__}: {reason})")


def shown(report: Report) -> list[str]:
    """The console's lines: one per check, and last the warnings (on lines of their own) or that there are none."""
    warnings = "\n".join(f"warning: {w}" for w in report.warnings) or "check  pre-flight: no warning"
    return [f"check  {line}" for line in report.lines] + [warnings]


def check_only(plan, recipe, hp) -> int:
    """`launch RECIPE --check`: the pre-flight report in this process, nothing trained or written; exit 1 when
    something looks wrong."""
    parts = steps.build(recipe, hp, plan.seed, torch.device(plan.device), 0, plan.device_data)
    report = preflight(parts.module, parts.train, parts.evals, parts.step, parts.augment, plan.micro_batch, plan.seed,
                       parts.evaluate)
    # the schedule's length does not matter to what the optimizer holds
    optimizer, _ = getattr(recipe, "optimizer", default_optimizer)(parts.module, hp, plan.max_steps or 100)
    checked(report, "optimizer", lambda: optimizer_holds_frozen(parts.module, optimizer, report))
    print("\n".join(shown(report)), flush=True)
    return 1 if report.warnings else 0


# ---------------------------------------------------------------- the forwards: inputs and the loss


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


# ---------------------------------------------------------------- evaluation mode


@contextmanager
def module_outputs(module: nn.Module, into: dict):
    """Fills `into` with each module's first tensor output of a forward (and whether the module was in training
    mode), in the order the modules finish."""
    def hook(name):
        def record(mod, args, out):
            if isinstance(out, torch.Tensor) and name not in into:
                into[name] = (mod, mod.training, out.detach().float())
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in module.named_modules()]
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
    for name, (mod, stuck, out) in whole.items():
        where = f"{name or 'the model'} ({type(mod).__name__}{', still in training mode' * stuck})"
        if name in again and differs(out, again[name][2]):
            return eval_warning(report, where, "the same batch evaluated twice gives other outputs",
                                "the metrics change from one evaluation to the next", "dropout or another random "
                                "layer left on")
        alone = part[name][2] if name in part else None  # a per-sample output: n rows inside, n // 2 alone
        if alone is not None and out.shape[1:] == alone.shape[1:] and (len(out), len(alone)) == (n, n // 2) \
                and differs(out[: n // 2], alone):
            return eval_warning(report, where, f"a sample's output depends on the other samples of its batch "
                                f"({n // 2} samples alone and inside {n})", "the metrics change with the batch size "
                                "and order", "batch norm normalising by the batch's statistics instead of its "
                                "running ones")
    report.lines.append(f"eval     outputs in eval mode depend on each sample alone ({n // 2} samples alone, inside "
                        f"{n}, and {n} twice)")


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


# ---------------------------------------------------------------- labels, splits, parameters


def label_of(batch):
    """The labels in a batch: a pair's second element, or a field named label, labels, target(s) or y."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping):
        return next((batch[k] for k in LABEL_KEYS if k in batch), None)
    if is_dataclass(batch):
        return next((getattr(batch, k) for k in LABEL_KEYS if hasattr(batch, k)), None)
    return None


def labels_of(train, seed: int) -> tuple[torch.Tensor | None, str]:
    """(the training labels, where they came from): a label tensor the dataset holds, else a sample."""
    ds = getattr(train, "ds", None)
    if data.indexable(ds):
        found = ds.tensors[1] if isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) >= 2 \
            else label_of(ds.tensors)
        if found is not None:
            return found, ""
    if getattr(ds, "targets", None) is not None:
        return torch.as_tensor(ds.targets), ""
    batch = train.sample(1, LABEL_SAMPLE, seed)[0]
    found = label_of(batch)
    n = data.size(batch)
    where = f" (the stream's first {n:,})" if train.size is None else f" ({n:,} sampled)" if n < train.size else ""
    return (found if isinstance(found, torch.Tensor) else None), where


def labels(train, calls: list[list[Call]], seed: int, report: Report) -> None:
    y, where = labels_of(train, seed)
    if y is None:
        report.lines.append("labels   none found (a sample's second element, or a field named label, labels, target, "
                            "targets or y): not checked")
        return
    y = y.detach().cpu()
    weighted = any(c.args.get("weight") is not None or c.args.get("pos_weight") is not None
                   for made in calls for c in made)
    if y.is_floating_point():
        if not ((y == 0) | (y == 1)).all():
            report.lines.append(f"labels   real-valued targets {tuple(y.shape[1:])}: no classes to balance")
            return
        positives = y.reshape(len(y), -1).sum(0)
        low = int(torch.minimum(positives, len(y) - positives).min())  # the rarer side of the most uneven label
        classes, high = 2, len(y) - low
        kind = "binary labels" if len(positives) == 1 else f"{len(positives)} binary labels (the most uneven)"
    elif y.ndim == 1:
        counts = torch.bincount(y[y >= 0].long())
        counts = counts[counts > 0]
        classes, low, high = len(counts), int(counts.min()), int(counts.max())
        kind = f"{classes} classes"
    else:
        report.lines.append(f"labels   a label per position {tuple(y.shape[1:])}: class balance not checked")
        return
    ratio = high / low if low else math.inf
    report.values["labels"] = {"classes": classes, "min_count": low, "max_count": high, "imbalance": ratio}
    what = f"{kind}, {low:,} … {high:,} training samples each (imbalance {ratio:.1f}:1){where}"
    report.lines.append(f"labels   {what}{'; the loss weights them' if weighted else ''}")
    if ratio >= IMBALANCE and not weighted:
        report.warnings.append(
            f"the classes are imbalanced ({what}): the model can score well by favouring the large classes; weight "
            "the loss (nn.CrossEntropyLoss(weight=launcher.class_weights(labels))), use a focal loss "
            "(launcher.FocalLoss), or a weighted sampler, and watch per-class metrics")


def inputs_of(sample):
    """What a sample's input is, for telling samples apart: a pair's first element, else the whole sample."""
    return sample[0] if isinstance(sample, (tuple, list)) and len(sample) >= 2 else sample


def digest(tree) -> bytes:
    """A sample's content as 16 bytes: its tensors' and arrays' bytes, and every other leaf's repr."""
    h = hashlib.blake2b(digest_size=16)
    for leaf in data.walk(tree):
        if isinstance(leaf, torch.Tensor):
            leaf = leaf.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(leaf.tobytes() if isinstance(leaf, np.ndarray) else repr(leaf).encode())
    return h.digest()


def fingerprints(loader, seed: int, name: str) -> tuple[set[bytes], str, torch.Tensor | None, torch.Tensor]:
    """(hashes of the split's inputs, how many were hashed, the inputs as one tensor where they stack (for the
    near-duplicate search), their indices in the split), reading a sample of a split too big to read whole."""
    ds = loader.ds
    if loader.size is None:  # a stream: its first samples
        inputs = [inputs_of(sample) for sample in islice(ds, SAMPLE_HASH_LIMIT)]
        return ({digest(x) for x in inputs}, f"the stream's first {len(inputs):,}", stacked(inputs),
                torch.arange(len(inputs)))
    n = loader.size
    limit = HASH_LIMIT if data.indexable(ds) else SAMPLE_HASH_LIMIT
    index = torch.arange(n) if n <= limit else torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]
    shown = f"{n:,}" if n <= limit else f"{limit:,} of {n:,} sampled"
    what = f"pre-flight: hashing {name}"
    if data.indexable(ds):
        columns = data.tensors(ds)
        labelled = isinstance(ds, torch.utils.data.TensorDataset) and len(columns) >= 2
        picked = [t if n <= limit else t[index.to(t.device)] for t in (columns[:1] if labelled else columns)]
        rows = [t.detach().cpu().contiguous().reshape(len(index), -1).view(torch.uint8).numpy() for t in picked]
        hashes = {hashlib.blake2b(b"".join(r[i].tobytes() for r in rows), digest_size=16).digest()
                  for i in progress(range(len(index)), what, unit="sample")}
        return hashes, shown, picked[0] if labelled else None, index
    inputs = [inputs_of(ds[i]) for i in progress(index.tolist(), what, unit="sample")]
    return {digest(x) for x in inputs}, shown, stacked(inputs), index


def stacked(inputs: list) -> torch.Tensor | None:
    """The samples' inputs as one tensor, where they are tensors of one shape."""
    if inputs and all(isinstance(x, torch.Tensor) and x.shape == inputs[0].shape for x in inputs):
        return torch.stack(inputs)
    return None


def leakage(splits: dict, seed: int, report: Report) -> None:
    hashed = {name: fingerprints(loader, seed, name) for name, loader in splits.items()}
    if len(hashed) < 2:
        report.lines.append("splits   only a training split: nothing to compare")
        return
    shared = {}
    names = list(hashed)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared[f"{a}/{b}"] = len(hashed[a][0] & hashed[b][0])
    report.values["shared_samples"] = shared
    sizes = " / ".join(f"{name} {n}" for name, (_, n, _, _) in hashed.items())
    if not any(shared.values()):
        report.lines.append(f"splits   no input shared between {', '.join(names)} ({sizes} hashed)")
    else:
        at_least = "at least " if "sampled" in sizes or "stream" in sizes else ""
        what = ", ".join(f"{at_least}{n:,} shared by {pair.replace('/', ' and ')}" for pair, n in shared.items() if n)
        report.lines.append(f"splits   {what} ({sizes} hashed)")
        report.warnings.append(
            f"the same inputs appear in more than one split ({what}): the evaluation scores memorised samples, and "
            "every metric on those splits overstates the model; remove them from the evaluation splits in data()")
    checked(report, "near", lambda: near_duplicates({k: (rows, index) for k, (_, _, rows, index) in hashed.items()},
                                                    seed, report))


def near_duplicates(inputs: dict, seed: int, report: Report) -> None:
    """Each later split's inputs that nearly copy an earlier split's (neardup.py): counted, a few shown, a warning
    where they are NEAR_SHARE of a split or more."""
    rows = {name: r for name, (r, _) in inputs.items() if r is not None}
    if len(rows) < len(inputs):
        report.lines.append("near     not searched: the inputs are not tensors of one shape")
        return
    why = next(filter(None, map(neardup.eligible, rows.values())), None) or (
        None if len({r.shape[1:] for r in rows.values()}) == 1 else "the splits' inputs differ in shape")
    if why:
        report.lines.append(f"near     not searched: {why}")
        return
    names, found = list(rows), {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            hits = neardup.search(rows[a], rows[b], seed)
            found[(a, b)] = [(int(inputs[b][1][x]), int(inputs[a][1][y])) for x, y in hits.tolist()]
    report.values["near_duplicates"] = {f"{a}/{b}": {"count": len(p), "examples": p[:NEAR_EXAMPLES]}
                                        for (a, b), p in found.items()}
    rule = f"cosine ≥ {neardup.NEAR} after centring"
    if not any(found.values()):
        report.lines.append(f"near     no near-duplicates between {', '.join(names)} ({rule})")
        return
    parts = []
    for (a, b), pairs in found.items():
        if pairs:
            shown = ", ".join(f"{b} {x} ≈ {a} {y}" for x, y in pairs[:3]) + (", …" if len(pairs) > 3 else "")
            copy = "nearly copies a" if len(pairs) == 1 else "nearly copy"
            parts.append(f"{len(pairs):,} of the {len(rows[b]):,} {b} inputs {copy} {a} input{'s' * (len(pairs) > 1)}"
                         f" ({shown})")
            if len(pairs) >= NEAR_SHARE * len(rows[b]):
                report.warnings.append(
                    f"{parts[-1]} ({rule}): the same pictures with a little noise or another encoding, and the "
                    f"{b} metrics overstate the model on them; remove them from {b} in data() (metrics.jsonl's "
                    "preflight record lists them)")
    report.lines.append(f"near     {'; '.join(parts)} ({rule})")


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
