"""Where the processes run: in this process, or a local process group under torch.distributed's elastic agent."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from pathlib import Path

from . import checkpoint
from .plan import PLAN_ENV, Plan

RENDEZVOUS = "launcher-static"
RENDEZVOUS_TIMEOUT = 60  # seconds for every node's agent to join
SHUTDOWN_TIMEOUT = 120  # seconds the workers get to save a checkpoint after SIGTERM / SIGINT


def launch(plan: Plan) -> int:
    """Run the plan; return the exit code. One process runs right here (a debugger works) unless it may
    need restarting, which takes the elastic agent."""
    if plan.world_size == 1 and plan.max_restarts == 0:
        return _in_process(plan)
    return _local_group(plan)


def _in_process(plan: Plan) -> int:
    from . import trainer, worker

    try:
        worker.run(plan)
    except trainer.Stopped as stopped:
        _stopped(plan, stopped.signum)
        return 128 + stopped.signum
    except worker.PLAIN as e:
        print(f"launch: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def _stopped(plan: Plan, signum: int) -> None:
    found = checkpoint.step_dirs(plan.run_dir)
    where = f"checkpoint {found[0]}; continue with --resume auto" if found else "no checkpoint was saved"
    print(f"launch: stopped by {signal.Signals(signum).name}: {where}", file=sys.stderr, flush=True)


def listen(host: str, port: int) -> socket.socket:
    """The rendezvous socket, bound here: on `host` alone, and the port is ours from this moment on."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))
    sock.listen()
    return sock


def _local_group(plan: Plan) -> int:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    _register_rendezvous()
    for name in list(logging.root.manager.loggerDict):  # torch sets a level on each; failures are reported below
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[PLAN_ENV] = plan.to_json()
    # N processes share the cores; torchrun would give each one thread
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.nproc)))
    # one node: the ranks talk over loopback, and nothing of the job listens on another interface
    loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    if loopback:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback)
    sock = listen("127.0.0.1", 0)  # one node: loopback only, never another interface
    port = sock.getsockname()[1]
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=plan.nproc,
        run_id=plan.name,
        rdzv_backend=RENDEZVOUS,
        rdzv_endpoint=f"127.0.0.1:{port}",
        rdzv_configs={"rank": 0, "timeout": RENDEZVOUS_TIMEOUT, "listen_fd": sock.detach()},
        local_addr="127.0.0.1",
        max_restarts=plan.max_restarts,
        monitor_interval=0.1,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        # local rank 0 talks to this console; the others write to files under logs/
        logs_specs=DefaultLogsSpecs(
            log_dir=str(Path(plan.run_dir) / "logs"), redirects={r: Std.ALL for r in range(1, plan.nproc)}
        ),
    )
    print(f"launch: {plan.nproc} process{'es' if plan.nproc > 1 else ''}, rendezvous on 127.0.0.1:{port}"
          f"{f', up to {plan.max_restarts} restarts' if plan.max_restarts else ''}", flush=True)
    try:
        elastic_launch(config, sys.executable)("-u", "-m", "launcher.worker")
    except ChildFailedError as e:
        rank, failure = root_cause(e.failures)
        print(f"launch: {_describe(rank, failure, plan.run_dir)}", file=sys.stderr, flush=True)
        return 1
    except SignalException as e:
        _stopped(plan, e.sigval)
        return 128 + e.sigval
    return 0


def root_cause(failures: dict) -> tuple:
    """(rank, failure) that came first: the worker's own record of the time where it wrote one, since the
    other ranks usually fail because of it (a closed connection, a timeout); and a rank the agent killed
    after the fact (SIGTERM, SIGKILL) is never the cause when another one failed on its own."""
    def when(item):
        rank, failure = item
        recorded = failure.error_file_data.get("launcher", {}).get("time")
        killed = failure.exitcode in (-signal.SIGTERM, -signal.SIGKILL)
        return (recorded is None, killed, recorded or failure.timestamp, rank)

    return min(failures.items(), key=when)


def _describe(rank: int, failure, run_dir: str) -> str:
    ours = failure.error_file_data.get("launcher")
    if ours and ours["plain"]:
        return f"error: rank {rank}: {ours['text']}"
    message = failure.message
    if isinstance(message, dict):
        return f"rank {rank} failed: " + (message.get("extraInfo", {}).get("py_callstack") or message["message"])
    return f"rank {rank} failed: {message} (exit code {failure.exitcode}); its output is under {Path(run_dir) / 'logs'}"


def _bound_static_rendezvous(params):
    """torch's static rendezvous, except that its store listens on the socket `listen` bound: TCPStore
    alone would listen on every interface of the machine."""
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import create_rdzv_handler

    handler = create_rdzv_handler(params)
    handler.get_backend = lambda: RENDEZVOUS  # the agent checks that the handler answers to its own name
    fd = params.config.get("listen_fd")
    if handler.rank == 0 and fd is not None:
        handler._store = TCPStore(handler.master_addr, handler.master_port, handler.world_size, True,
                                  handler.timeout, multi_tenant=True, master_listen_fd=int(fd))
    return handler


def _register_rendezvous() -> None:
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    rendezvous_handler_registry.register(RENDEZVOUS, _bound_static_rendezvous)  # again is a no-op
