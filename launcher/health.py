"""The practitioners' checklists, run for the user on rank zero; the thresholds are wide on purpose, so that
a healthy recipe raises no warning.

Pre-flight, on the recipe's own model before any engine wraps or shards it: inputs (as the first layer
sees them), labels, splits, the model's parameters, and the initial loss against its expected value; one
report line per check. During training (Monitor), on sampled steps: per-layer gradient norms,
update-to-weight ratios, dead ReLUs. At the end, a verdict from the loss curves. And the two debugging
modes' arithmetic: --overfit-batches' regularisation switch, --find-lr's sweep, stop and suggestion.
Every warning says in plain words what looks wrong, with the numbers and what to do.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from .data import is_tensor_data
from .engine import buffers_kept

SAMPLE_BATCHES = 4
HASH_LIMIT = 200_000  # samples per split hashed one by one when the split is not a tensor data set
IMBALANCE = 3.0  # largest over smallest class count that earns a warning
LOSS_RATIO = (0.7, 1.4)  # initial loss / ln C outside this range earns a warning


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)  # one per check
    warnings: list[str] = field(default_factory=list)  # what looks wrong, and what to do
    values: dict = field(default_factory=dict)  # the numbers, for metrics.jsonl and W&B


def preflight(module: nn.Module, splits, loss_fn, device: torch.device, batch: int, seed: int) -> Report:
    """Every pre-flight check. Leaves the model as it found it (buffers such as batch-norm statistics are put
    back) and draws its sample from a generator of its own."""
    report = Report()
    batches = sample(splits.train, splits.augment, device, batch, seed)
    inputs_and_initial_loss(module, loss_fn, batches, report)
    labels(splits.train, report)
    leakage({"train": splits.train, "val": splits.val, "test": splits.test}, report)
    parameters(module, report)
    return report


def shown(report: Report) -> list[str]:
    """The console's lines: one per check, and last the warnings (on lines of their own) or that there are none."""
    warnings = "\n".join(f"warning: {w}" for w in report.warnings) or "check  pre-flight: no warning"
    return [f"check  {line}" for line in report.lines] + [warnings]


def check_only(plan, recipe, hp) -> int:
    """`launch RECIPE --check`: the pre-flight report in this process, nothing trained or written; exit 1 when
    something looks wrong."""
    device = torch.device(plan.device)
    torch.manual_seed(plan.seed)
    splits = recipe.data(hp)
    torch.manual_seed(plan.seed)
    module = recipe.model(hp).to(device)
    report = preflight(module, splits, recipe.loss(hp), device, plan.micro_batch, plan.seed)
    print("\n".join(shown(report)), flush=True)
    return 1 if report.warnings else 0


def sample(ds: Dataset, augment, device: torch.device, batch: int, seed: int) -> list[tuple]:
    """A few training batches as training sees them: drawn at random, augmented, on the device."""
    batch = max(batch, 2)  # batch norm needs two samples
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:SAMPLE_BATCHES * batch]
    out = []
    for idx in order.split(batch):
        if is_tensor_data(ds):
            x, y = (t[idx.to(t.device)] for t in ds.tensors)
        else:
            x, y = default_collate([ds[i] for i in idx.tolist()])
        x, y = x.to(device), y.to(device)
        out.append(augment(x, y) if augment else (x, y))
    return out


def first_layer(module: nn.Module, x: torch.Tensor) -> tuple[tuple | None, torch.Tensor]:
    """The forward's output, and (name, module, input) of the first module with parameters of its own that it
    calls."""
    seen = []

    def hook(name):
        def record(mod, args):
            if not seen and args and isinstance(args[0], torch.Tensor):
                seen.append((name, mod, args[0].detach()))
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in module.named_modules()
               if any(True for _ in m.parameters(recurse=False))]
    try:
        out = module(x)
    finally:
        for h in handles:
            h.remove()
    return (seen[0] if seen else None), out


@torch.no_grad()
def inputs_and_initial_loss(module: nn.Module, loss_fn, batches: list[tuple], report: Report) -> None:
    training = module.training
    module.train()  # the first step's mode: batch norm normalises by the batch
    try:
        with buffers_kept(module):
            firsts, losses = [], []
            for x, y in batches:
                first, out = first_layer(module, x)
                if first:
                    firsts.append(first)
                losses.append(float(loss_fn(out, y)))
    finally:
        module.train(training)
    if firsts:
        input_stats(firsts[0][0], firsts[0][1], torch.cat([t for _, _, t in firsts]), report)
    initial_loss(sum(losses) / len(losses), out, batches[-1][1], report)


