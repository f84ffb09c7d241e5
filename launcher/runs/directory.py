"""The run directory: which one a launch writes to and what it resumes from (choose), and one live run per
run directory: node 0's launcher holds an exclusive lock on RUN_DIR/.lock for as long as
it lives, and writes who it is into the file. The kernel releases the lock when that process ends, however it
ends (its workers die with it), so a dead run never leaves it behind; a second launch, or a Slurm job
resubmitted while the first still runs, is refused and told which run holds the directory."""

from __future__ import annotations

import fcntl
import os
import re
import socket
import time
from pathlib import Path
from typing import IO

from ..errors import CheckpointError, UsageError
from ..flags import Flags
from ..plan import Plan
from ..text import count
from . import checkpoint
from .files import warn

LOCK = ".lock"
UNNAMED = "a run that has not said who it is yet"  # between taking the lock and writing into it
_held: list[IO] = []  # open while the run lives: closing the file releases the lock


def holder(run_dir: Path) -> str | None:
    """Who holds the run directory now, or None when no live run does."""
    try:
        with open(run_dir / LOCK) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or UNNAMED
    except (FileNotFoundError, NotADirectoryError):
        pass
    return None


def make(run_dir: Path) -> None:
    """Create the run directory if need be, or say in one line why it cannot be."""
    blocking = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking:
        raise UsageError(f"--run-dir {run_dir}: {blocking} is a file, not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--run-dir {run_dir} cannot be created: {e.strerror or e}") from None


def claim(run_dir: Path) -> None:
    """Create the run directory if need be and hold it until this process ends."""
    make(run_dir)
    try:
        f = open(run_dir / LOCK, "a+")
    except OSError as e:
        raise UsageError(f"--run-dir {run_dir} cannot be written: {e.strerror or e}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip()
        f.close()
        raise UsageError(busy(run_dir, who or UNNAMED)) from None
    job = os.environ.get("SLURM_JOB_ID")
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            f"{f', Slurm job {job}' if job else ''}\n")
    f.flush()
    _held.append(f)


def release() -> None:
    """Let the run directories go before this process ends: a caller in Python that ran the launch goes on."""
    while _held:
        _held.pop().close()


def busy(run_dir: Path, who: str) -> str:
    return (f"run directory {run_dir} is in use by a live run ({who}): wait for it to end, stop it, or choose "
            "another --run-dir or --name")


def choose(args: Flags, stem: str) -> tuple[Path, str, Path | None, dict]:
    """(run directory, run name, checkpoint to resume from, its manifest) from the flags: --run-dir, --name,
    --resume (a checkpoint, a run directory, or auto), or a new directory under runs/ named after `stem`."""
    resume = None
    if args.resume and args.resume != "auto":
        given = Path(args.resume).resolve()
        if not given.exists():
            raise UsageError(f"--resume {args.resume}: no such checkpoint or run directory")
        resume = given
        if (given / "checkpoints").is_dir():  # a run directory: its newest complete checkpoint
            resume = newest(given)
            if resume is None:
                raise UsageError(f"--resume {args.resume}: the run directory holds no complete checkpoint")
    if args.resume == "auto" and not (args.name or args.run_dir):
        raise UsageError("--resume auto needs --run-dir or --name: the run to continue (each run without them gets "
                         "a new directory)")
    if args.nodes > 1 and not (args.name or args.run_dir) and not args.submits:
        raise UsageError(f"--nodes {args.nodes} needs --run-dir or --name: every node must use the same run "
                         "directory, on a filesystem they share")
    if args.name:
        name = args.name
    elif args.run_dir:
        name = Path(args.run_dir).resolve().name
    elif resume and resume.parent.name == "checkpoints":
        name = resume.parent.parent.name
    else:
        name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.run_dir:
        run_dir = Path(args.run_dir).resolve()
    elif resume and resume.parent.name == "checkpoints" and not args.name:
        run_dir = resume.parent.parent  # continue the run the checkpoint belongs to
    else:
        run_dir = (Path("runs") / name).resolve()
    live = holder(run_dir) if args.node_rank == 0 else None
    if live:
        raise UsageError(busy(run_dir, live))
    continuing = args.resume == "auto" or (resume is not None and run_dir in resume.parents)
    if not continuing and args.node_rank == 0 and (run_dir / "config.json").exists():
        raise UsageError(f"run directory {run_dir} already holds a run; continue it with --resume auto, or choose "
                         "another --run-dir or --name")
    if args.resume == "auto":
        resume = newest(run_dir)
        if resume is None and args.node_rank == 0 and (run_dir / "config.json").exists():
            print(f"launch: no checkpoint in {run_dir}: starting fresh", flush=True)
    manifest = {}
    if resume:
        from . import sharded  # DCP takes most of a second to import: only a resume pays for it here

        try:
            manifest = sharded.check(resume)
        except CheckpointError as e:
            raise UsageError(f"--resume: {e}") from None
    return run_dir, name, resume, manifest


