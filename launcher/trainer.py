"""The training loop. Follow one batch from the top of `Trainer.fit` to the bottom.

Conventions that decide correctness:
- `batch_size` is the global batch of one optimizer step. Each process runs
  `accum` micro-steps of batch_size / (processes × accum) samples; see data.py.
- Gradients are all-reduced only on the last micro-step; the loss is divided by
  `accum` once (engine.backward); clipping happens on that sync step, after the
  fp16 loss scale has been removed.
- The schedule steps once per optimizer step.
- The loss and gradient norm stay on the device and are read only on log steps,
  where one small all-reduce makes the logged loss the mean over all ranks.
"""

from __future__ import annotations

import math
import time
from types import ModuleType

import torch

from . import engine as engines
from .data import Loader, place
from .optim import default_optimizer
from .plan import Plan
from .sinks import Sinks


class Trainer:
    def __init__(self, plan: Plan, acc, recipe: ModuleType, hp):
        self.plan, self.acc = plan, acc
        self.rank, self.world, device = acc.process_index, acc.num_processes, acc.device

        torch.manual_seed(plan.seed)
        splits = recipe.data(hp)
        self.augment = splits.augment
        self.train_data = Loader(place(splits.train, device), device, plan.workers)
        self.evals = {name: Loader(place(ds, device), device, plan.workers)
                      for name, ds in (("val", splits.val), ("test", splits.test)) if ds is not None}
        self.steps_per_epoch = len(self.train_data) // plan.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size {plan.batch_size} is larger than the training set "
                             f"({len(self.train_data)} samples)")
        self.total = plan.max_steps or hp.epochs * self.steps_per_epoch

        torch.manual_seed(plan.seed)  # the same initial weights on every rank, whatever data() drew
        module = recipe.model(hp).to(device)
        optimizer, scheduler = getattr(recipe, "optimizer", default_optimizer)(module, hp, self.total)
        self.engine = engines.build(acc, module, optimizer, scheduler, plan.grad_accum)
        self.loss_fn = recipe.loss(hp)
        self.metrics = {k: m.to(device) for k, m in recipe.metrics(hp).items()} if hasattr(recipe, "metrics") else {}
        torch.manual_seed(plan.seed + 1 + self.rank)  # augmentation and dropout differ between ranks

        self.step = 0
        self.loss_sum = torch.zeros((), device=device)
        self.print_every = 1 if plan.debug else plan.log_every * math.ceil(self.total / 20 / plan.log_every)
        self.printed_eval = -self.print_every
        self.sinks = None
        if acc.is_main_process:  # rank zero alone logs
            sizes = {"train": len(self.train_data), **{k: len(v) for k, v in self.evals.items()}}
            self.sinks = Sinks(plan, {**sizes, "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total},
                               self.total)
            self.sinks.print(
                f"data: {', '.join(f'{k} {v:,}' for k, v in sizes.items())} samples · {self.steps_per_epoch} "
                f"steps/epoch · {self.total} optimizer steps · batch {plan.batch_size} = {self.world} process"
                f"{'es' if self.world > 1 else ''} × {plan.grad_accum} accumulation × {plan.micro_batch} per device")

    def fit(self) -> dict:
        """Train, evaluate, and return the final metrics (the same on every rank)."""
        try:
            final = self._fit()
        except BaseException:
            if self.sinks:
                self.sinks.close(ok=False)
            raise
        if self.sinks:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in final.items())
            self.sinks.print(f"done: {self.step} steps  {shown}  → {self.plan.run_dir}")
            self.sinks.close(ok=True)
        return final

    def _fit(self) -> dict:
        plan, engine, K = self.plan, self.engine, self.plan.grad_accum
        model, loss_fn, augment = engine.model, self.loss_fn, self.augment
        final, evaluated_at = {}, -1
        self.window = (time.perf_counter(), 0)  # (start, steps) of the throughput window
        for epoch in range(math.ceil(self.total / self.steps_per_epoch)):
            steps = min(self.steps_per_epoch, self.total - self.step)
            batches = self.train_data.train_epoch(plan.seed, epoch, 0, steps, plan.batch_size, K, self.world,
                                                  self.rank)
            for _ in range(steps):
                for k in range(K):
                    x, y = next(batches)
                    if augment:
                        x, y = augment(x, y)
                    engine.sync(k == K - 1)
                    loss = loss_fn(model(x), y)
                    engine.backward(loss)
                    self.loss_sum += loss.detach()
                self.step += 1
                log_now = self.step % plan.log_every == 0 or self.step == self.total
                norm = engine.grad_norm(plan.clip_grad) if plan.clip_grad > 0 or log_now else None
                lr = engine.lr() if log_now else None
                engine.step()
                self.window = (self.window[0], self.window[1] + 1)
                if self.sinks:
                    self.sinks.advance()
                if log_now:
                    self.log(epoch, norm, lr)
                if plan.eval_every and self.step % plan.eval_every == 0 and "val" in self.evals:
                    final.update(self.evaluate("val"))
                    evaluated_at = self.step
            if (steps == self.steps_per_epoch and plan.eval_epochs and (epoch + 1) % plan.eval_epochs == 0
                    and "val" in self.evals and evaluated_at != self.step):
                final.update(self.evaluate("val"))
                evaluated_at = self.step

        if "val" in self.evals and evaluated_at != self.step:
            final.update(self.evaluate("val"))
        if "test" in self.evals and not plan.debug:
            final.update(self.evaluate("test"))
        self.engine.sync_buffers()  # every rank ends with the same model, buffers included
        return final

    def log(self, epoch: int, norm: torch.Tensor, lr: float) -> None:
        """A log step: the only place the loop reads device values (and so waits for the device)."""
        start, steps = self.window
        if self.world > 1:
            torch.distributed.all_reduce(self.loss_sum)
        loss = self.loss_sum.item() / (steps * self.plan.grad_accum * self.world)
        self.loss_sum.zero_()
        dt = time.perf_counter() - start
        if self.sinks:
            record = {"epoch": round(self.step / self.steps_per_epoch, 3), "train/loss": loss, "lr": lr,
                      "grad_norm": norm.item(), "samples_per_s": steps * self.plan.batch_size / dt,
                      "step_time": dt / steps}
            line = None
            if self.step % self.print_every == 0 or self.step == self.total:
                line = (f"step {self.step:>{len(str(self.total))}}/{self.total}  epoch {epoch + 1}  loss {loss:.4f}  "
                        f"lr {lr:.2e}  grad {record['grad_norm']:.3f}  {record['samples_per_s']:,.0f} samples/s  "
                        f"{1000 * record['step_time']:.1f} ms/step")
            self.sinks.log(self.step, record, line)
        self.window = (time.perf_counter(), 0)

    def evaluate(self, split: str) -> dict:
        t = time.perf_counter()
        results = evaluate(self.engine, self.evals[split], self.loss_fn, self.metrics, split,
                           2 * self.plan.micro_batch, self.plan.eval_limit, self.world, self.rank)
        elapsed = time.perf_counter() - t
        self.window = (self.window[0] + elapsed, self.window[1])  # throughput counts training time only
        if self.sinks:
            line = None
            if self.step - self.printed_eval >= self.print_every or self.step == self.total:
                self.printed_eval = self.step
                shown = "  ".join(f"{k} {v:.4f}" for k, v in results.items())
                line = f"eval  step {self.step}  {shown}  ({elapsed:.1f} s)"
            self.sinks.log(self.step, results, line)
        return results


@torch.no_grad()
def evaluate(engine, loader: Loader, loss_fn, metrics: dict, split: str, batch: int, limit: int | None,
             world: int, rank: int) -> dict:
    """Exact metrics over the whole split: each sample counted once across all ranks."""
    engine.sync_buffers()
    model = engine.module
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=loader.device)  # sum of losses, samples
    for x, y, n in loader.eval_batches(batch, world, rank, limit):
        out = model(x)  # every rank runs the same number of forwards, padding included
        if n:
            out, y = out[:n], y[:n]
            totals[0] += loss_fn(out, y).double() * n
            totals[1] += n
            for m in metrics.values():
                m.update(out, y)
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
    model.train()
    return results