def input_stats(name: str, layer: nn.Module, x: torch.Tensor, report: Report) -> None:
    if not x.is_floating_point():
        report.lines.append(f"inputs   {tuple(x.shape[1:])} integer ({name} takes indices): not checked")
        return
    dim = 1 if isinstance(layer, nn.modules.conv._ConvNd) else x.ndim - 1  # convolutions: channels first
    flat = x.float().movedim(dim, 0).reshape(x.shape[dim], -1)
    mean, std = flat.mean(1), flat.std(1)
    low, high = flat.min().item(), flat.max().item()
    report.values["inputs"] = {"channels": len(mean), "mean_min": mean.min().item(), "mean_max": mean.max().item(),
                               "std_min": std.min().item(), "std_max": std.max().item(), "min": low, "max": high}
    what = (f"{len(mean)} channel{'s' if len(mean) > 1 else ''} into {name or 'the model'} "
            f"({type(layer).__name__}): mean {mean.min():.3g} … {mean.max():.3g}"
            f"  std {std.min():.3g} … {std.max():.3g}  min {low:.3g}  max {high:.3g}")
    report.lines.append(f"inputs   {what}")
    if mean.abs().max() > 2 or std.max() > 4:
        report.warnings.append(
            f"inputs are far from zero mean and unit scale ({what}): normalise them per channel (subtract the "
            "mean, divide by the standard deviation of the training set) in data() or at the start of the model")


def initial_loss(loss: float, out: torch.Tensor, y: torch.Tensor, report: Report) -> None:
    report.values["initial_loss"] = loss
    classes = out.shape[1] if out.ndim == 2 and y.ndim == 1 and not y.is_floating_point() else 0
    if classes < 2:
        report.lines.append(f"loss     initial {loss:.4g} (no expected value: not C-class cross-entropy)")
        return
    expected = math.log(classes)
    report.values["expected_initial_loss"] = expected
    report.lines.append(f"loss     initial {loss:.4g}, expected ln {classes} = {expected:.4g} for {classes} classes")
    if not math.isfinite(loss) or not LOSS_RATIO[0] <= loss / expected <= LOSS_RATIO[1]:
        report.warnings.append(
            f"the initial loss {loss:.4g} is far from ln {classes} = {expected:.4g}, the loss of a model that has not "
            "learned anything yet: check that the model ends in raw logits (no softmax before a cross-entropy), "
            "that the labels are class indices, and the inputs' scale; a too confident initialisation (large "
            "final-layer weights) does this too")


def labels_of(ds: Dataset) -> torch.Tensor | None:
    if is_tensor_data(ds):
        return ds.tensors[1]
    found = getattr(ds, "targets", None)
    return torch.as_tensor(found) if found is not None else None


def labels(ds: Dataset, report: Report) -> None:
    y = labels_of(ds)
    if y is None or y.ndim != 1 or y.is_floating_point():
        report.lines.append("labels   not class indices (or not reachable without reading every sample): not checked")
        return
    counts = torch.bincount(y.cpu().long())
    present = counts[counts > 0]
    ratio = (present.max() / present.min()).item()
    report.values["labels"] = {"classes": len(present), "min_count": present.min().item(),
                               "max_count": present.max().item(), "imbalance": ratio}
    what = (f"{len(present)} classes, {present.min().item():,} … {present.max().item():,} training samples each "
            f"(imbalance {ratio:.1f}:1)")
    report.lines.append(f"labels   {what}")
    if ratio >= IMBALANCE:
        report.warnings.append(
            f"the classes are imbalanced ({what}): the model can score well by favouring the large classes; weight "
            "the loss (nn.CrossEntropyLoss(weight=launcher.class_weights(labels))), use a focal loss "
            "(launcher.FocalLoss), or a weighted sampler, and watch per-class metrics")


def fingerprints(ds: Dataset) -> tuple[set[bytes], int]:
    """(hashes of the inputs, how many samples were hashed)."""
    if is_tensor_data(ds):
        x = ds.tensors[0].detach().cpu().contiguous()
        rows = x.reshape(len(x), -1).numpy() if len(x) else []
        return {hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in rows}, len(x)
    n = min(len(ds), HASH_LIMIT)
    hashes = set()
    for i in range(n):
        x = torch.as_tensor(ds[i][0]).detach().cpu().contiguous()
        hashes.add(hashlib.blake2b(x.numpy().tobytes(), digest_size=16).digest())
    return hashes, n


