"""The run's checkpoints as the loop sees them: when one is due, where it goes, saving (every rank), loading
the engine's state and this rank's random generators, and which checkpoint a start resumes from. A checkpoint at
step s holds everything up to and including step s's evaluations: the loop saves after them."""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path

import torch

from ..engines.modules import buffers_kept
from ..plan import Plan, attempt
from ..processes import hang
from ..runs import checkpoint
from ..runs.files import warn


class Checkpointer:
    def __init__(self, plan: Plan, engine, world: int, rank: int):
        self.plan, self.engine, self.world, self.rank = plan, engine, world, rank
        self.saved_at = -1  # the step of the newest step checkpoint
        self.pending: Future | None = None  # the asynchronous save in flight: at most one
        # DCP writes in the background over a gloo group of its own (torchtitan's way): the training's collectives
        # go on meanwhile over theirs
        self.asynchronous = plan.async_save and plan.engine != "deepspeed"
        self.group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=plan.timeout)) \
            if self.asynchronous and world > 1 else None
        self.staging = None  # DCP's stager, made at the first asynchronous save
        if self.asynchronous:
            mine = weakref.ref(self)
            os.register_at_fork(before=lambda: (checkpointer := mine()) and checkpointer.written())

    def due(self, step: int) -> bool:
        return bool(self.plan.save_every) and step % self.plan.save_every == 0

    def step_dir(self, step: int) -> Path:
        return checkpoint.folder(self.plan.run_dir) / f"step-{step:08d}"

    @property
    def best_dir(self) -> Path:
        return checkpoint.folder(self.plan.run_dir) / "best"

    def save(self, step: int, progress: dict, best: bool = False) -> None:
        """The engine's state and the run's `progress` at `step`, as the step's checkpoint (older ones pruned to
        --keep) or as the best one. The shards are written in the background where the plan says so: the
        checkpoint counts once all of it is on disk and renamed into place; the previous save is waited for
        first."""
        self.wait()
        hang.beat()
        plan, target = self.plan, self.best_dir if best else self.step_dir(step)
        state, shards = {**self.engine.state_dict(), "progress": progress}, self.engine.sharded()
        meta = {"step": step, "engine": plan.engine, "world_size": self.world, "seed": plan.seed,
                "grad_accum": plan.grad_accum, "zero": plan.zero, "sharding": plan.sharding, "offload": plan.offload,
                "precision": plan.precision, "sharded": shards is not None, "hparams": plan.public_hparams()}
        barrier = torch.distributed.barrier if self.world > 1 else lambda: None
        if not best:
            self.saved_at = step
        # imported here, not at the top: DCP takes most of a second to import, which a run that never saves or
        # loads need not pay
        from ..runs import sharded

        if shards is None or not self.asynchronous:
            def files(folder: Path) -> dict[str, str] | None:
                self.engine.save_files(folder)
                return sharded.save(folder, shards) if shards is not None else None

            checkpoint.save(target, state, meta, self.rank, barrier, files)
            self.published(best)
            return
        tmp, _ = checkpoint.begin(target, state, self.rank, barrier, self.engine.save_files)
        self.staging = self.staging or sharded.stager()
        upload, finished = sharded.save_async(tmp, shards, self.group, self.staging), Future()

        def publish(upload: Future) -> None:  # in DCP's thread, once every rank's part is written
            error = None
            try:
                hashed = upload.result()
                if self.rank == 0:
                    checkpoint.publish(tmp, target, meta, hashed)
                    self.published(best)
            except BaseException as e:
                errors = sharded.failures(e)
                full = any(checkpoint.disk_full(error) for error in errors)
                error = checkpoint.full(target, tmp) if full else errors[0] if errors else e
            if self.group is not None:  # a rank's save ends once rank 0 published it: a rank that fails meanwhile
                with contextlib.suppress(Exception):  # waits for that (settle) before the agent stops the others
                    torch.distributed.barrier(group=self.group)
            finished.set_exception(error) if error else finished.set_result(None)

        upload.add_done_callback(publish)
        self.pending = finished

    def published(self, best: bool) -> None:
        if not best and self.rank == 0:
            checkpoint.prune(self.plan.run_dir, self.plan.keep)

    def settle(self) -> None:
        """wait() on the way out of a failed run: what failed is the run's error, not this."""
        try:
            self.wait()
        except BaseException:
            pass

    def written(self) -> None:
        """Until the save in flight (if any) is on disk, its outcome left to wait(); before every fork of this
        process. A child forked while DCP's writer thread runs may inherit a lock that thread holds (a DataLoader
        worker hung at its start on glibc's atexit lock), so a new epoch's or evaluation's DataLoader workers start
        once the save is written. Forks from another thread (none expected: DCP's own would wait on itself) pass."""
        if self.pending is not None and threading.current_thread() is threading.main_thread():
            self.pending.exception()

    def wait(self) -> None:
        """Until the save in flight (if any) is complete: before the next, at a stop and at the end."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        hang.beat()
        pending.result()  # raises what failed: a full disk as CheckpointError, the rest as it was

    def load_weights(self, path: Path) -> tuple[dict, dict | None]:
        """A checkpoint's model (and optimizer) into the engine, the run's progress left as it is; (its state, this
        rank's random generators or None). Every file is read verified and without running code (runs/checkpoint.py),
        the engine's own files too."""
        from ..runs import export, sharded

        with checkpoint.reading(path) as ckpt:
            state = ckpt.load("state.pt")
            fresh = not checkpoint.optimizer_carries(ckpt.manifest.get("engine", "ddp"), self.plan.engine)
            if fresh:
                self.engine.load_model(export.read_weights(ckpt))  # whole, as export assembles them
                state = {key: value for key, value in state.items() if key not in ("model", "optimizer")}
            else:
                self.engine.load_files(path)
                if sharded.held(ckpt):
                    shards = self.engine.sharded()  # what this engine holds now: the shapes and places to load into
                    sharded.load(ckpt, shards)
                    self.engine.load_sharded(shards)
            self.engine.load_state_dict(state)
            if fresh:  # the schedule's rate, which a loaded optimizer's groups would have held
                scheduler = self.engine.scheduler
                for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
                    group["lr"] = lr
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
    """The checkpoint to start from: at a restart (after a crash, or as an elastic job's nodes change) the newest
    one, else the plan's."""
    if attempt() > 0:
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
