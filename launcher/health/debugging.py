"""The two debugging modes, as drivers of the trainer's own step: --overfit-batches (can the model memorise a
few batches? the regularisation switch, the rule and the report) and --find-lr (the learning-rate range test:
its sweep, stop, suggestion and curve)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from torch import nn

from ..errors import TrainingError
from ..flags import OVERFIT_STEPS
from ..text import count

OVERFIT_GOAL = 0.1  # --overfit-batches passes once a pass's mean loss is below this fraction of the first pass's
SWEEP = (1e-7, 10.0)  # --find-lr's range of learning rates
SMOOTHING = 0.9  # --find-lr: the exponential moving average of the loss
SETTLE = round(1 / (1 - SMOOTHING))  # steps the average needs to forget its start: its time constant


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


def memorised(history: list[tuple[int, float]], batches: int) -> tuple[float, float, bool]:
    """--overfit-batches, from the (step, loss) records: (the mean loss of the first pass over the batches, of the
    last whole pass, whether the last is below OVERFIT_GOAL × the first). Each pass sees every batch once: the
    means compare like with like."""
    losses = [loss for _, loss in history]
    whole = len(losses) // batches * batches
    first, last = statistics.fmean(losses[:batches]), statistics.fmean(losses[whole - batches:whole])
    return first, last, whole > batches and last < OVERFIT_GOAL * first


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
    minimum), the curve drawn into `path`, and the event's values and line. An edge of the sweep is never
    suggested: in its first SETTLE steps the moving average has not settled (its fall there is the batches'
    noise, or a sweep that began too high), and a fall steepest where the loss never turned may go on above it."""
    tried = [(lr, loss) for lr, loss in tried if math.isfinite(loss)]
    lrs, curve = [lr for lr, _ in tried], smoothed([loss for _, loss in tried])
    lowest = min(range(len(curve)), key=curve.__getitem__) if curve else 0
    slopes = [(curve[i + 1] - curve[i - 1]) / math.log(lrs[i + 1] / lrs[i - 1]) for i in range(1, lowest)]
    steepest = 1 + min(range(len(slopes)), key=slopes.__getitem__) if slopes else None
    edge = None
    if steepest is not None and steepest < SETTLE:
        edge = (f"the smoothed loss fell fastest at {lrs[steepest]:.2g}, within the sweep's first {SETTLE} steps, "
                "an edge where its average has not settled")
    elif steepest is not None and lowest == len(curve) - 1 and steepest >= lowest - SETTLE:
        edge = (f"the smoothed loss fell fastest at {lrs[steepest]:.2g}, near the sweep's top, and never turned: "
                "a higher rate may do better")
    suggested = lrs[steepest] if steepest is not None and edge is None else None
    from ..runs import pictures  # matplotlib: for this run alone

    pictures.lr_range(lrs, [loss for _, loss in tried], curve, suggested, path)
    values = {"suggested_lr": suggested, "min_loss_lr": lrs[lowest] if lrs else None, "lrs": lrs,
              "losses": [loss for _, loss in tried]}
    if edge:
        values["edge_lr"] = lrs[steepest]
        line = (f"find-lr: no suggestion: {edge}; read the curve, or sweep again with more steps (--max-steps) "
                f"→ {path}")
    elif suggested is None:
        line = (f"find-lr: no suggestion: the loss did not fall over {len(lrs)} steps from {SWEEP[0]:g}; run more "
                f"steps (--max-steps) or check the model with --overfit-batches → {path}")
    else:
        line = (f"find-lr: suggested learning rate {suggested:.2g} (the smoothed loss falls fastest there; its "
                f"minimum is at {lrs[lowest]:.2g}, usually ten times too high to train at) → {path}")
    return {"values": values, "line": line}


# ---------------------------------------------------------------- drivers


def overfit_report(trainer) -> None:
    """--overfit-batches: did the loss on the fixed batches go near zero? The run fails when it did not."""
    n, off = trainer.plan.overfit_batches, ", ".join(trainer.unregularised) or "nothing to turn off"
    first, last, passed = memorised(trainer.progress.history["train"], n)
    what = (f"the training loss on {count(n, 'fixed batch')} went from {first:.4g} to {last:.4g} in "
            f"{trainer.progress.step} steps ({100 * last / first:.1f} % of its start; without augmentation, {off})")
    budget, cap = OVERFIT_STEPS * n, trainer.plan.max_steps
    if not passed and cap and cap < budget:  # the cap, not the model, may have been the limit
        raise TrainingError(f"overfit: {what}, not yet near zero within the --max-steps {cap} it was given (the test's "
                            f"own budget is {budget} steps, {OVERFIT_STEPS} per batch): run it again without "
                            "--max-steps before looking for a bug")
    if not passed:
        raise TrainingError(f"overfit: {what}, not near zero. A model that cannot memorise a few batches has a "
                            "bug: check that the labels belong to the inputs, the loss, the learning rate "
                            "(--find-lr), and that every layer gets gradients")
    trainer.sinks.event(trainer.progress.step, "overfit", {"first_loss": first, "last_loss": last, "passed": True},
                        f"overfit: passed: {what}. The model, loss and labels can learn: now train on all data")


def find_lr(trainer) -> dict:
    """--find-lr: every optimizer step at a learning rate growing geometrically from 1e-7 to 10 (each param
    group keeping its ratio to the largest), until the smoothed loss diverges; rank zero then suggests a
    rate and draws the curve. Nothing is evaluated or saved."""
    groups = trainer.engine.optimizer.param_groups
    bases = [g["lr"] for g in groups]
    top, tried, per_epoch = max(bases), [], trainer.length.steps_per_epoch
    for t, lr in enumerate(sweep(trainer.length.total)):
        if t % per_epoch == 0:
            batches = trainer.epoch_batches(t // per_epoch, 0, per_epoch)
        for g, base in zip(groups, bases, strict=True):
            g["lr"] = lr * base / top
        trainer.train_step(batches)
        trainer.log()  # the loss, averaged over the ranks: every rank stops at the same point
        tried.append((lr, trainer.progress.history["train"][-1][1]))
        if trainer.progress.skipped or diverged(tried):
            break
    if trainer.main:  # the suggestion and the curve, from the ranks' common losses
        path = Path(trainer.plan.run_dir) / "lr_find.png"
        found = lr_finding(tried, path)
        trainer.sinks.image(trainer.progress.step, "lr_find", path)
        trainer.sinks.event(trainer.progress.step, "find_lr", found["values"], found["line"])
    return {}
