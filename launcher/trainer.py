"""The training loop. Follow one batch from `Trainer.fit` through `train_step` and `after_step`.

Conventions that decide correctness:
- `batch_size` is the global batch of one optimizer step. Each process runs
  `accum` micro-steps of batch_size / (processes × accum) samples; see data.py.
- The recipe's step (steps.py) turns a batch into its loss. Gradients are all-reduced
  only on the last micro-step; the loss is divided by `accum` once (engine.backward);
  clipping happens on that sync step, after the fp16 loss scale has been removed.
- A step that gives counts (tokens, say) is weighted by them: micro-step k backpropagates
  its mean loss × count_k / c, and the gradients are then scaled by c·K·P / N, N the count
  of the whole global batch (one all-reduce), so the update follows the sum of per-item
  losses over the global batch divided by N however it was split. c, the same on every
  rank, is the previous step's mean count per micro-batch (at first, the first micro-
  batches'): the backward's scale stays that of a mean loss, which fp16's scaler needs.
- The schedule steps once per optimizer step.
- The loss stays on the device and is read only on log steps, where one small
  all-reduce makes the logged loss the mean over all ranks. The gradient norm is
  read every step: a non-finite one stops the run (or skips the step) before it
  can reach the weights.
- A checkpoint at step s holds everything up to and including step s's
  evaluations, so a resumed run continues exactly where the saved one was.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from . import checkpoint, data, debugging, hang, health, preflight, steps
from . import engine as engines
from .errors import RecipeError, Stopped, TrainingError
from .flags import OVERFIT_STEPS
from .modules import buffers_kept
from .optim import default_optimizer
from .plan import Plan
from .sinks import Silent, Sinks
from .stop import Stop
from .text import count, duration

if TYPE_CHECKING:  # torchmetrics imports matplotlib: only where a recipe uses it
    from torchmetrics import Metric

END = object()  # what next(batches, END) gives when a stream has run dry
UNOBSERVED = nullcontext()  # the context of a step that nothing watches or counts (reusable: it holds no state)
# torch 2.13 counts the attention kernels of GPUs, not the CPU's: the same formulas for it (full T×T, as torch
# and the usual 12·layers·d·T per token count causal attention)
CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}
MAX_CLASSES = 100  # a confusion matrix for up to this many classes (not for a language model's vocabulary)
METRICS_NEED = ("metrics(hp) needs the step's predictions: return {'loss': ..., 'preds': ..., 'target': ...} from the "
                "step (metric.update(preds, target) receives them)")


@dataclass
class Window:
    """The steps since the last log record: when it began, the steps taken, those whose loss counts (not
    skipped), and the seconds spent waiting for data."""

    start: float = field(default_factory=time.perf_counter)
    taken: int = 0
    kept: int = 0
    waited: float = 0.0


class Trainer:
    def __init__(self, plan: Plan, acc, recipe: ModuleType, hp):
        self.plan, self.acc = plan, acc
        self.rank, self.world, device = acc.process_index, acc.num_processes, acc.device
        self.main = acc.is_main_process

        began = time.perf_counter()
        parts = steps.build(recipe, hp, plan.seed, device, plan.workers, plan.device_data)
        self.train_data, self.evals, self.augment = parts.train, parts.evals, parts.augment
        module, self.step_fn, self.eval_fn, self.loss_fn = parts.module, parts.step, parts.evaluate, parts.loss
        size = self.train_data.size
        if size is None:  # a stream without a length: one epoch, as long as the run
            self.steps_per_epoch = (plan.max_steps or OVERFIT_STEPS * plan.overfit_batches
                                    or 100 * plan.find_lr)
            if not self.steps_per_epoch:
                raise RecipeError("the training split is a stream without a length: give --max-steps N, or define "
                                  "__len__ on it (the samples of one epoch)")
        else:
            self.steps_per_epoch = size // plan.batch_size
        if self.steps_per_epoch == 0:
            raise TrainingError(f"batch_size {plan.batch_size} is larger than the training set ({size} samples)")
        self.total = plan.max_steps or hp.epochs * self.steps_per_epoch
        if plan.overfit_batches:  # the same few batches, as they are, over and over
            if plan.overfit_batches > self.steps_per_epoch:
                raise TrainingError(f"--overfit-batches {plan.overfit_batches}: the training set holds only "
                                    f"{self.steps_per_epoch} batches of {plan.batch_size}")
            self.steps_per_epoch, self.augment, self.evals = plan.overfit_batches, None, {}
            self.total = plan.max_steps or OVERFIT_STEPS * plan.overfit_batches
        if plan.find_lr:
            self.total = plan.max_steps or 100
        if plan.early_stop and "val" not in self.evals:
            raise TrainingError("--early-stop watches the validation split, and the recipe's data() returns none")

        self.sampler = getattr(recipe, "sample", None)
        self.hp = hp
        self.unit = getattr(recipe, "counts", None)  # what the step's counts count, for throughput
        self.counted = None  # whether the step gives counts: its first output tells
        start = self.resume_point()
        report = None
        phases = {"data and model": time.perf_counter() - began}  # the start-up's, for its line
        if self.main and plan.health and not start:  # on the recipe's own model, before an engine shards it
            began = time.perf_counter()
            report = preflight.preflight(module, self.train_data, self.evals, self.step_fn, self.augment,
                                         plan.micro_batch, plan.seed, self.eval_fn)
            phases["pre-flight"] = time.perf_counter() - began
        began = time.perf_counter()
        self.initial = report.values.get("initial_loss") if report else None  # where the verdict's curve starts
        make_optimizer = getattr(recipe, "optimizer", default_optimizer)

        def optimizer(m: torch.nn.Module):
            built = make_optimizer(m, hp, self.total)
            if report:  # what the recipe hands its optimizer, before an engine wraps it
                preflight.checked(report, "optimizer", lambda: preflight.optimizer_holds_frozen(m, built[0], report))
            return built

        self.engine = engines.build(acc, plan, module, optimizer)
        self.unregularised = debugging.without_regularisation(module, self.engine.optimizer, self.loss_fn) \
            if plan.overfit_batches else []
        self.metrics = {k: m.to(device) for k, m in recipe.metrics(hp).items()} if hasattr(recipe, "metrics") else {}
        self.confusion, self.classes = classification(self.metrics, getattr(recipe, "classes", None))
        if self.confusion is not None:
            self.confusion.to(device)
        self.monitor, self.mode = getattr(recipe, "best", ("val/loss", "min"))
        torch.manual_seed(plan.seed + 1 + self.rank)  # augmentation and dropout differ between ranks

        if plan.nnodes > 1:
            self.check_shared()
        # progress: everything a checkpoint restores besides the engine and the random generators
        self.step, self.best, self.bad_evals, self.skipped = 0, None, 0, 0
        self.best_val = None  # the validation metrics of the best weights, which the test evaluation may use
        self.count_scale = None  # with counts: c, a device tensor (see the module's docstring)
        self.saved_at = self.validated_at = -1
        self.tested_at = None  # the step whose weights the test split was evaluated with
        self.last_val = {}
        self.history = {"train": [], "val": []}  # (step, loss) of the whole run, resumes included: for the verdict
        self.loss_sum = torch.zeros((), device=device)  # of the micro-steps' mean losses; with counts, loss × count
        self.count_sum = torch.zeros((), dtype=torch.float64, device=device)  # with counts: the whole job's
        self.window = Window()
        # rank zero's sampled checks, where it holds whole gradients (DDP, one process)
        self.watch = health.Monitor(self.engine.module) \
            if self.main and plan.health and self.engine.whole_gradients and not plan.find_lr else None
        if start:
            self.load(start)
            self.settle_buckets()
        phases["engine" + " and checkpoint" * bool(start)] = time.perf_counter() - began

        self.norm = self.lr = 0.0
        self.peak = peak_flops(device)  # per device; None where unknown: no MFU
        self.every = max(1, self.total // 25)
        self.flops = None  # per optimizer step, all ranks together: counted in the first step
        self.print_every = 1 if plan.debug else plan.log_every * math.ceil(self.total / 20 / plan.log_every)
        self.printed_eval = -self.print_every
        sizes = {"train": self.train_data.size, **{k: v.size for k, v in self.evals.items()}}
        self.sinks = Sinks(plan, {**sizes, "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total},
                           self.total, self.step) if self.main else Silent()  # rank zero alone logs
        shown = ", ".join(f"{k} {'stream' if v is None else f'{v:,}'}" for k, v in sizes.items())
        self.sinks.print(
            f"data: {shown} samples · {self.steps_per_epoch} "
            f"steps/epoch · {self.total} optimizer steps · batch {plan.batch_size} = {count(self.world, 'process')}"
            f" × {plan.grad_accum} accumulation × {plan.micro_batch} per device")
        self.sinks.print(f"start-up {sum(phases.values()):.1f} s: "
                         + " · ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items()))
        if start:
            self.sinks.print(f"resumed from {start} at step {self.step}")
        if self.best:
            self.sinks.best(self.monitor, *self.best)
        if report:
            *lines, summary = preflight.shown(report)
            for line in lines:
                self.sinks.print(line)
            self.sinks.event(0, "preflight", {**report.values, "warnings": report.warnings}, summary)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train, evaluate, save, and return the final metrics (the same on every rank)."""
        try:
            final = self._fit()
        except Stopped as stopped:  # the launcher's last line tells, from this record
            self.sinks.event(self.step, "stopped", {"signal": signal.Signals(stopped.signum).name,
                                                    "checkpoint": str(self.step_dir())}, None)
            self.sinks.close(self.step, ok=False)
            raise
        except BaseException:
            self.sinks.close(self.step, ok=False)
            raise
        # None: the run had already finished
        self.sinks.close(self.step, ok=True, last=None if final is None else self.done_line(final))
        return final or {}

    def done_line(self, final: dict) -> str:
        """The last line: steps, the final validation metrics, the best metric and its step, the test metrics and
        whose weights gave them."""
        def shown(split: str) -> str:
            return "  ".join(f"{k} {v:.4f}" for k, v in final.items() if k.startswith(split + "/"))

        parts = [f"done: {self.step} steps", shown("val")]
        if self.best:
            parts.append(f"best {self.monitor} {self.best[0]:.4f} at step {self.best[1]}")
        if shown("test"):
            parts.append(shown("test") + (f" (step {self.tested_at}'s weights)" if self.tested_at != self.step else ""))
        if self.skipped:
            parts.append(f"({count(self.skipped, 'step')} skipped: non-finite)")
        return "  ".join(p for p in parts if p) + f"  → {self.plan.run_dir}"

    def _fit(self) -> dict | None:
        if self.step >= self.total:
            self.sinks.print(f"nothing to do: the run already finished its {self.total} steps")
            return None
        spe, plan = self.steps_per_epoch, self.plan
        self.window.start = self.began = time.perf_counter()
        self.first_step = self.step  # the ETA: at this start's pace so far, evaluations included
        if plan.find_lr:
            return debugging.find_lr(self)
        with Stop(self.world) as stop:
            for epoch in range(self.step // spe, math.ceil(self.total / spe)):
                first, last = self.step - epoch * spe, min(spe, self.total - epoch * spe)
                batches = self.epoch_batches(epoch, first, last)
                for _ in range(first, last):
                    self.train_step(batches)
                    if self.after_step():
                        return self.finish()
                    signum = stop.agreed()
                    if signum:
                        if self.saved_at != self.step:
                            self.save(self.step_dir())
                        raise Stopped(signum, self.step)
        return self.finish()

    def epoch_batches(self, epoch: int, first: int, last: int):
        plan = self.plan
        order = 0 if plan.overfit_batches else epoch  # overfitting: epoch 0's first batches, every epoch
        return self.train_data.train_epoch(plan.seed, order, first, last, plan.batch_size, plan.grad_accum,
                                           self.world, self.rank)

    def train_step(self, batches) -> None:
        """One optimizer step: `grad_accum` micro-batches forward and backward, then one update. The FLOP count
        of the first step and the sampled health checks hang on it from outside (observed, sample)."""
        engine, K = self.engine, self.plan.grad_accum
        hang.beat(self.step + 1)
        sampled = self.watch is not None and (self.step + 1) % self.every == 0
        step_loss, step_count = None, 0  # this rank's: the sum of the micro-steps' losses (× count, with counts)
        for k in range(K):
            batch = self.next_batch(batches)
            if self.augment:
                batch = self.augment(batch, self.step // self.steps_per_epoch)
            engine.sync(k == K - 1)
            with self.observed(sampled and k == K - 1):
                out = self.step_fn(engine.model, batch)
                engine.backward(self.weighted(out))
            part = out.loss.detach() * out.count if out.counted else out.loss.detach()
            step_loss = part if step_loss is None else step_loss + part
            step_count = step_count + out.count
        if self.step == 0 and engine.buckets:
            self.check_unused()
        rescale, total = self.global_count(step_count)
        self.step += 1
        self.window.taken += 1
        self.sinks.advance()
        lr = engine.lr()
        before = self.watch.before_update(self.grad_scale(rescale)) if sampled else None
        norm = engine.update(self.plan.clip_grad, rescale)  # the one read per step; no update when it is not finite
        if not math.isfinite(norm) and engine.scaler is None:  # fp16's loss scaler skips such steps itself
            return self.nonfinite(step_loss / (step_count if self.counted else K))
        if before and math.isfinite(norm):
            self.sample(before)
        self.norm, self.lr = norm, lr
        self.loss_sum += step_loss
        if self.counted:
            self.count_sum += total
        self.window.kept += 1

    def next_batch(self, batches):
        t = time.perf_counter()
        batch = next(batches, END)
        self.window.waited += time.perf_counter() - t
        if batch is END:
            self.stream_ended()
        return batch

    def observed(self, watched: bool):
        """Around a micro-step's forward and backward: its FLOPs counted in the first step, where MFU is reported;
        the ReLUs watched in a sampled step's last micro-step. Any other step pays for nothing."""
        if watched:
            self.watch.watch()
        return UNOBSERVED if self.peak is None or self.flops is not None else self.counted_flops()

    @contextmanager
    def counted_flops(self):
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
            yield
        self.flops = counter.get_total_flops() * self.plan.grad_accum * self.world

    def weighted(self, out: steps.Output) -> torch.Tensor:
        """The micro-step's loss to backpropagate: with counts, weighted by its count over c (see the module's
        docstring)."""
        if out.counted != self.counted:
            self.check_output(out)
        if not out.counted:
            return out.loss
        if self.count_scale is None:
            self.count_scale = self.mean_count(out.count)
        return out.loss * (out.count / self.count_scale).to(out.loss.dtype)

    def global_count(self, step_count) -> tuple[torch.Tensor | None, object]:
        """With counts: (the gradients' rescale c·K·P / N, N the count of the whole global batch), and c for the
        next step; without: (None, this rank's count)."""
        if not self.counted:
            return None, step_count
        total = torch.as_tensor(step_count, dtype=torch.float64, device=self.loss_sum.device)
        if self.world > 1:
            torch.distributed.all_reduce(total)
        micro_batches = self.plan.grad_accum * self.world
        rescale = (self.count_scale * micro_batches / total).float()
        self.count_scale = torch.where(total > 0, total / micro_batches, self.count_scale)
        return rescale, total

    def grad_scale(self, rescale: torch.Tensor | None) -> float:
        """What the gradients carry beyond what the update sees: the fp16 loss scale, over the counts' rescale."""
        scaler = self.engine.scaler
        return (scaler.get_scale() if scaler else 1.0) / (1.0 if rescale is None else float(rescale))

    def sample(self, before: tuple[dict, dict]) -> None:
        """A sampled step's health record and new warnings, on rank zero."""
        record, warnings = self.watch.after_update(self.step, *before)
        self.sinks.log(self.step, record)
        if warnings:
            self.sinks.event(self.step, "health", {"warnings": warnings}, "\n".join(f"warning: {w}" for w in warnings))

    def check_output(self, out: steps.Output) -> None:
        """The first output of the step decides whether it gives counts; every later one must agree."""
        if self.counted is not None:
            raise RecipeError("the step returned a count in some steps and not in others: return one always (the "
                              "batch's sample count where nothing else applies)")
        if self.unit and not out.counted:
            raise RecipeError(f"the recipe says its counts are {self.unit} (counts = {self.unit!r}), but step() "
                              "returns no count: return (loss, count) or {'loss': ..., 'count': ...}")
        if self.metrics and self.evals and self.eval_fn is self.step_fn and out.preds is None:
            raise RecipeError(METRICS_NEED)
        if not out.loss.requires_grad:
            raise RecipeError("the step's loss does not depend on any trainable parameter (computed under "
                              "torch.no_grad(), detached, or every parameter frozen?)")
        self.counted = out.counted

    def mean_count(self, count) -> torch.Tensor:
        """The first micro-step's count, averaged over the ranks: c until a whole step has been counted."""
        mean = torch.as_tensor(count, dtype=torch.float64, device=self.acc.device)
        if self.world > 1:
            torch.distributed.all_reduce(mean)
        return mean / self.world

    def check_unused(self) -> None:
        """DDP all-reduces in buckets that a parameter without a gradient never fills: name such parameters
        before the first update, instead of torch's error in the second step."""
        if self.plan.find_unused_parameters:
            return
        unused = [n for n, p in self.engine.module.named_parameters() if p.requires_grad and p.grad is None]
        if unused:
            raise RecipeError(f"{', '.join(unused[:5])}{' …' if len(unused) > 5 else ''} got no gradient in the first "
                              "step: under DDP every trainable parameter must take part in every step. Set "
                              "find_unused_parameters = True in the recipe (or pass --find-unused-parameters) if they "
                              "are used only in some steps; else remove them or freeze them (launcher.freeze)")

    def stream_ended(self) -> None:
        raise TrainingError(f"the training stream ran out at step {self.step} of {self.total} "
                            f"({self.step * self.plan.batch_size:,} samples): lower --max-steps, or make its length "
                            "(__len__) the number of samples it yields in one epoch")

    def nonfinite(self, mean: torch.Tensor) -> None:
        name = self.engine.first_nonfinite()  # None where the engine has already dropped the gradients
        loss = float(mean)
        if not self.plan.skip_nonfinite:
            raise TrainingError(
                f"non-finite gradient at step {self.step}{f', first in {name}' if name else ''} (loss {loss:.4g}); "
                "lower the learning rate, clip gradients (--clip-grad), check the inputs, or pass --skip-nonfinite "
                "to skip such steps")
        self.engine.skip()
        self.skipped += 1
        self.sinks.print(f"step {self.step}: non-finite gradient{f' in {name}' if name else ''} (loss {loss:.4g}); "
                         f"step skipped ({self.skipped} so far)")

    def after_step(self) -> bool:
        """Logs, evaluations and saves due after this step; True when training ends early: patience ran out, or
        the batches of --overfit-batches are memorised (on every rank alike: the logged loss is all ranks' mean)."""
        plan, step, spe = self.plan, self.step, self.steps_per_epoch
        if plan.compile and step == self.first_step + 1:  # torch.compile compiles in a start's first step
            self.sinks.print(f"compile: the first step took {time.perf_counter() - self.began:.1f} s")
        if step % plan.log_every == 0 or step == self.total:
            self.log()
        if plan.overfit_batches and step % plan.overfit_batches == 0 and debugging.memorised(
                self.history["train"], plan.overfit_batches)[2]:
            return True
        epoch_end = step % spe == 0 and plan.eval_epochs and (step // spe) % plan.eval_epochs == 0
        validate = (plan.eval_every and step % plan.eval_every == 0) or epoch_end
        if "val" in self.evals and validate and self.validate():
            return True
        if plan.save_every and step % plan.save_every == 0:
            self.save(self.step_dir())
        return False

    def finish(self) -> dict:
        final = {}
        if "val" in self.evals:
            if self.validated_at != self.step:
                self.validate()
            final.update(self.last_val)
        if self.saved_at != self.step:  # first: the last step's checkpoint continues the run
            self.save(self.step_dir())
        if "test" in self.evals and not self.plan.debug:
            best = checkpoint.folder(self.plan.run_dir) / "best"  # absent where a run resumed another's checkpoint
            self.tested_at = self.best[1] if self.plan.test_weights == "best" and self.best and best.exists() \
                else self.step
            if self.tested_at != self.step:  # the best checkpoint's weights, as Lightning's ckpt_path="best"
                self.load_weights(best)
            final.update(self.evaluate("test"))
            self.sinks.event(self.step, "test", {"weights_step": self.tested_at}, None)
            if self.tested_at != self.step:  # the run ends with its last weights, as its last checkpoint holds
                self.load_weights(self.step_dir())
        self.engine.sync_buffers()  # every rank ends with the same model, buffers included
        if self.plan.overfit_batches:
            debugging.overfit_report(self)
        elif self.main and self.plan.health:
            findings, unjudged = health.verdict(self.history["train"], self.history["val"], self.watch, self.initial)
            val = self.last_val if self.tested_at == self.validated_at else self.best_val
            if "test" in self.evals and val and self.tested_at is not None:
                findings += health.test_gap(val, final, {k: self.evals[k].size for k in ("val", "test")})
            self.sinks.event(self.step, "verdict", {"findings": findings, "not_judged": unjudged},
                             health.verdict_text(findings, unjudged, self.history["train"], self.initial))
        return final

    def load_weights(self, path: Path) -> tuple[dict, dict | None]:
        """A checkpoint's model (and optimizer) into the engine, the run's progress left as it is; (its state, this
        rank's random generators or None). Every file is read verified and without running code (checkpoint.py),
        the engine's own files too."""
        with checkpoint.reading(path) as ckpt:
            state = ckpt.load("state.pt")
            self.engine.load_files(path)
            self.engine.load_state_dict(state)
            rng = f"rng-{self.rank}.pt"
            return state, ckpt.load(rng) if ckpt.has(rng) else None

    # ------------------------------------------------------------------ logging and evaluation

    def log(self) -> None:
        """A log step: one all-reduce of the loss, and a record on rank zero."""
        window = self.window
        if self.world > 1:
            torch.distributed.all_reduce(self.loss_sum)
        if self.counted:  # the mean over every item the window's kept steps counted
            total, items = torch.stack((self.loss_sum.double(), self.count_sum)).tolist()
            loss = total / items if items else math.nan
        else:
            loss = self.loss_sum.item() / (window.kept * self.plan.grad_accum * self.world) if window.kept else math.nan
        self.history["train"].append((self.step, loss))
        self.loss_sum.zero_()
        self.count_sum.zero_()
        dt = time.perf_counter() - window.start
        if self.main:  # the record, which rank zero alone writes (the loss scale is read back from the device)
            record = {"epoch": round(self.step / self.steps_per_epoch, 3), "train/loss": loss, "lr": self.lr,
                      "grad_norm": self.norm, "samples_per_s": window.taken * self.plan.batch_size / dt,
                      "step_time": dt / window.taken, "data_wait": window.waited / dt}
            unit = None
            if self.counted:
                unit = self.unit or "items"
                record[f"{unit}_per_s"] = items / dt
            if self.plan.skip_nonfinite:
                record["skipped_steps"] = self.skipped
            if self.engine.scaler:  # halved on each step it skips for an overflow
                record["loss_scale"] = self.engine.scaler.get_scale()
            if self.peak:
                record["mfu"] = self.flops * window.taken / dt / (self.peak * self.world)
            line, eta = None, self.eta()
            if self.step % self.print_every == 0 or self.step == self.total:
                line = (f"step {self.step:>{len(str(self.total))}}/{self.total}  "
                        f"epoch {math.ceil(self.step / self.steps_per_epoch)}  loss {loss:.4f}  lr {self.lr:.2e}  "
                        f"grad {self.norm:.3f}  "
                        + (f"{record[f'{unit}_per_s']:,.0f} {unit}/s  " if unit else "")
                        + f"{record['samples_per_s']:,.0f} samples/s  "
                        f"{1000 * record['step_time']:.1f} ms/step  data {100 * record['data_wait']:.0f}%"
                        + (f"  MFU {100 * record['mfu']:.1f}%" if self.peak else "")
                        + f"  ETA {duration(eta)}")
            self.sinks.log(self.step, record, line, eta)
        self.window = Window()

    def eta(self) -> float:
        return (self.total - self.step) * (time.perf_counter() - self.began) / max(1, self.step - self.first_step)

    def validate(self) -> bool:
        """Evaluate on the validation split; keep the best checkpoint; True when patience has run out."""
        self.last_val = results = self.evaluate("val")
        self.validated_at = self.step
        if self.sampler:
            self.show_sample()
        self.history["val"].append((self.step, results["val/loss"]))
        if self.monitor not in results:
            raise TrainingError(f"the recipe's best metric {self.monitor!r} is not among the evaluation results "
                                f"({', '.join(results)})")
        value = results[self.monitor]
        if self.best is None or (value < self.best[0] if self.mode == "min" else value > self.best[0]):
            self.best, self.best_val, self.bad_evals = (value, self.step), results, 0
            self.sinks.best(self.monitor, value, self.step)
            self.save(checkpoint.folder(self.plan.run_dir) / "best")
            return False
        self.bad_evals += 1
        if self.plan.early_stop and self.bad_evals >= self.plan.early_stop:
            self.sinks.event(self.step, "early_stop", {
                "metric": self.monitor, "best": self.best[0], "best_step": self.best[1],
                "patience": self.plan.early_stop},
                f"early stop at step {self.step}: {self.monitor} has not improved for {self.bad_evals} "
                f"evaluations (best {self.best[0]:.4f} at step {self.best[1]})")
            return True
        return False

    def evaluate(self, split: str) -> dict:
        t = time.perf_counter()
        confusion = self.confusion if split == "test" else None
        results, matrix = evaluate(self.engine, self.evals[split], self.eval_fn, self.metrics, split,
                                   2 * self.plan.micro_batch, self.plan.eval_limit, self.world, self.rank,
                                   self.sinks.progress, confusion)
        elapsed = time.perf_counter() - t
        self.window.start += elapsed  # throughput counts training time only
        line = None
        if self.step - self.printed_eval >= self.print_every or self.step == self.total:
            self.printed_eval = self.step
            shown = "  ".join(f"{k} {v:.4f}" for k, v in results.items())
            line = f"eval  step {self.step}  {shown}  ({elapsed:.1f} s)"
        self.sinks.results(self.step, results, line)
        if matrix is not None:
            self.sinks.classes(self.step, self.classes, matrix.tolist(), self.tested_at)
        return results

    def show_sample(self) -> None:
        """The recipe's sample(model, hp), on every rank (a sharded model needs them all for each forward) in
        eval mode; rank zero shows it."""
        t = time.perf_counter()
        with inference(self.engine) as model:
            text = self.sampler(model, self.hp)
        self.window.start += time.perf_counter() - t  # throughput counts training time only
        self.sinks.text(self.step, "sample", text)

    # ------------------------------------------------------------------ checkpoints

    def step_dir(self) -> Path:
        return checkpoint.folder(self.plan.run_dir) / f"step-{self.step:08d}"

    def save(self, target: Path) -> None:
        hang.beat()
        t = time.perf_counter()
        plan = self.plan
        scale = None if self.count_scale is None else self.count_scale.item()
        window = self.open_window()
        state = {**self.engine.state_dict(), "progress": {"count_scale": scale,
            "step": self.step, "best": self.best, "best_val": self.best_val, "bad_evals": self.bad_evals,
            "skipped": self.skipped,
            "history": self.history, "initial": self.initial, "window": window,
            "health": self.watch.state() if self.watch else None}}
        meta = {"step": self.step, "engine": plan.engine, "world_size": self.world, "seed": plan.seed,
                "grad_accum": plan.grad_accum, "zero": plan.zero, "sharding": plan.sharding, "offload": plan.offload,
                "precision": plan.precision, "hparams": plan.public_hparams()}
        barrier = torch.distributed.barrier if self.world > 1 else lambda: None
        checkpoint.save(target, state, meta, self.rank, barrier, self.engine.save_files)
        if target.name != "best":
            self.saved_at = self.step
            if self.main:
                checkpoint.prune(plan.run_dir, plan.keep)
        self.window.start += time.perf_counter() - t

    def open_window(self) -> dict:
        """The log window a checkpoint between two log steps cuts: each rank's loss sum so far and the steps in it,
        so that the first record after a resume averages the same steps, in the same order, as an unstopped run's."""
        sums = [self.loss_sum]
        if self.world > 1:
            sums = [torch.empty_like(self.loss_sum) for _ in range(self.world)]
            torch.distributed.all_gather(sums, self.loss_sum)
        return {"loss_sums": torch.stack(sums).tolist(), "count": self.count_sum.item(), "kept": self.window.kept,
                "grad_accum": self.plan.grad_accum}

    def settle_buckets(self) -> None:
        """DDP reduces its first backward in one bucket in parameter order, and later ones in buckets
        rebuilt in the order gradients became ready; with 3+ ranks the two layouts round differently. A
        resumed run would take its first step in the first layout where the run it continues used the
        second, and drift from it in the last bits. One backward without an update (random generators and
        buffers such as batch-norm statistics put back) gives it the layout of the run it continues."""
        if not self.engine.buckets or self.step >= self.total:
            return
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        batch = next(self.epoch_batches(epoch, offset, offset + 1))
        rng = checkpoint.rng_state()
        with buffers_kept(self.engine.module):
            self.step_fn(self.engine.model, batch).loss.backward()
        self.engine.optimizer.zero_grad(set_to_none=True)
        checkpoint.set_rng_state(rng)

    def check_shared(self) -> None:
        """Checkpoints are written by every rank into one directory: every node must see the same one."""
        probe = Path(self.plan.run_dir) / f".shared-{self.plan.name}"
        if self.main:
            probe.write_text("")
        torch.distributed.barrier()
        seen = probe.exists()
        torch.distributed.barrier()
        if self.main:
            probe.unlink()
        if not seen:
            raise TrainingError(f"{self.plan.run_dir} on node {self.plan.node_rank} is not the directory node 0 "
                                "writes to: with --nodes, the run directory must be on a filesystem every node shares")

    def resume_point(self) -> Path | None:
        """The checkpoint to start from: after a crash and restart the newest one, else the plan's."""
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            say = (lambda text: print(f"launch: warning: {text}", file=sys.stderr, flush=True)) if self.main \
                else (lambda text: None)
            found = checkpoint.latest(self.plan.run_dir, say)
            if found:
                return found
        return Path(self.plan.resume) if self.plan.resume else None

    def load(self, path: Path) -> None:
        state, rng = self.load_weights(path)
        progress = state["progress"]
        self.step, self.bad_evals, self.skipped = progress["step"], progress["bad_evals"], progress["skipped"]
        self.best = tuple(progress["best"]) if progress["best"] else None
        self.best_val = progress.get("best_val")  # absent from checkpoints saved before it was kept
        if progress.get("count_scale") is not None:
            self.count_scale = torch.tensor(progress["count_scale"], dtype=torch.float64, device=self.acc.device)
        self.saved_at = self.validated_at = self.step
        self.restore_judgement(progress)
        if rng:
            checkpoint.set_rng_state(rng)
        elif self.main:
            print(f"launch: warning: {path} has no random-generator state for rank {self.rank} (it was saved by "
                  "fewer processes): the data order continues exactly, augmentation draws do not", file=sys.stderr)

    def restore_judgement(self, progress: dict) -> None:
        """What the verdict and the log records judge from (checkpoints from before they were saved have none): the
        losses logged so far, the pre-flight's initial loss, the sampled health history, and the open log window,
        where the processes and accumulation steps that filled it are the same again."""
        self.history = progress.get("history", self.history)
        self.initial = progress.get("initial")
        if self.watch and progress.get("health"):
            self.watch.restore(progress["health"])
        window = progress.get("window")
        if window and len(window["loss_sums"]) == self.world and window["grad_accum"] == self.plan.grad_accum:
            self.loss_sum.fill_(window["loss_sums"][self.rank])
            self.count_sum.fill_(window["count"])
            self.window.kept = window["kept"]


# dense bf16/fp16 tensor peaks in TFLOP/s, the usual denominator of MFU; the first name contained in the
# device's name wins
PEAK_TFLOPS = (("H200", 989), ("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("A100", 312), ("L40S", 362),
               ("L4", 121), ("A10", 125), ("V100", 125), ("RTX 4090", 165))


def peak_flops(device: torch.device) -> float | None:
    """The device's peak FLOP/s: $LAUNCH_PEAK_TFLOPS (for any device, CPUs included), else the table."""
    if os.environ.get("LAUNCH_PEAK_TFLOPS"):
        return float(os.environ["LAUNCH_PEAK_TFLOPS"]) * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((tflops * 1e12 for part, tflops in PEAK_TFLOPS if part in name), None)
    return None


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
        totals = torch.zeros(2, dtype=torch.float64, device=loader.device)  # sum of loss × count, counts
        batches = loader.eval_batches(batch, world, rank, limit)
        for found, real in progress(batches, f"eval {split}", loader.eval_count(batch, world, limit)):
            hang.beat()
            out = step(model, found)  # every rank runs the same number of forwards, a padding one included
            if real:
                totals[0] += out.loss.double() * out.count
                totals[1] += out.count
                if metrics and out.preds is None:
                    raise RecipeError(METRICS_NEED)
                for m in counted:
                    m.update(out.preds, out.target)
        if world > 1:
            torch.distributed.all_reduce(totals)
        results = {f"{split}/loss": (totals[0] / totals[1]).item()}
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
