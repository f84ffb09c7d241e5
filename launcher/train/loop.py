"""The training loop. Follow one batch from `Trainer.fit` through `train_step` and `after_step`; each part the
loop delegates to decides when it acts (`due`) and keeps its own state.

Conventions that decide correctness:
- `batch_size` is the global batch of one optimizer step. Each process runs `accum` micro-steps of
  batch_size / (processes × accum) samples; see recipe/data.py.
- The recipe's step (recipe/steps.py) turns a batch into its loss. Gradients are all-reduced only on the last
  micro-step; the loss is divided by `accum` once (engine.backward); clipping happens on that sync step, after
  the fp16 loss scale has been removed.
- A step that gives counts (tokens, say) is weighted by them, so that the update follows the mean over every
  item of the global batch however it was split (counts.py).
- The schedule steps once per optimizer step.
- The loss stays on the device and is read only on log steps, where one small all-reduce makes the logged loss
  the mean over all ranks (telemetry.py). The gradient norm is read every step: a non-finite one stops the run
  (or skips the step) before it can reach the weights.
- A checkpoint at step s holds everything up to and including step s's evaluations, so a resumed run continues
  exactly where the saved one was; a DDP resume settles the gradient buckets first (checkpointer.py).
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from types import ModuleType

import torch

from ..engines import engine as engines
from ..engines import group
from ..errors import Stopped, TrainingError
from ..health import debugging, preflight
from ..health import monitor as health
from ..health.report import checked, console_lines
from ..plan import Plan
from ..processes import hang
from ..processes.stop import Stop
from ..recipe import steps
from ..recipe.optim import default_optimizer
from ..sinks import Silent, Sinks
from ..text import count
from . import guards
from .checkpointer import Checkpointer, resume_point, settle_buckets
from .counts import Counts, grad_scale
from .evaluation import Evaluator, recipe_metrics
from .length import run_length
from .progress import Progress
from .telemetry import Telemetry

END = object()  # what next(batches, END) gives when a stream has run dry
UNWATCHED = nullcontext()


class Trainer:
    """A recipe's parts on an engine, trained: set up here, then `fit`. Its public surface, which the debugging
    modes drive: plan, engine, length, progress, sinks, main, epoch_batches, train_step, log."""

    def __init__(self, plan: Plan, acc, recipe: ModuleType, hp):
        self.plan, self.hp = plan, hp
        self.rank, self.world, self.main, device = acc.process_index, acc.num_processes, acc.is_main_process, acc.device
        began = time.perf_counter()
        parts = steps.build(recipe, hp, plan.seed, device, plan.workers, plan.device_data)
        self.train_data, self.augment, self.step_fn, evals = parts.train, parts.augment, parts.step, parts.evals
        self.length = length = run_length(plan, hp.epochs, parts.train.size)
        if plan.overfit_batches:  # the same few batches, as they are
            self.augment, evals = None, {}
        if plan.early_stop and "val" not in evals:
            raise TrainingError("--early-stop watches the validation split, and the recipe's data() returns none")
        self.unit = getattr(recipe, "counts", None)  # what the step's counts count
        self.counts, self.progress = Counts(plan.grad_accum * self.world, self.world, device), Progress()
        start, report = resume_point(plan, self.rank), None
        phases = {"data and model": time.perf_counter() - began}  # the start-up's, for its line
        if self.main and plan.health and not start:  # on the recipe's own model, before an engine shards it
            began = time.perf_counter()
            report = preflight.preflight(parts.module, parts.train, evals, parts.step, self.augment,
                                         plan.micro_batch, plan.seed, parts.evaluate)
            phases["pre-flight"] = time.perf_counter() - began
        began = time.perf_counter()
        self.progress.initial = report.values.get("initial_loss") if report else None
        self.engine = engines.build(acc, plan, parts.module, optimizers(recipe, hp, length.total, report))
        self.unregularised = debugging.without_regularisation(parts.module, self.engine.optimizer, parts.loss) \
            if plan.overfit_batches else []
        metrics = recipe_metrics(recipe, hp, device)
        self.needs_preds = bool(metrics.metrics and evals and parts.evaluate is parts.step)
        torch.manual_seed(plan.seed + 1 + self.rank)  # augmentation and dropout differ between ranks
        if plan.nnodes > 1:
            guards.shared_run_dir(plan, self.main)
        # rank zero's sampled checks, where it holds whole gradients (DDP, one process)
        self.watch = health.Monitor(self.engine.module) \
            if self.main and plan.health and self.engine.whole_gradients and not plan.find_lr else None
        self.every = max(1, length.total // 25)  # a sampled health check's interval
        self.checkpointer, saved = Checkpointer(plan, self.engine, self.world, self.rank), {}
        if start:
            saved = self.resume(start)
        phases["engine" + " and checkpoint" * bool(start)] = time.perf_counter() - began

        sizes = {"train": parts.train.size, **{k: v.size for k, v in evals.items()}}
        self.sinks = Sinks(plan, {**sizes, "steps_per_epoch": length.steps_per_epoch, "total_steps": length.total},
                           length.total, self.progress.step) if self.main else Silent()  # rank zero alone logs
        self.telemetry = Telemetry(plan, length, self.world, self.rank, device, self.sinks, self.unit)
        self.telemetry.restore_window(saved.get("window"))
        self.evaluator = Evaluator(plan, recipe, hp, evals, parts.evaluate, metrics, self.engine, self.world,
                                   self.rank, self.sinks, self.telemetry)
        self.evaluator.validated_at = self.progress.step if start else -1
        self.tested_at = None  # the step whose weights the test split was evaluated with
        self.announce(sizes, phases, start, report)

    def resume(self, start) -> dict:
        """The checkpoint `start` into the engine and the parts; what the parts made after this restore (the open
        log window) is returned for them."""
        saved = self.checkpointer.load(start)
        self.progress.load_state_dict(saved)
        self.counts.load_state_dict(saved.get("count_scale"))
        if self.watch and saved.get("health"):
            self.watch.restore(saved["health"])
        if self.engine.buckets and self.progress.step < self.length.total:
            epoch, offset = divmod(self.progress.step, self.length.steps_per_epoch)
            settle_buckets(self.engine, self.step_fn, next(self.epoch_batches(epoch, offset, offset + 1)))
        return saved

    def announce(self, sizes: dict, phases: dict, start, report) -> None:
        """The start's lines: the data and the batch, the start-up's phases, the resume, the pre-flight."""
        plan, length, progress = self.plan, self.length, self.progress
        shown = ", ".join(f"{k} {'stream' if v is None else f'{v:,}'}" for k, v in sizes.items())
        self.sinks.print(
            f"data: {shown} samples · {length.steps_per_epoch} steps/epoch · {length.total} optimizer steps · batch "
            f"{plan.batch_size} = {count(self.world, 'process')} × {plan.grad_accum} accumulation × "
            f"{plan.micro_batch} per device")
        self.sinks.print(f"start-up {sum(phases.values()):.1f} s: "
                         + " · ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items()))
        if start:
            self.sinks.print(f"resumed from {start} at step {progress.step}")
        if progress.best:
            self.sinks.best(self.evaluator.monitor, *progress.best)
        if report:
            *lines, summary = console_lines(report)
            for line in lines:
                self.sinks.print(line)
            self.sinks.event(0, "preflight", {**report.values, "warnings": report.warnings}, summary)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train, evaluate, save, and return the final metrics (the same on every rank)."""
        try:
            final = self._fit()
        except Stopped as stopped:  # the launcher's last line tells, from this record
            self.sinks.event(self.progress.step, "stopped", {
                "signal": signal.Signals(stopped.signum).name,
                "checkpoint": str(self.checkpointer.step_dir(self.progress.step))}, None)
            self.sinks.close(self.progress.step, ok=False)
            raise
        except BaseException:
            # the save in flight completes before this rank goes: the others wait in it for this rank's part
            self.checkpointer.settle()
            self.sinks.close(self.progress.step, ok=False)
            raise
        # None: the run had already finished
        self.sinks.close(self.progress.step, ok=True, last=None if final is None else self.done_line(final))
        return final or {}

    def _fit(self) -> dict | None:
        progress, per_epoch, total = self.progress, self.length.steps_per_epoch, self.length.total
        if progress.step >= total:
            self.sinks.print(f"nothing to do: the run already finished its {total} steps")
            return None
        self.telemetry.begin(progress.step)
        if self.plan.find_lr:
            return debugging.find_lr(self)
        with Stop(self.world) as stop:
            for epoch in range(progress.step // per_epoch, math.ceil(total / per_epoch)):
                first, last = progress.step - epoch * per_epoch, min(per_epoch, total - epoch * per_epoch)
                batches = self.epoch_batches(epoch, first, last)
                for _ in range(first, last):
                    self.train_step(batches)
                    if self.after_step():
                        return self.finish()
                    signum = stop.agreed()
                    if signum:
                        if self.checkpointer.saved_at != progress.step:
                            self.save()
                        self.checkpointer.wait()
                        raise Stopped(signum, progress.step)
        return self.finish()

    def epoch_batches(self, epoch: int, first: int, last: int):
        """The batches of steps first..last of `epoch`, for this rank: its micro-batches of each, in turn."""
        plan = self.plan
        order = 0 if plan.overfit_batches else epoch  # overfitting: epoch 0's first batches, every epoch
        return self.train_data.train_epoch(plan.seed, order, first, last, plan.batch_size, plan.grad_accum,
                                           self.world, self.rank)

    def train_step(self, batches) -> None:
        """One optimizer step: `grad_accum` micro-batches forward and backward, then one update. The ReLUs a
        sampled step watches, the FLOPs its first step counts (telemetry) and the sampled health checks hang on it;
        what only a first step needs (the step's output checked, the buckets' parameters) is done on that step
        alone, and a step of one micro-batch does no accumulation's bookkeeping."""
        engine, K, progress, counts, telemetry = self.engine, self.plan.grad_accum, self.progress, self.counts, \
            self.telemetry
        hang.beat(progress.step + 1)
        sampled = self.watch is not None and (progress.step + 1) % self.every == 0
        step_loss, step_count = None, 0  # this rank's: the sum of the micro-steps' losses (× count, with counts)
        extras = {}  # the step's other numbers, summed alike
        for k in range(K):
            batch = telemetry.waiting(batches, END)
            if batch is END:
                raise guards.stream_ended(progress.step, self.length.total, self.plan.batch_size)
            if self.augment:
                batch = self.augment(batch, progress.step // self.length.steps_per_epoch)
            if K > 1:  # one micro-batch always reduces, as every engine does unless told otherwise
                engine.sync(k == K - 1)
            if sampled and k == K - 1:
                self.watch.watch()
            with telemetry.counting():
                out = self.step_fn(engine.model, batch)
                if out.counted != counts.counted:
                    guards.first_output(out, counts.counted, self.unit, self.needs_preds)
                    counts.counted = out.counted
                engine.backward(counts.weighted(out) if out.counted else out.loss)
            part = out.loss.detach() * out.count if out.counted else out.loss.detach()
            step_loss = part if step_loss is None else step_loss + part
            step_count = step_count + out.count
            if out.extras:
                for name, value in out.weighted_extras().items():
                    extras[name] = extras.get(name, 0) + value
        if progress.step == 0 and engine.buckets and not self.plan.find_unused_parameters:
            guards.unused_parameters(engine.module)
        rescale, total = counts.global_count(step_count) if counts.counted else (None, step_count)
        progress.step += 1
        self.sinks.advance()
        lr = engine.lr()
        before = self.watch.before_update(grad_scale(engine.scaler, rescale)) if sampled else None
        norm = engine.update(rescale)  # the one read per step; no update when it is not finite
        if not math.isfinite(norm) and engine.scaler is None:  # fp16's loss scaler skips such steps itself
            self.telemetry.took(None)
            return self.nonfinite(step_loss / (step_count if counts.counted else K))
        if before and math.isfinite(norm):
            self.sample(before)
        self.telemetry.took((step_loss, total if counts.counted else None, extras), norm, lr)

    def sample(self, before: tuple[dict, dict]) -> None:
        """A sampled step's health record and new warnings, on rank zero."""
        record, warnings = self.watch.after_update(self.progress.step, *before)
        self.sinks.log(self.progress.step, record)
        if warnings:
            self.sinks.event(self.progress.step, "health", {"warnings": warnings},
                             "\n".join(f"warning: {w}" for w in warnings))

    def nonfinite(self, mean: torch.Tensor) -> None:
        name = self.engine.first_nonfinite()  # None where the engine has already dropped the gradients
        loss, progress = float(mean), self.progress
        if not self.plan.skip_nonfinite:
            raise guards.nonfinite(progress.step, name, loss)
        self.engine.skip()
        progress.skipped += 1
        self.sinks.print(f"step {progress.step}: non-finite gradient{f' in {name}' if name else ''} (loss "
                         f"{loss:.4g}); step skipped ({progress.skipped} so far)")

    def after_step(self) -> bool:
        """Logs, evaluations and saves due after this step; True when training ends early: patience ran out, or
        the batches of --overfit-batches are memorised (on every rank alike: the logged loss is all ranks' mean)."""
        plan, step = self.plan, self.progress.step
        if step == self.telemetry.first_step + 1:  # this start's first step
            if plan.compile:  # torch.compile compiles in it
                self.sinks.print(f"compile: the first step took {time.perf_counter() - self.telemetry.began:.1f} s")
            group.step_timeout(plan)
            hang.retime(plan)
        if self.telemetry.due(step):
            self.log()
        if plan.overfit_batches and step % plan.overfit_batches == 0 and debugging.memorised(
                self.progress.history["train"], plan.overfit_batches)[2]:
            return True
        if self.evaluator.due(step) and self.validate():
            return True
        if self.checkpointer.due(step):
            self.save()
        return False

    def log(self) -> None:
        """A log step: the loss of the steps since the last, all ranks' mean, into the history and the sinks."""
        progress = self.progress
        loss = self.telemetry.log(progress.step, self.counts.counted, progress.skipped, self.engine.scaler)
        progress.history["train"].append((progress.step, loss))

    def validate(self) -> bool:
        """Evaluate on the validation split, keep the best checkpoint; True when patience has run out."""
        verdict = self.evaluator.validate(self.progress)
        if verdict == "best":
            self.save(best=True)
        return verdict == "patience"

    def save(self, best: bool = False) -> None:
        """The step's checkpoint (or the best one): the engine's state and every part's."""
        with self.telemetry.paused():
            state = {**self.progress.state_dict(), "count_scale": self.counts.state_dict(),
                     "window": self.telemetry.open_window(), "health": self.watch.state() if self.watch else None}
            self.checkpointer.save(self.progress.step, state, best)

    def finish(self) -> dict:
        """The end of training: the last validation and checkpoint, the test split (on the best weights where
        asked), every rank's buffers alike, and the verdict."""
        plan, step, evaluator, final = self.plan, self.progress.step, self.evaluator, {}
        if "val" in evaluator.evals:
            if evaluator.validated_at != step:
                self.validate()
            final.update(evaluator.last)
            evaluator.show_best(self.progress)
        if self.checkpointer.saved_at != step:  # first: the last step's checkpoint continues the run
            self.save()
        self.checkpointer.wait()
        if "test" in evaluator.evals and not plan.debug:
            best, best_dir = self.progress.best, self.checkpointer.best_dir  # absent where a run resumed another's
            self.tested_at = best[1] if plan.test_weights == "best" and best and best_dir.exists() else step
            if self.tested_at != step:  # the best checkpoint's weights, as Lightning's ckpt_path="best"
                self.checkpointer.load_weights(best_dir)
            final.update(evaluator.evaluate("test", step, self.tested_at))
            self.sinks.event(step, "test", {"weights_step": self.tested_at}, None)
            if self.tested_at != step:  # the run ends with its last weights, as its last checkpoint holds
                self.checkpointer.load_weights(self.checkpointer.step_dir(step))
        self.engine.sync_buffers()  # every rank ends with the same model, buffers included
        if plan.overfit_batches:
            debugging.overfit_report(self)
        elif self.main and plan.health:
            self.verdict(final)
        return final

    def verdict(self, final: dict) -> None:
        """Rank zero's judgement of the whole run (health/monitor.py), the test split's gap to validation included."""
        progress, evaluator = self.progress, self.evaluator
        findings, unjudged = health.verdict(progress.history["train"], progress.history["val"], self.watch,
                                            progress.initial)
        val = evaluator.last if self.tested_at == evaluator.validated_at else progress.best_val
        if "test" in evaluator.evals and val and self.tested_at is not None:
            findings += health.test_gap(val, final, {k: evaluator.evals[k].size for k in ("val", "test")})
        self.sinks.event(progress.step, "verdict", {"findings": findings, "not_judged": unjudged},
                         health.verdict_text(findings, unjudged, progress.history["train"], progress.initial))

    def done_line(self, final: dict) -> str:
        """The last line: steps, the final validation metrics, the best metric and its step, the test metrics and
        whose weights gave them."""
        def shown(split: str) -> str:
            return "  ".join(f"{k} {v:.4f}" for k, v in final.items() if k.startswith(split + "/"))

        progress = self.progress
        parts = [f"done: {progress.step} steps", shown("val")]
        if progress.best:
            parts.append(f"best {self.evaluator.monitor} {progress.best[0]:.4f} at step {progress.best[1]}")
        if shown("test"):
            parts.append(shown("test") + (f" (step {self.tested_at}'s weights)" if self.tested_at != progress.step
                                          else ""))
        if progress.skipped:
            parts.append(f"({count(progress.skipped, 'step')} skipped: non-finite)")
        return "  ".join(p for p in parts if p) + f"  → {self.plan.run_dir}"


def optimizers(recipe: ModuleType, hp, total: int, report):
    """make_optimizer(module) for the engine: the recipe's optimizer(model, hp, total_steps) or the default, which
    the pre-flight checks where it runs (what the recipe hands its optimizer, before an engine wraps it)."""
    make = getattr(recipe, "optimizer", default_optimizer)

    def optimizer(module: torch.nn.Module):
        built = make(module, hp, total)
        if report:
            checked(report, "optimizer", lambda: preflight.optimizer_holds_frozen(module, built[0], report))
        return built

    return optimizer
