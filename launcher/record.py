"""What a run says about itself: its record (RUN_DIR/config.json: the plan with secrets masked, the code's
commit, the versions) and the one line it starts with."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import subprocess
from pathlib import Path

from .plan import Plan
from .text import count


def record(plan: Plan) -> dict:
    """config.json: the plan with secret-looking hyperparameters masked, the code's commit, the versions."""
    return {"plan": {**dataclasses.asdict(plan), "hparams": plan.public_hparams()},
            "git": _git(Path(plan.recipe).parent),
            "versions": _versions()}


def _git(where: Path) -> dict | None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for pkg in ("launcher", "torch", "accelerate", "deepspeed", "wandb", "torchmetrics", "numpy"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return versions


def banner(plan: Plan) -> str:
    where = (f"{count(plan.nproc, 'GPU process')} (nccl)" if plan.device == "cuda"
             else f"{count(plan.nproc, 'CPU process')}{' (gloo)' if plan.nproc > 1 else ''}")
    if plan.nnodes > 1:
        where += f" on node {plan.node_rank} of {plan.nnodes}"
    resume = f" · resuming from {plan.resume}" if plan.resume else ""
    if plan.engine == "fsdp":
        where += f" · FSDP2 {plan.sharding}{' with CPU offload' if plan.offload != 'none' else ''}"
    if plan.engine == "deepspeed":
        where += f" · DeepSpeed ZeRO-{plan.zero}{f' offload {plan.offload}' if plan.offload != 'none' else ''}"
    return (f"launch: {Path(plan.recipe).name}{' (debug)' if plan.debug else ''} · {where} · {plan.precision}"
            f" · W&B {plan.wandb} · run dir {plan.run_dir}{resume}")
