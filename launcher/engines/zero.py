"""DeepSpeed ZeRO as an engine: its configuration from the plan, and the per-step operations.

The launcher's flags own what they mean in every engine — the global batch, accumulation, clipping,
precision, the ZeRO stage and offload — and a --deepspeed-config file may add anything else; a value
it sets that contradicts a flag is an error naming both. DeepSpeed runs its fp32 engine for bf16: mixed
precision is autocast over fp32 weights, as under DDP and FSDP. fp16 is DeepSpeed's own (fp16 weights, an
fp32 master copy, its dynamic loss scale set as torch's GradScaler sets it), which a GPU must verify
before the launcher offers it (benchmarks/gpu.py). It divides the loss by the
accumulation steps, clips, and steps the optimizer and the schedule at the accumulation boundary
itself; the launcher never does any of these a second time.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..plan import Plan
from .modules import autocast, broadcast_buffers

TAG = "zero"  # the one checkpoint tag inside a launcher checkpoint's deepspeed/ folder
OFFLOAD = {"none": (), "optimizer": ("offload_optimizer",), "params": ("offload_param",),
           "both": ("offload_optimizer", "offload_param")}


# DeepSpeed's loss scaler as torch.amp.GradScaler's defaults, which DDP and FSDP use: 2^16 at first, halved on
# every overflow (no hysteresis), doubled after 2,000 steps without one; inputs cast to fp16 by the engine
FP16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 2000, "hysteresis": 1,
        "min_loss_scale": 1, "auto_cast": True}
UNVERIFIED_FP16 = "LAUNCH_UNVERIFIED_DEEPSPEED_FP16"  # =1: allow fp16 under DeepSpeed before a GPU has verified it


class ConfigError(Exception):
    """A --deepspeed-config that cannot be used: one line, exit 2."""


def config(plan: Plan, user: dict) -> dict:
    """DeepSpeed's configuration: the launcher's values, with the user's file merged under them."""
    zero = {"stage": plan.zero, **{key: {"device": "cpu"} for key in OFFLOAD[plan.offload]}}
    ours = {
        "train_batch_size": plan.batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": plan.clip_grad,  # 0 is off; DeepSpeed's default would be 1.0
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,  # offload with the recipe's torch optimizer: nothing to compile
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the launcher logs
    }
    flags = {"train_batch_size": f"--batch-size {plan.batch_size}",
             "train_micro_batch_size_per_gpu": f"--batch-size {plan.batch_size} ({plan.micro_batch} per process "
                                               "and micro-step here)",
             "gradient_accumulation_steps": f"--grad-accum {plan.grad_accum}",
             "gradient_clipping": f"--clip-grad {plan.clip_grad}", "zero_optimization.stage": f"--zero {plan.zero}"}
    for path, flag in flags.items():
        theirs = _get(user, path)
        if theirs not in (None, "auto") and theirs != _get(ours, path):
            raise ConfigError(f"--deepspeed-config: {path} {theirs} contradicts {flag}")
    for key in ("offload_optimizer", "offload_param"):
        device = _get(user, f"zero_optimization.{key}.device")
        if device not in (None, "none") and key not in OFFLOAD[plan.offload]:
            raise ConfigError(f"--deepspeed-config: zero_optimization.{key}.device {device} contradicts --offload "
                              f"{plan.offload}")
    if plan.precision == "fp16":
        ours["fp16"] = FP16
    for block in ("fp16", "bf16"):
        if _get(user, f"{block}.enabled") and block != plan.precision:
            raise ConfigError(f"--deepspeed-config: {block}.enabled true contradicts --precision {plan.precision} "
                              "(the launcher runs DeepSpeed in fp32 under autocast: choose with --precision)")
    for block in ("optimizer", "scheduler"):
        if block in user:
            raise ConfigError(f"--deepspeed-config: its {block} block contradicts the recipe's optimizer(), "
                              "which builds the optimizer and the schedule")
    return _merge(user, ours)


def _get(tree: dict, path: str):
    for key in path.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) \
            else value
    return merged


