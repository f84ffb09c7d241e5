"""The run's checkpoints as the loop sees them: when one is due, where it goes, saving (every rank), loading
the engine's state and this rank's random generators, and which checkpoint a start resumes from. A checkpoint at
step s holds everything up to and including step s's evaluations: the loop saves after them."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..engines.modules import buffers_kept
from ..plan import Plan
from ..processes import hang
from ..runs import checkpoint
from ..runs.files import warn


class Checkpointer:
    def __init__(self, plan: Plan, engine, world: int, rank: int):
        self.plan, self.engine, self.world, self.rank = plan, engine, world, rank
        self.saved_at = -1  # the step of the newest step checkpoint

    def due(self, step: int) -> bool:
        return bool(self.plan.save_every) and step % self.plan.save_every == 0

    def step_dir(self, step: int) -> Path:
        return checkpoint.folder(self.plan.run_dir) / f"step-{step:08d}"

    @property
    def best_dir(self) -> Path:
        return checkpoint.folder(self.plan.run_dir) / "best"

    def save(self, step: int, progress: dict, best: bool = False) -> None:
        """The engine's state and the run's `progress` at `step`, as the step's checkpoint (older ones pruned to
        --keep) or as the best one."""
        hang.beat()
        plan, target = self.plan, self.best_dir if best else self.step_dir(step)
        state = {**self.engine.state_dict(), "progress": progress}
        meta = {"step": step, "engine": plan.engine, "world_size": self.world, "seed": plan.seed,
                "grad_accum": plan.grad_accum, "zero": plan.zero, "sharding": plan.sharding, "offload": plan.offload,
                "precision": plan.precision, "hparams": plan.public_hparams()}
        barrier = torch.distributed.barrier if self.world > 1 else lambda: None
        checkpoint.save(target, state, meta, self.rank, barrier, self.engine.save_files)
        if not best:
            self.saved_at = step
            if self.rank == 0:
                checkpoint.prune(plan.run_dir, plan.keep)

    def load_weights(self, path: Path) -> tuple[dict, dict | None]:
        """A checkpoint's model (and optimizer) into the engine, the run's progress left as it is; (its state, this
        rank's random generators or None). Every file is read verified and without running code (runs/checkpoint.py),
        the engine's own files too."""
        with checkpoint.reading(path) as ckpt:
            state = ckpt.load("state.pt")
            self.engine.load_files(path)
            self.engine.load_state_dict(state)
            rng = f"rng-{self.rank}.pt"
            return state, ckpt.load(rng) if ckpt.has(rng) else None

    def load(self, path: Path) -> dict:
        """Resume from `path`: the engine's state, this rank's random generators; the checkpoint's progress."""
        state, rng = self.load_weights(path)
        if rng:
            checkpoint.set_rng_state(rng)
        elif self.rank == 0:
            warn(f"{path} has no random-generator state for rank {self.rank} (it was saved by fewer processes): the "
                 "data order continues exactly, augmentation draws do not")
        self.saved_at = state["progress"]["step"]
        return state["progress"]


def resume_point(plan: Plan, rank: int) -> Path | None:
    """The checkpoint to start from: after a crash and restart the newest one, else the plan's."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        found = checkpoint.latest(plan.run_dir, warn if rank == 0 else lambda text: None)
        if found:
            return found
    return Path(plan.resume) if plan.resume else None


def settle_buckets(engine, step_fn, batch) -> None:
    """DDP reduces its first backward in one bucket in parameter order, and later ones in buckets rebuilt in the
    order gradients became ready; with 3+ ranks the two layouts round differently. A resumed run would take its
    first step in the first layout where the run it continues used the second, and drift from it in the last
    bits. One backward of `batch` without an update (random generators and buffers such as batch-norm statistics
    put back) gives it the layout of the run it continues."""
    rng = checkpoint.rng_state()
    with buffers_kept(engine.module):
        step_fn(engine.model, batch).loss.backward()
    engine.optimizer.zero_grad(set_to_none=True)
    checkpoint.set_rng_state(rng)
