"""The practitioners' checklists during and after training, run for the user on rank zero; the thresholds are
wide on purpose, so that a healthy recipe raises no warning (the pre-flight checks are preflight.py's).

During training (Monitor), on sampled steps: per-layer gradient norms, update-to-weight ratios, dead ReLUs.
At the end, a verdict from the loss curves that knows when a run is too short or too noisy to judge (the
debugging modes are debugging.py's). Every warning says in plain words what looks wrong, with the numbers
and what to do.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from itertools import accumulate

from torch import nn

# ---------------------------------------------------------------- during training

VANISHING = 1e-4  # a layer's gradient norm below this fraction of the largest layer's
EXPLODING = 100.0  # a layer's gradient norm above this multiple of its first sampled value
DEAD = 0.5  # share of a ReLU's units silent on a whole batch
DIVERGED = 1.5  # the end of the training loss over its start; or a jump to twice its lowest before (above the start)
UNDERFIT = 0.9  # the end of the training loss above this fraction of its start
JUDGED_STEPS = 100  # a shorter run is too short to call underfitting
TAIL = 0.25  # the share of the last records whose mean is the end of the curve
OVERFIT = 1.25  # the last validation loss over the best one, with the training loss still falling
RATIO = (1e-6, 1e-1)  # healthy |Δw|/|w| per step lies well inside, around 1e-3
SHORT_RATIO = 1.0  # in a run too short to judge (fresh weights move fast at first), only updates as large as them
RELU_LIKE = (nn.ReLU, nn.ReLU6)
GAP_Z = 5.0  # a test metric this many standard errors from its validation value earns a warning


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

    def state(self) -> dict:
        """What a checkpoint keeps, so that a resumed run judges the whole run: plain values only."""
        return {"first_norms": self.first_norms, "ratios": self.ratios, "warned": sorted(map(list, self.warned))}

    def restore(self, state: dict) -> None:
        self.first_norms, self.ratios = dict(state["first_norms"]), {n: list(v) for n, v in state["ratios"].items()}
        self.warned = {tuple(w) for w in state["warned"]}

    def ratio_findings(self, steps: int) -> tuple[list[str], list[str]]:
        """(layers whose median update-to-weight ratio over the run lies outside the healthy range; what a run of
        `steps` optimizer steps is too short to judge)."""
        medians = {n: sorted(v)[len(v) // 2] for n, v in self.ratios.items() if v}
        judged = steps >= JUDGED_STEPS
        high = [n for n, r in medians.items() if r > (RATIO[1] if judged else SHORT_RATIO)]
        low = [n for n, r in medians.items() if r < RATIO[0] and judged]
        unjudged = [] if judged or not any(r > RATIO[1] or r < RATIO[0] for r in medians.values()) else [
            f"too short to judge the size of updates ({steps} steps; the first steps of fresh weights are large)"]
        out = []
        if high:
            out.append(f"updates are large against the weights in {', '.join(high)} (median |Δw|/|w| per step "
                       f"{', '.join(f'{medians[n]:.2g}' for n in high)}; healthy is around 1e-3): the learning rate "
                       "is likely too high for them")
        if low:
            out.append(f"updates are tiny against the weights in {', '.join(low)} (median |Δw|/|w| per step "
                       f"{', '.join(f'{medians[n]:.2g}' for n in low)}; healthy is around 1e-3): the learning rate "
                       "is likely too low for them, or they are effectively frozen")
        return out, unjudged


def verdict(train: list[tuple[int, float]], val: list[tuple[int, float]], monitor: Monitor | None,
            initial: float | None = None) -> tuple[list[str], list[str]]:
    """What the loss curves say at the end of training: (findings, each with its usual remedies; what the run
    was too short or too noisy to judge). `train` and `val` are (step, loss) in order; the curve starts at
    `initial`, the pre-flight's loss before any step, where there is one, and ends at the mean of its last
    records, whose spread is the noise the change must stand out from."""
    found, unjudged = [], []
    losses = [loss for _, loss in train if math.isfinite(loss)]
    if losses:
        first, end, noise = ends(losses, initial)
        smooth = [statistics.fmean(losses[max(0, i - 2):i + 1]) for i in range(len(losses))]  # over 3 records
        spikes = [(low, v) for low, v in zip(accumulate(smooth, min), smooth[1:], strict=False)
                  if v > 2 * low and v > first]
        if end > DIVERGED * first + 2 * noise or spikes:
            what = (f"rose from {first:.4g} to {end:.4g}" if end > DIVERGED * first + 2 * noise
                    else f"jumped from {spikes[0][0]:.4g} to {spikes[0][1]:.4g}")
            found.append(f"the learning rate looks too high: the training loss {what}; lower it (a learning-rate range "
                         "test finds a good one), add warm-up, or clip gradients (--clip-grad)")
        elif abs(end - first) <= 2 * noise:
            unjudged.append(f"too noisy to judge the trend: {first:.4g} → {end:.4g} is within the noise of the last "
                            f"records (± {noise:.2g})")
        elif end > UNDERFIT * first:
            if train[-1][0] >= JUDGED_STEPS:
                found.append(f"underfitting: the training loss barely fell ({first:.4g} → {end:.4g}); train longer, "
                             "raise the learning rate, use a larger model, or check that the labels can be learned "
                             "from the inputs (--check)")
            else:
                unjudged.append(f"too short to judge underfitting ({train[-1][0]} steps; {JUDGED_STEPS} at least)")
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
    if monitor and train:
        ratios, too_short = monitor.ratio_findings(train[-1][0])
        found += ratios
        unjudged += too_short
    return found, unjudged


def test_gap(val: dict, test: dict, sizes: dict) -> list[str]:
    """A test metric that lies GAP_Z standard errors or more from the validation value of the same weights. The
    metrics between 0 and 1 (accuracies, F1, …) are shares of the samples, whose standard error the two split
    sizes give: sqrt(p (1 - p) (1/n_val + 1/n_test)), p their pooled value."""
    found = []
    for key, v in val.items():
        name = key.removeprefix("val/")
        t = test.get(f"test/{name}")
        if t is None or "loss" in name or not (0 <= v <= 1 and 0 <= t <= 1) or not (sizes["val"] and sizes["test"]):
            continue
        p = (v * sizes["val"] + t * sizes["test"]) / (sizes["val"] + sizes["test"])
        if not 0 < p < 1:
            continue
        error = math.sqrt(p * (1 - p) * (1 / sizes["val"] + 1 / sizes["test"]))
        if abs(t - v) >= GAP_Z * error:
            found.append(f"the test metrics are far from the validation metrics of the same weights: test/{name} "
                         f"{t:.4g} against val/{name} {v:.4g} ({sizes['test']:,} and {sizes['val']:,} samples: chance "
                         f"moves it by about {error:.2g}); look for labels that mean other things in the test split "
                         "(a class mapping of its own), test data from another distribution than training's, or the "
                         "validation split leaking into training or model selection")
            break  # one metric says it
    return found


def ends(losses: list[float], initial: float | None) -> tuple[float, float, float]:
    """(start, end, noise) of a training-loss curve: the initial loss (else the first record), the mean of the
    last quarter of the records, and that mean's standard error."""
    first = initial if initial is not None and math.isfinite(initial) else losses[0]
    tail = losses[-math.ceil(TAIL * len(losses)):]
    noise = statistics.stdev(tail) / math.sqrt(len(tail)) if len(tail) > 1 else 0.0
    return first, statistics.fmean(tail), noise


def verdict_text(findings: list[str], unjudged: list[str], train: list[tuple[int, float]],
                 initial: float | None = None) -> str:
    if findings:
        notes = [f"verdict: {'; '.join(unjudged)}"] if unjudged else []
        return "\n".join([f"warning: {f}" for f in findings] + notes)
    losses = [loss for _, loss in train if math.isfinite(loss)]
    if not losses:
        return "verdict: no training loss was recorded"
    first, end, _ = ends(losses, initial)
    return (f"verdict: no sign of trouble (training loss {first:.4g} → {end:.4g})"
            + "".join(f"; {u}" for u in unjudged))
