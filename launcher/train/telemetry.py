"""What a run reports of itself as it trains: the logged loss (the mean over all ranks, read from the device on
log steps alone), throughput, the share of time spent waiting for data, MFU and the ETA, on rank zero's sinks."""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ..plan import Plan
from ..recipe.steps import same_extras
from ..text import duration
from .length import Length

UNOBSERVED = nullcontext()  # the context of a step that nothing counts (reusable: it holds no state)
# torch 2.13 counts the attention kernels of GPUs, not the CPU's: the same formulas for it (full T×T, as torch
# and the usual 12·layers·d·T per token count causal attention)
CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}
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


@dataclass
class Window:
    """The steps since the last log record: when it began, the steps taken, those whose loss counts (not
    skipped), and the seconds spent waiting for data."""

    start: float = field(default_factory=time.perf_counter)
    taken: int = 0
    kept: int = 0
    waited: float = 0.0


class Telemetry:
    def __init__(self, plan: Plan, length: Length, world: int, rank: int, device: torch.device, sinks, unit):
        self.plan, self.length, self.world, self.rank, self.sinks = plan, length, world, rank, sinks
        self.unit = unit  # what the step's counts count (the recipe's `counts`), for throughput
        self.loss_sum = torch.zeros((), device=device)  # of the micro-steps' mean losses; with counts, loss × count
        self.count_sum = torch.zeros((), dtype=torch.float64, device=device)  # with counts: the whole job's
        self.extra_sums: dict[str, torch.Tensor] = {}  # the step's other numbers, summed as the loss is
        self.window = Window()
        self.norm = self.lr = 0.0  # the last kept step's
        self.peak = peak_flops(device)  # per device; None where unknown: no MFU
        self.flops = None  # per optimizer step, all ranks together: counted in the first step
        self.print_every = 1 if plan.debug else plan.log_every * math.ceil(length.total / 20 / plan.log_every)
        self.printed_eval = -self.print_every
        self.began = self.first_step = 0  # set as training starts (begin)

    def begin(self, step: int) -> None:
        """Training starts (or resumes) at `step`: the ETA is at this start's pace so far, evaluations included."""
        self.window.start = self.began = time.perf_counter()
        self.first_step = step

    def due(self, step: int) -> bool:
        return step % self.plan.log_every == 0 or step == self.length.total

    def counting(self):
        """Around a micro-step's forward and backward: its FLOPs counted in the first step, where MFU is reported;
        any other step pays for nothing."""
        return UNOBSERVED if self.peak is None or self.flops is not None else self.counted_flops()

    @contextmanager
    def counted_flops(self):
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
            yield
        self.flops = counter.get_total_flops() * self.plan.grad_accum * self.world

    @contextmanager
    def paused(self):
        """Time that throughput does not count: evaluations, samples, saves."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.window.start += time.perf_counter() - t

    def waiting(self, batches, end):
        """The next batch, its wait counted as data time."""
        t = time.perf_counter()
        batch = next(batches, end)
        self.window.waited += time.perf_counter() - t
        return batch

    def took(self, kept: tuple | None, norm: float = 0.0, lr: float = 0.0) -> None:
        """A step taken; `kept` (its loss sum, its global count) where its loss counts, with its gradient norm
        and learning rate."""
        self.window.taken += 1
        if kept is None:
            return
        step_loss, total, extras = kept
        self.norm, self.lr = norm, lr
        self.loss_sum += step_loss
        if extras or self.extra_sums:
            self.add_extras(extras)
        if total is not None:
            self.count_sum += total
        self.window.kept += 1

    def sums(self) -> tuple[list[str], torch.Tensor]:
        """(the extras' names, this rank's loss sum and theirs in one tensor)."""
        names = sorted(self.extra_sums)
        like = {"dtype": self.loss_sum.dtype, "device": self.loss_sum.device}
        return names, torch.stack([self.loss_sum, *(torch.as_tensor(self.extra_sums[n], **like) for n in names)])

    def add_extras(self, extras: dict) -> None:
        """A step's extras into the window's sums; every step names the same ones, as every rank's must for
        their sums to be reduced together."""
        if self.extra_sums:
            same_extras(self.extra_sums, extras)
        for name, value in extras.items():
            self.extra_sums[name] = self.extra_sums.get(name, 0) + value

    def log(self, step: int, counted: bool, skipped: int, scaler) -> float:
        """A log step: one all-reduce of the loss (and the step's extras), and a record on rank zero; the logged
        loss (all ranks' mean)."""
        plan, window, total_steps, per_epoch = self.plan, self.window, self.length.total, self.length.steps_per_epoch
        names, sums = self.sums()
        if self.world > 1:
            torch.distributed.all_reduce(sums)
        if counted:  # the mean over every item the window's kept steps counted
            *values, items = torch.cat((sums.double(), self.count_sum.reshape(1))).tolist()
            divisor = items
        else:
            values, divisor = sums.tolist(), window.kept * plan.grad_accum * self.world
        loss, *extras = (v / divisor if divisor else math.nan for v in values)
        self.loss_sum.zero_()
        self.count_sum.zero_()
        self.extra_sums = {}
        dt = time.perf_counter() - window.start
        if self.rank == 0:  # the record, which rank zero alone writes (the loss scale is read back from the device)
            record = {"epoch": round(step / per_epoch, 3), "train/loss": loss,
                      **{f"train/{n}": v for n, v in zip(names, extras, strict=True)}, "lr": self.lr,
                      "grad_norm": self.norm, "samples_per_s": window.taken * plan.batch_size / dt,
                      "step_time": dt / window.taken, "data_wait": window.waited / dt}
            unit = None
            if counted:
                unit = self.unit or "items"
                record[f"{unit}_per_s"] = items / dt
            if plan.skip_nonfinite:
                record["skipped_steps"] = skipped
            if scaler:  # halved on each step it skips for an overflow
                record["loss_scale"] = scaler.get_scale()
            if self.peak:
                record["mfu"] = self.flops * window.taken / dt / (self.peak * self.world)
            line, eta = None, self.eta(step)
            if step % self.print_every == 0 or step == total_steps:
                line = (f"step {step:>{len(str(total_steps))}}/{total_steps}  "
                        f"epoch {math.ceil(step / per_epoch)}  loss {loss:.4f}  "
                        + "".join(f"{n} {v:.4f}  " for n, v in zip(names, extras, strict=True))
                        + f"lr {self.lr:.2e}  "
                        f"grad {self.norm:.3f}  "
                        + (f"{record[f'{unit}_per_s']:,.0f} {unit}/s  " if unit else "")
                        + f"{record['samples_per_s']:,.0f} samples/s  "
                        f"{1000 * record['step_time']:.1f} ms/step  data {100 * record['data_wait']:.0f}%"
                        + (f"  MFU {100 * record['mfu']:.1f}%" if self.peak else "")
                        + f"  ETA {duration(eta)}")
            self.sinks.log(step, record, line, eta)
        self.window = Window()
        return loss

    def eta(self, step: int) -> float:
        return (self.length.total - step) * (time.perf_counter() - self.began) / max(1, step - self.first_step)

    def shows_eval(self, step: int) -> bool:
        """Whether an evaluation at `step` gets a console line: as often as the log's lines, and the last."""
        if step - self.printed_eval >= self.print_every or step == self.length.total:
            self.printed_eval = step
            return True
        return False

    def open_window(self) -> dict:
        """The log window a checkpoint between two log steps cuts: each rank's loss sum so far and the steps in it,
        so that the first record after a resume averages the same steps, in the same order, as an unstopped run's."""
        names, mine = self.sums()
        sums = [mine]
        if self.world > 1:
            sums = [torch.empty_like(mine) for _ in range(self.world)]
            torch.distributed.all_gather(sums, mine)
        ranks = torch.stack(sums).T.tolist()  # by sum, then rank
        return {"loss_sums": ranks[0], "extras": dict(zip(names, ranks[1:], strict=True)),
                "count": self.count_sum.item(), "kept": self.window.kept, "grad_accum": self.plan.grad_accum}

    def restore_window(self, window: dict | None) -> None:
        """The open log window of a checkpoint, where the processes and accumulation steps that filled it are the
        same again (checkpoints from before it was saved have none)."""
        if window and len(window["loss_sums"]) == self.world and window["grad_accum"] == self.plan.grad_accum:
            self.loss_sum.fill_(window["loss_sums"][self.rank])
            self.extra_sums = {name: self.loss_sum.new_full((), sums[self.rank])
                               for name, sums in window.get("extras", {}).items()}
            self.count_sum.fill_(window["count"])
            self.window.kept = window["kept"]