def leakage(splits: dict, report: Report) -> None:
    hashed = {name: fingerprints(ds) for name, ds in splits.items() if ds is not None}
    if len(hashed) < 2:
        report.lines.append("splits   only a training split: nothing to compare")
        return
    shared = {}
    names = list(hashed)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared[f"{a}/{b}"] = len(hashed[a][0] & hashed[b][0])
    report.values["shared_samples"] = shared
    sizes = " / ".join(f"{name} {n:,}" for name, (_, n) in hashed.items())
    if not any(shared.values()):
        report.lines.append(f"splits   no input shared between {', '.join(names)} ({sizes} hashed)")
        return
    what = ", ".join(f"{n:,} shared by {pair.replace('/', ' and ')}" for pair, n in shared.items() if n)
    report.lines.append(f"splits   {what} ({sizes} hashed)")
    report.warnings.append(
        f"the same inputs appear in more than one split ({what}): the evaluation scores memorised samples, and "
        "every metric on those splits overstates the model; remove them from the evaluation splits in data()")


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


# ---------------------------------------------------------------- during training

VANISHING = 1e-4  # a layer's gradient norm below this fraction of the largest layer's
EXPLODING = 100.0  # a layer's gradient norm above this multiple of its first sampled value
DEAD = 0.5  # share of a ReLU's units silent on a whole batch
DIVERGED = 1.5  # the last training loss over the first; or a record twice the lowest before it (and above the first)
OVERFIT = 1.25  # the last validation loss over the best one, with the training loss still falling
RATIO = (1e-6, 1e-1)  # healthy |Δw|/|w| per step lies well inside, around 1e-3
RELU_LIKE = (nn.ReLU, nn.ReLU6)