def import_deepspeed():
    """deepspeed, told which accelerator it runs on (else it prints a warning on each import without a GPU)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def build(plan: Plan, module: nn.Module, make_optimizer) -> Zero:
    """deepspeed.initialize around the recipe's module, optimizer and schedule, in the process group the
    launcher made; fails rather than run another stage than asked for."""
    deepspeed = import_deepspeed()

    if plan.device == "cpu":  # a shared-memory all-reduce that JIT-compiles for ~30 s; gloo's gives the same sums
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    os.environ.setdefault("LOCAL_RANK", "0")  # one process inside launch itself
    # DeepSpeed's ZeRO calls torch collectives under names torch 2.13 deprecates, a warning a step per rank
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                                    "deprecated")
    autocast(module, plan)
    optimizer, scheduler = make_optimizer(module)
    deepspeed.utils.logger.setLevel(logging.ERROR)  # "untested optimizer": the recipe's torch optimizer, by design
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                      config=plan.deepspeed_config,
                                                      dist_init_required=False)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    if engine.zero_optimization_stage() != plan.zero:
        raise RuntimeError(f"--zero {plan.zero}, but DeepSpeed runs stage {engine.zero_optimization_stage()}")
    return Zero(engine, engine.module, ds_optimizer, scheduler,
                LossScale(ds_optimizer) if plan.precision == "fp16" else None, plan.clip_grad)


@dataclass
class LossScale:
    """DeepSpeed's fp16 loss scale, read as the trainer reads torch's GradScaler."""

    optimizer: torch.optim.Optimizer

    def get_scale(self) -> float:
        return float(self.optimizer.loss_scale)


@dataclass
class Zero:
    """The per-step operations of the training loop (train/loop.py) (engine.Engine) on a DeepSpeed engine."""

    model: nn.Module  # the DeepSpeedEngine: what training calls
    module: nn.Module  # the recipe's module (ZeRO-3: parameters gathered by hooks in each forward)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: LossScale | None  # fp16: DeepSpeed's own; bf16 and fp32 run its fp32 engine, with no loss scale
    clip: float  # what the config's gradient_clipping says: DeepSpeed clips inside its step
    whole_gradients = False  # they live in DeepSpeed's partitioned buffers
    buckets = False

    def sync(self, enabled: bool) -> None:
        """DeepSpeed counts micro-steps itself and reduces at the boundary."""

    def backward(self, loss: torch.Tensor) -> None:
        boundary = self.model.is_gradient_accumulation_boundary()
        self.model.backward(loss)  # divides by the accumulation steps
        if not boundary:
            self.model.step()  # counts the micro-step; no update

    def update(self, rescale: torch.Tensor | None = None) -> float:
        """Clip and step (DeepSpeed skips a step whose gradient norm is not finite); the norm before clipping.
        `rescale` multiplies the gradients (a step's counts, see train/counts.py): it divides the ZeRO optimizer's
        loss scale, which DeepSpeed divides out of the gradients before it measures and clips them (1 in its fp32
        engine; the backward, which multiplied by it, has already run). fp16's scaler then halves or doubles
        that scale, and the rescale comes off it again."""
        scale = self.optimizer.loss_scale
        if rescale is not None:
            self.optimizer.loss_scale = scale / rescale.item()
        try:
            self.model.step()
        finally:
            if rescale is not None:
                self.optimizer.loss_scale = self.optimizer.loss_scale * rescale.item()
        if self.scaler and self.optimizer.overflow:
            self.scheduler.step()  # DeepSpeed holds the schedule on an overflow; it advances with the data here
            return math.inf
        norm = self.model.get_global_grad_norm()
        return math.nan if norm is None else float(norm)

    def skip(self) -> None:
        """DeepSpeed has dropped the step; the schedule advances with the data, as in the other engines."""
        self.scheduler.step()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def first_nonfinite(self) -> str | None:
        return None  # the gradients live in DeepSpeed's partitioned buffers, already cleared

    def reshard(self) -> None:
        """ZeRO-3 frees gathered parameters after each module's forward itself."""

    def sync_buffers(self) -> None:
        broadcast_buffers(self.module)

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])

    def sharded(self) -> None:
        """DeepSpeed writes its partitions itself (save_files)."""

    def load_sharded(self, state: dict) -> None:
        raise NotImplementedError("DeepSpeed loads its own partitions")

    def load_model(self, weights: dict) -> None:
        """Whole fp32 tensors by parameter name (another engine's checkpoint) into the module, gathered where ZeRO-3
        partitions it, and into the optimizer's fp32 copies, which DeepSpeed steps (its moments start afresh)."""
        deepspeed = import_deepspeed()

        params = list(self.module.parameters())
        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=0) \
            if self.model.zero_optimization_stage() == 3 else contextlib.nullcontext()
        with gathered, torch.no_grad():
            self.module.load_state_dict(weights)
        self.optimizer.refresh_fp32_params()

    def save_files(self, folder: Path) -> None:
        """Every rank writes its partition of the weights and optimizer state (a collective)."""
        self.model.save_checkpoint(str(folder / "deepspeed"), tag=TAG, save_latest=False)

    def load_files(self, folder: Path) -> None:
        # a universal checkpoint (runs/universal.py) keeps a folder per parameter: DeepSpeed reads it when its
        # config says so, and a restart from the run's own checkpoints reads partitions again
        universal = self.model._config.load_universal_checkpoint = (folder / "deepspeed" / TAG / "zero").is_dir()
        logger = import_deepspeed().utils.logger
        level = logger.level
        if universal:  # "MPU is not provided, setting tp size to 1": there is no tensor parallelism to set
            logger.setLevel(logging.ERROR)
        try:
            self.model.load_checkpoint(str(folder / "deepspeed"), tag=TAG, load_lr_scheduler_states=False)
        finally:
            logger.setLevel(level)
