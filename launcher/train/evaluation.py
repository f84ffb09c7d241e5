"""Evaluation: exact metrics over a whole split on every rank, the best weights and early stopping, the recipe's
sample, and the test split's confusion matrix."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import RecipeError, TrainingError
from ..plan import Plan
from ..processes import hang
from ..recipe import data, steps
from .guards import METRICS_NEED
from .progress import Progress
from .telemetry import Telemetry

if TYPE_CHECKING:  # torchmetrics imports matplotlib: only where a recipe uses it
    from torchmetrics import Metric

MAX_CLASSES = 100  # a confusion matrix for up to this many classes (not for a language model's vocabulary)


@dataclass
class Metrics:
    """The recipe's metrics(hp) on the device, and the test split's confusion matrix where they classify."""

    metrics: dict
    confusion: Metric | None
    classes: list[str]


def recipe_metrics(recipe, hp, device) -> Metrics:
    metrics = {k: m.to(device) for k, m in recipe.metrics(hp).items()} if hasattr(recipe, "metrics") else {}
    confusion, classes = classification(metrics, getattr(recipe, "classes", None))
    if confusion is not None:
        confusion.to(device)
    return Metrics(metrics, confusion, classes)


class Evaluator:
    """The recipe's evaluation splits, step, metrics, best metric and sample, evaluated on the engine's model."""

    def __init__(self, plan: Plan, recipe, hp, evals: dict, eval_fn, metrics: Metrics, engine, world: int,
                 rank: int, sinks, telemetry: Telemetry):
        self.plan, self.hp, self.evals, self.eval_fn, self.engine = plan, hp, evals, eval_fn, engine
        self.world, self.rank, self.sinks, self.telemetry = world, rank, sinks, telemetry
        self.metrics, self.confusion, self.classes = metrics.metrics, metrics.confusion, metrics.classes
        self.monitor, self.mode = getattr(recipe, "best", ("val/loss", "min"))
        self.sampler = getattr(recipe, "sample", None)
        self.last: dict = {}  # the last validation's results
        self.validated_at = -1
        self.shown: set[int] = set()  # the steps whose validation has had a console line in this start

    def due(self, step: int) -> bool:
        """A validation after this step: every --eval-every steps, or at the end of every --eval-epochs'th epoch."""
        plan, per_epoch = self.plan, self.telemetry.length.steps_per_epoch
        epoch_end = step % per_epoch == 0 and plan.eval_epochs and (step // per_epoch) % plan.eval_epochs == 0
        return "val" in self.evals and bool((plan.eval_every and step % plan.eval_every == 0) or epoch_end)

    def validate(self, progress: Progress) -> str | None:
        """Evaluate on the validation split and judge it: "best" (keep these weights), "patience" (early stopping
        ran out), or None."""
        step = progress.step
        self.last = results = self.evaluate("val", step)
        self.validated_at = step
        if self.sampler:
            with self.telemetry.paused(), inference(self.engine) as model:  # every rank: a sharded model needs all
                text = self.sampler(model, self.hp)
            self.sinks.text(step, "sample", text)
        progress.history["val"].append((step, results["val/loss"]))
        if self.monitor not in results:
            raise TrainingError(f"the recipe's best metric {self.monitor!r} is not among the evaluation results "
                                f"({', '.join(results)})")
        value, best = results[self.monitor], progress.best
        if best is None or (value < best[0] if self.mode == "min" else value > best[0]):
            progress.best, progress.best_val, progress.bad_evals = (value, step), results, 0
            self.sinks.best(self.monitor, value, step)
            return "best"
        progress.bad_evals += 1
        if self.plan.early_stop and progress.bad_evals >= self.plan.early_stop:
            self.sinks.event(step, "early_stop", {
                "metric": self.monitor, "best": best[0], "best_step": best[1], "patience": self.plan.early_stop},
                f"early stop at step {step}: {self.monitor} has not improved for {progress.bad_evals} "
                f"evaluations (best {best[0]:.4f} at step {best[1]})")
            return "patience"
        return None

    def show_best(self, progress: Progress) -> None:
        """The best validation's line, where the console has not shown it: the run's last line names it."""
        if progress.best and progress.best_val and progress.best[1] not in self.shown:
            self.sinks.print(f"eval  step {progress.best[1]}  {shown(progress.best_val)}  (the best {self.monitor}; "
                             "its line was not shown above)")

    def evaluate(self, split: str, step: int, weights_step: int | None = None) -> dict:
        """The split's metrics, shown and logged; for the test split its confusion matrix too, of the weights of
        `weights_step`."""
        with self.telemetry.paused():  # throughput counts training time only
            t = time.perf_counter()
            confusion = self.confusion if split == "test" else None
            results, matrix = evaluate(self.engine, self.evals[split], self.eval_fn, self.metrics, split,
                                       2 * self.plan.micro_batch, self.plan.eval_limit, self.world, self.rank,
                                       self.sinks.progress, confusion)
            elapsed = time.perf_counter() - t
        line = None
        if self.telemetry.shows_eval(step):
            line = f"eval  step {step}  {shown(results)}  ({elapsed:.1f} s)"
            if split == "val":
                self.shown.add(step)
        self.sinks.results(step, results, line)
        if matrix is not None:
            self.sinks.classes(step, self.classes, matrix.tolist(), weights_step)
        return results


def shown(results: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in results.items())


@contextmanager
def inference(engine):
    """The model in eval mode without gradients (on every rank: a sharded model needs them all for each forward);
    afterwards its gathered parameters freed and training mode back."""
    model = engine.module
    model.eval()
    with torch.no_grad():
        yield model
    engine.reshard()
    model.train()


def evaluate(engine, loader: data.Loader, step, metrics: dict, split: str, batch: int, limit: int | None,
             world: int, rank: int, progress, confusion=None) -> tuple[dict, torch.Tensor | None]:
    """Exact metrics over the whole split, each sample counted once across all ranks; and the confusion matrix
    where one is asked for. `progress` wraps the batches (rank zero draws a bar on a terminal)."""
    engine.sync_buffers()
    counted = [*metrics.values(), *([] if confusion is None else [confusion])]
    with inference(engine) as model:
        totals, names = None, []  # sums of loss × count and of each extra × count, then the count
        batches = loader.eval_batches(batch, world, rank, limit)
        for found, real in progress(batches, f"eval {split}", loader.eval_count(batch, world, limit)):
            hang.beat()
            out = step(model, found)  # every rank runs the same number of forwards, a padding one included
            if totals is None:
                names = sorted(out.extras or ())
                if clash := [n for n in names if n in metrics]:
                    raise RecipeError(f"the step returns {', '.join(clash)} beside its loss, which metrics() also "
                                      f"names: {split}/{clash[0]} would be both; rename one")
                totals = torch.zeros(2 + len(names), dtype=torch.float64, device=loader.device)
            elif names or out.extras:
                steps.same_extras(names, out.extras or ())
            if real:
                totals[0] += out.loss.double() * out.count
                for i, name in enumerate(names, start=2):
                    totals[i] += out.extras[name] * out.count
                totals[1] += out.count
                if metrics and out.preds is None:
                    raise RecipeError(METRICS_NEED)
                for m in counted:
                    m.update(out.preds, out.target)
        if world > 1:
            torch.distributed.all_reduce(totals)
        loss, items, *extras = totals.tolist()
        results = {f"{split}/loss": loss / items, **{f"{split}/{n}": v / items for n, v in zip(names, extras,
                                                                                             strict=True)}}
        for name, m in metrics.items():
            value = m.compute()  # torchmetrics gathers its state from every rank
            m.reset()
            if value.numel() == 1:
                results[f"{split}/{name}"] = value.item()
            else:
                results.update({f"{split}/{name}/{i}": v for i, v in enumerate(value.flatten().tolist())})
        matrix = None
        if confusion is not None:
            matrix = confusion.compute()  # gathered from every rank, as the metrics
            confusion.reset()
    return results, matrix


def classification(metrics: dict, names: tuple | None) -> tuple[Metric | None, list[str]]:
    """(the test split's confusion matrix, the classes' names) for a recipe whose metrics classify: torchmetrics'
    multiclass metrics of up to MAX_CLASSES classes, or its binary ones, with their classes, threshold and ignored
    label; (None, []) for any other."""
    from torchmetrics.classification import BinaryConfusionMatrix, BinaryStatScores, MulticlassConfusionMatrix

    for m in metrics.values():
        n = getattr(m, "num_classes", None)
        if type(m).__name__.startswith("Multiclass") and isinstance(n, int) and n <= MAX_CLASSES:
            matrix = MulticlassConfusionMatrix(n, ignore_index=m.ignore_index)
            break
        if isinstance(m, BinaryStatScores):
            n, matrix = 2, BinaryConfusionMatrix(m.threshold, ignore_index=m.ignore_index)
            break
    else:
        return None, []
    if names is None:
        return matrix, [str(i) for i in range(n)]
    if len(names) != n:
        raise RecipeError(f"the recipe's classes name {len(names)} classes, and its metrics count {n}")
    return matrix, [str(name) for name in names]
