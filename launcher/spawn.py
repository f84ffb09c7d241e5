"""Where the processes run: in this process, or a local process group under torch.distributed's elastic agent."""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

from .plan import PLAN_ENV, Plan


def launch(plan: Plan) -> int:
    """Run the plan; return the exit code. One process runs right here, so a debugger works."""
    if plan.world_size == 1:
        from . import worker

        worker.run(plan)
        return 0
    return _local_group(plan)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_group(plan: Plan) -> int:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the failure is reported below
    os.environ[PLAN_ENV] = plan.to_json()
    # N processes share the cores; torchrun would give each one thread
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.nproc)))
    port = free_port()
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=plan.nproc,
        run_id=plan.name,
        rdzv_backend="static",
        rdzv_endpoint=f"127.0.0.1:{port}",
        rdzv_configs={"rank": 0, "timeout": 60},
        local_addr="127.0.0.1",
        max_restarts=0,
        monitor_interval=0.1,
        # local rank 0 talks to this console; the others write to files under logs/
        logs_specs=DefaultLogsSpecs(
            log_dir=str(Path(plan.run_dir) / "logs"), redirects={r: Std.ALL for r in range(1, plan.nproc)}
        ),
    )
    print(f"launch: {plan.nproc} processes, rendezvous on 127.0.0.1:{port}", flush=True)
    try:
        elastic_launch(config, sys.executable)("-u", "-m", "launcher.worker")
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"launch: rank {rank} failed: {_root_cause(failure, plan.run_dir)}", file=sys.stderr, flush=True)
        return 1
    return 0


def _root_cause(failure, run_dir: str) -> str:
    """The worker's traceback when it wrote one, else how it died and where its output went."""
    message = failure.message
    if isinstance(message, dict):
        return message.get("extraInfo", {}).get("py_callstack") or message.get("message", "")
    return f"{message} (exit code {failure.exitcode}); its output is under {Path(run_dir) / 'logs'}"
