"""What a run says about itself: its record (RUN_DIR/config.json: the plan with secrets masked, the code's
commit, the versions) and the one line it starts with."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

from .. import flags
from ..plan import SECRET, Plan
from ..text import count

REDACTED = "<redacted>"
# what names a run and its checkpoint: `launch resume RUN_DIR` gives them
RUN_OPTIONS = ("--run-dir", "--name", "--resume")


def record(plan: Plan, argv: list[str] | None = None) -> dict:
    """config.json: the plan with secret-looking hyperparameters masked, the command to continue the run with
    (`launch resume`), the code's commit, the versions."""
    return {"plan": {**dataclasses.asdict(plan), "hparams": plan.public_hparams()},
            **({"command": command(plan, argv)} if argv is not None else {}),
            **({"environment": environment()} if plan.script_args is not None else {}),
            "git": _git(Path(plan.recipe).parent),
            "versions": _versions()}


def environment() -> dict[str, str]:
    """The environment a script was started in (it may read anything there), values of secret-looking names
    masked."""
    return {k: REDACTED if SECRET.search(k) else v for k, v in sorted(os.environ.items())}


def command(plan: Plan, argv: list[str]) -> list[str]:
    """The launch command as given, less what names the run or its checkpoint, the recipe by its absolute path
    (a resume may start elsewhere) and secret values masked; a script's own arguments as they were."""
    if plan.script_args is not None:
        at = len(argv) - len(plan.script_args) - 1
        return [*flags.without(argv[:at], RUN_OPTIONS), plan.recipe, *plan.script_args]
    secret = plan.secret_options()
    kept = [plan.recipe if Path(token).resolve() == Path(plan.recipe) else token
            for token in flags.without(argv, RUN_OPTIONS)]
    return flags.mask(kept, secret, lambda flag: REDACTED)[0]


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
        where += f" on node {plan.node_rank} of {f'{plan.min_nodes}–' if plan.elastic else ''}{plan.nnodes}"
    resume = f" · resuming from {plan.resume}" if plan.resume else ""
    if plan.engine == "fsdp":
        where += f" · FSDP2 {plan.sharding}{' with CPU offload' if plan.offload != 'none' else ''}"
    if plan.engine == "deepspeed":
        where += f" · DeepSpeed ZeRO-{plan.zero}{f' offload {plan.offload}' if plan.offload != 'none' else ''}"
    if plan.script_args is not None:  # its W&B, if any, is its own
        return f"launch: {Path(plan.recipe).name} (a script) · {where} · {plan.precision} · run dir {plan.run_dir}"
    return (f"launch: {Path(plan.recipe).name}{' (debug)' if plan.debug else ''} · {where} · {plan.precision}"
            f" · W&B {plan.wandb} · run dir {plan.run_dir}{resume}")
