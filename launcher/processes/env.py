"""What this node's launcher adds to its workers' environment, as a pure function of the plan and the machine."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from ..plan import PARENT_ENV, PLAN_ENV, Plan
from . import flight

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # --precision as Accelerate's mixed precision


def worker_env(plan: Plan, environ: Mapping[str, str], parent: int, cores: int, loopback: str | None) -> dict:
    """The variables to set beside `environ` for the workers of `plan`, started by the launcher of pid `parent` on
    `cores` CPUs: the plan itself (no file can go stale, no secret is written), the thread count, the interface
    a one-node job talks over, NCCL's flight recorder on GPUs (flight.py), and for a training script what
    `accelerate launch` would give it. A variable the user set is kept, except the plan's own and Accelerate's,
    which the flags decide."""
    # N processes share the cores this task was given (a Slurm allocation, taskset), not the machine's
    defaults = {"OMP_NUM_THREADS": str(max(1, cores // plan.nproc))}
    if plan.nnodes == 1 and loopback:  # the ranks talk over loopback; nothing of the job listens on another interface
        defaults.update(GLOO_SOCKET_IFNAME=loopback, NCCL_SOCKET_IFNAME=loopback)
    env = {k: v for k, v in defaults.items() if k not in environ}
    env.update(flight.environment(plan, environ))
    env.update({PLAN_ENV: plan.to_json(), PARENT_ENV: str(parent)})
    if plan.script_args is not None:  # for an unmodified Accelerator() to read
        env.update(ACCELERATE_USE_CPU=str(plan.device == "cpu"), ACCELERATE_MIXED_PRECISION=PRECISION[plan.precision],
                   ACCELERATE_GRADIENT_ACCUMULATION_STEPS=str(plan.grad_accum),
                   ACCELERATE_DYNAMO_BACKEND="INDUCTOR" if plan.compile else "NO")
    return env


def cores() -> int:
    """The CPUs this process may run on: Slurm's CPUs per task where it says, else the affinity mask."""
    given = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(given) if given.isdigit() else len(os.sched_getaffinity(0))


def loopback() -> str | None:
    """This machine's loopback interface (lo on Linux)."""
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