def newest(run_dir: Path) -> Path | None:
    """The run's newest complete checkpoint (damaged ones passed over with a warning), or UsageError for one that
    holds what the launcher never wrote."""
    try:
        return checkpoint.latest(run_dir, warn)
    except CheckpointError as e:
        raise UsageError(f"--resume: {e}") from None


def zero_stage(manifest: dict) -> str:
    """The ZeRO stage a DeepSpeed checkpoint was written with: its manifest's, or (manifests before it was kept)
    what its files show: stage 3 alone writes a file of model states per rank."""
    if "zero" in manifest:
        return str(manifest["zero"])
    per_rank = any(re.fullmatch(r"deepspeed/\w+/zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt", name)
                   for name in manifest["files"])
    return "3" if per_rank else "1 or 2"


def compare(plan: Plan, manifest: dict) -> None:
    """Refuse a checkpoint another engine wrote (each keeps its state its own way); warn when the run resumes
    with other settings than its checkpoint was trained with."""
    engine = manifest.get("engine", "ddp")
    resharded = manifest.get("sharded") and {engine, plan.engine} <= {"ddp", "fsdp"}  # DCP keys by parameter name
    weights_only = not checkpoint.optimizer_carries(engine, plan.engine)
    if engine != plan.engine and not resharded and not weights_only:
        raise UsageError(f"{plan.resume} was written by --engine {engine} before checkpoints were sharded: resume "
                         f"it with that engine, or take its weights with `launch export {plan.resume}`")
    world = manifest.get("world_size", plan.world_size)
    if engine == plan.engine == "deepspeed" and (zero_stage(manifest) == "3") != (plan.zero == 3):
        raise UsageError(f"{plan.resume} was written with --zero {zero_stage(manifest)}, whose partitions --zero "
                         f"{plan.zero} cannot load (stage 3 partitions the weights too): resume it with --zero "
                         f"{zero_stage(manifest)}, or start afresh from its weights (launch export {plan.resume})")
    saved = {**manifest.get("hparams", {}), "seed": manifest.get("seed"), "grad_accum": manifest.get("grad_accum")}
    now = {**plan.hparams, "seed": plan.seed, "grad_accum": plan.grad_accum}
    secret = plan.secret_hparams()
    changed = [f"{k} {saved[k]!r} → {now[k]!r}" for k in now if k in saved and saved[k] != now[k] and k not in secret]
    if changed:
        warn(f"resuming with other settings than the checkpoint was saved with: {', '.join(changed)}")
    if weights_only and plan.node_rank == 0:
        why = "DeepSpeed keeps it in partitions of its own" if engine == "deepspeed" else "DeepSpeed cannot read it"
        warn(f"resuming under --engine {plan.engine} a checkpoint --engine {engine} wrote: its weights, progress and "
             f"schedule carry over; the optimizer state (momentum, Adam's moments) starts afresh, as {why}")
    elif engine != plan.engine and plan.node_rank == 0:
        print(f"launch: resuming under --engine {plan.engine} a checkpoint --engine {engine} wrote: its weights and "
              "optimizer state carry over, resharded", flush=True)
    if world != plan.world_size and plan.node_rank == 0:
        accum, batch = saved["grad_accum"] or 1, saved.get("batch_size", plan.batch_size)
        print(f"launch: resuming on {count(plan.world_size, 'process')} a checkpoint {count(world, 'process')} "
              f"wrote: the global batch {plan.batch_size} is now {plan.world_size} × {plan.grad_accum} accumulation "
              f"× {plan.micro_batch} per process (it was {world} × {accum} × {batch // (world * accum)})", flush=True)