@dataclass
class Monitor:
    """Per-layer gradient norms, update-to-weight ratios and dead ReLUs on sampled steps (the recipe's module
    under DDP or in one process, where every rank holds whole gradients); warnings once per kind and layer."""

    module: nn.Module
    first_norms: dict = field(default_factory=dict)
    ratios: dict = field(default_factory=dict)  # layer → the ratios sampled
    warned: set = field(default_factory=set)
    hooks: list = field(default_factory=list)
    silent: dict = field(default_factory=dict)  # ReLU name → (units silent on the batch, units)

    def layers(self):
        """(name, parameter) of the trainable weight matrices and kernels: what the checks look at."""
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad and p.ndim >= 2]

    def watch(self) -> None:
        """Record which ReLU units stay silent in the next forward (the step's last micro-batch)."""
        def hook(name):
            def record(mod, args, out):
                units = out.detach().movedim(1, 0).reshape(out.shape[1], -1) if out.ndim > 1 else out[None]
                self.silent[name] = (int((units <= 0).all(1).sum()), units.shape[0])
            return record

        self.hooks = [m.register_forward_hook(hook(n)) for n, m in self.module.named_modules()
                      if isinstance(m, RELU_LIKE)]

    def before_update(self, loss_scale: float) -> tuple[dict, dict]:
        """Gradient norms per layer (loss scale removed), and the weights the update will change."""
        for h in self.hooks:
            h.remove()
        norms = {n: p.grad.float().norm().item() / loss_scale for n, p in self.layers() if p.grad is not None}
        return norms, {n: p.detach().clone() for n, p in self.layers()}

    def after_update(self, step: int, norms: dict, weights: dict) -> tuple[dict, list[str]]:
        """The step's record for metrics.jsonl and W&B, and the warnings not given before."""
        record, warnings = {}, []
        ratios = {}
        for n, p in self.layers():
            size = weights[n].float().norm().item()
            if size > 0:
                ratios[n] = (p.detach().float() - weights[n].float()).norm().item() / size
                self.ratios.setdefault(n, []).append(ratios[n])
        record.update({f"health/grad_norm/{n}": v for n, v in norms.items()})
        record.update({f"health/update_ratio/{n}": v for n, v in ratios.items()})
        shares = {n: s / u for n, (s, u) in self.silent.items()}
        record.update({f"health/dead/{n}": share for n, share in shares.items()})
        largest = max(norms.values(), default=0.0)
        vanishing = [n for n, v in norms.items() if largest > 0 and v < VANISHING * largest]
        exploding = [n for n, v in norms.items() if not math.isfinite(v) or (
            self.first_norms.get(n, 0) > 0 and v > EXPLODING * self.first_norms[n])]
        for n, v in norms.items():
            self.first_norms.setdefault(n, v)
        dead = [n for n, share in shares.items() if share > DEAD]
        warn = self.once(warnings)
        warn("vanishing", vanishing, lambda names: (
            f"step {step}: gradients vanish in {', '.join(names)}: "
            f"{', '.join(f'{norms[n]:.2g}' for n in names)}, below {VANISHING:g} × the largest layer's "
            f"({largest:.2g}); those layers barely learn. Check the initialisation, saturating activations "
            "(sigmoid, tanh), and add normalisation layers or residual connections"))
        warn("exploding", exploding, lambda names: (
            f"step {step}: gradients explode in {', '.join(names)}: "
            f"{', '.join(f'{self.first_norms[n]:.2g} → {norms[n]:.2g}' for n in names)}; lower the learning rate, "
            "clip gradients (--clip-grad), or add normalisation layers"))
        warn("dead", dead, lambda names: (
            f"step {step}: dead ReLUs in {', '.join(names)}: "
            f"{', '.join(f'{shares[n]:.0%}' for n in names)} of their units output zero for the "
            "whole batch and get no gradient; check for large negative biases or a too high learning rate, or "
            "use LeakyReLU/GELU"))
        self.silent = {}
        return record, warnings

    def once(self, warnings: list):
        def warn(kind: str, names: list[str], text) -> None:
            new = [n for n in names if (kind, n) not in self.warned]
            if new:
                self.warned.update((kind, n) for n in new)
                warnings.append(text(new))
        return warn

    def ratio_findings(self) -> list[str]:
        """Layers whose median update-to-weight ratio over the run lies outside the healthy range."""
        medians = {n: sorted(v)[len(v) // 2] for n, v in self.ratios.items() if v}
        high = [n for n, r in medians.items() if r > RATIO[1]]
        low = [n for n, r in medians.items() if r < RATIO[0]]
        out = []
        if high:
            out.append(f"updates are large against the weights in {', '.join(high)} (median |Δw|/|w| per step "
                       f"{', '.join(f'{medians[n]:.2g}' for n in high)}; healthy is around 1e-3): the learning rate "
                       "is likely too high for them")
        if low:
            out.append(f"updates are tiny against the weights in {', '.join(low)} (median |Δw|/|w| per step "
                       f"{', '.join(f'{medians[n]:.2g}' for n in low)}; healthy is around 1e-3): the learning rate "
                       "is likely too low for them, or they are effectively frozen")
        return out


def verdict(train: list[tuple[int, float]], val: list[tuple[int, float]], monitor: Monitor | None) -> list[str]:
    """What the loss curves say at the end of training: each finding with its usual remedies; empty when the run
    looks healthy. `train` and `val` are (step, loss) in order."""
    found = []
    losses = [loss for _, loss in train if math.isfinite(loss)]
    if len(losses) >= 2:
        first, last = losses[0], losses[-1]
        lows = list(accumulate(losses, min))  # the lowest so far
        spikes = [(low, loss) for low, loss in zip(lows, losses[1:], strict=False) if loss > 2 * low and loss > first]
        if last > DIVERGED * first or spikes:
            what = (f"rose from {first:.4g} to {last:.4g}" if last > DIVERGED * first
                    else f"jumped from {spikes[0][0]:.4g} to {spikes[0][1]:.4g}")
            found.append(f"the learning rate looks too high: the training loss {what}; lower it (a learning-rate range "
                         "test finds a good one), add warm-up, or clip gradients (--clip-grad)")
        elif last > 0.9 * first:
            found.append(f"underfitting: the training loss barely fell ({first:.4g} → {last:.4g}); train longer, raise "
                         "the learning rate, use a larger model, or check that the labels can be learned from the "
                         "inputs (--check)")
    if len(val) >= 2:
        best_step, best = min(val, key=lambda sv: sv[1])
        end_step, end = val[-1]
        train_at_best = next((loss for step, loss in reversed(train) if step <= best_step), None)
        if end > OVERFIT * best and train and train_at_best is not None and train[-1][1] < train_at_best:
            gap = end - train[-1][1]
            found.append(f"overfitting: the validation loss rose from {best:.4g} (step {best_step}) to {end:.4g} (step "
                         f"{end_step}) while the training loss fell to {train[-1][1]:.4g} (gap {gap:.4g}); use the "
                         "best checkpoint (checkpoints/best), stop early (--early-stop), add data, augmentation or "
                         "weight decay, or use a smaller model")
    if monitor:
        found += monitor.ratio_findings()
    return found


def verdict_text(findings: list[str], train: list[tuple[int, float]]) -> str:
    if findings:
        return "\n".join(f"warning: {f}" for f in findings)
    if not train:
        return "verdict: no training loss was recorded"
    return f"verdict: no sign of trouble (training loss {train[0][1]:.4g} → {train[-1][1]:.4g})"


# ---------------------------------------------------------------- debugging modes

OVERFIT_GOAL = 0.1  # --overfit-batches passes when the last loss is below this fraction of the first
SWEEP = (1e-7, 10.0)  # --find-lr's range of learning rates
SMOOTHING = 0.9  # --find-lr: the exponential moving average of the loss


def without_regularisation(module: nn.Module, optimizer, loss_fn) -> list[str]:
    """--overfit-batches: weight decay, dropout and label smoothing off; says what it turned off."""
    off = []
    if any(g.get("weight_decay") for g in optimizer.param_groups):
        for g in optimizer.param_groups:
            g["weight_decay"] = 0.0
        off.append("weight decay")
    dropouts = [m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    for m in dropouts:
        m.p = 0.0
    if dropouts:
        off.append("dropout")
    if getattr(loss_fn, "label_smoothing", 0):
        loss_fn.label_smoothing = 0.0
        off.append("label smoothing")
    return off


def sweep(steps: int) -> list[float]:
    low, high = SWEEP
    return [low * (high / low) ** (t / max(1, steps - 1)) for t in range(steps)]


def smoothed(losses: list[float]) -> list[float]:
    out, average = [], 0.0
    for t, loss in enumerate(losses, start=1):
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        out.append(average / (1 - SMOOTHING ** t))  # bias-corrected: the first values are not pulled to 0
    return out


def diverged(tried: list[tuple[float, float]]) -> bool:
    """The sweep stops once the smoothed loss is not finite or 4 × its lowest value."""
    if not math.isfinite(tried[-1][1]):
        return True
    curve = smoothed([loss for _, loss in tried])
    return len(curve) > 5 and curve[-1] > 4 * min(curve)


def lr_finding(tried: list[tuple[float, float]], path: Path) -> dict:
    """The suggested learning rate (where the smoothed loss falls fastest against log lr, before its
    minimum), the curve drawn into `path`, and the event's values and line."""
    tried = [(lr, loss) for lr, loss in tried if math.isfinite(loss)]
    lrs, curve = [lr for lr, _ in tried], smoothed([loss for _, loss in tried])
    lowest = min(range(len(curve)), key=curve.__getitem__) if curve else 0
    slopes = [(curve[i + 1] - curve[i - 1]) / math.log(lrs[i + 1] / lrs[i - 1]) for i in range(1, lowest)]
    suggested = lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)] if slopes else None
    plot_lr(lrs, [loss for _, loss in tried], curve, suggested, path)
    values = {"suggested_lr": suggested, "min_loss_lr": lrs[lowest] if lrs else None, "lrs": lrs,
              "losses": [loss for _, loss in tried]}
    if suggested is None:
        line = (f"find-lr: no suggestion: the loss did not fall over {len(lrs)} steps from {SWEEP[0]:g}; run more "
                f"steps (--max-steps) or check the model with --overfit-batches → {path}")
    else:
        line = (f"find-lr: suggested learning rate {suggested:.2g} (the smoothed loss falls fastest there; its "
                f"minimum is at {lrs[lowest]:.2g}, usually ten times too high to train at) → {path}")
    return {"values": values, "line": line}


def plot_lr(lrs, losses, curve, suggested, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.plot(lrs, losses, color="0.75", linewidth=1, label="loss")
    ax.plot(lrs, curve, color="C0", linewidth=2, label="smoothed")
    if suggested:
        ax.axvline(suggested, color="C3", linestyle="--", label=f"suggested {suggested:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="learning-rate range test")
    finite = [v for v in curve if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
