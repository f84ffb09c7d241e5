"""torch.distributed's elastic agent, configured from the plan: it starts this node's workers, restarts them after a
crash, and meets the other nodes' agents at node 0's rendezvous, on the socket node 0's launcher bound."""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import sys

from ..plan import Plan
from .ranklogs import RankLogs
from .stop import SIGNALS

RENDEZVOUS = "launcher-static"
SHUTDOWN_TIMEOUT = 120  # seconds the workers get to save a checkpoint after SIGTERM / SIGINT


def launch_config(plan: Plan, sock: socket.socket | None):
    """(torch's LaunchConfig, the rendezvous port) of this node. Node 0 hands the agent its bound socket."""
    from torch.distributed.launcher.api import LaunchConfig

    port = sock.getsockname()[1] if sock else plan.master_port
    if plan.elastic:
        from . import elastic

        backend, rendezvous = elastic.RENDEZVOUS, elastic.configs(plan)
    else:  # node 0 waits for every node; another node's attempt to reach it lasts half that (torch may try twice)
        backend, rendezvous = RENDEZVOUS, {"rank": plan.node_rank, "timeout": plan.rendezvous_timeout if sock
                                           else plan.rendezvous_timeout // 2}
    if sock:
        rendezvous["listen_fd"] = sock.detach()  # the store owns it from here
    return LaunchConfig(
        min_nodes=plan.min_nodes if plan.elastic else plan.nnodes,
        max_nodes=plan.nnodes,
        nproc_per_node=plan.nproc,
        run_id=plan.name,
        rdzv_backend=backend,
        rdzv_endpoint=f"{plan.master_addr}:{port}",
        rdzv_configs=rendezvous,
        # where an elastic job's first node tells the workers to find its store: on one machine, on loopback
        local_addr="127.0.0.1" if plan.nnodes == 1 or plan.elastic and _loopback(plan) else None,
        max_restarts=plan.max_restarts,
        monitor_interval=0.1,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        logs_specs=RankLogs(plan.run_dir),  # local rank 0 talks to this console; the others write to logs/rank-R.*
    ), port


def run(config, plan: Plan) -> None:
    """torch's agent runs the job; its failures are raised (ChildFailedError, DistError) for failures.py to tell.
    Once it returns or raises, the job has ended and a signal has nothing left to stop: srun stopping every node
    after one failed must not cut this node's report short with a traceback of torch's signal handler, still
    installed."""
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry
    from torch.distributed.launcher.api import elastic_launch

    rendezvous_handler_registry.register(RENDEZVOUS, _bound_static_rendezvous)  # again is a no-op
    for name in list(logging.root.manager.loggerDict):  # torch sets a level on each; failures are reported by us
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    script = [] if plan.script_args is None else [plan.recipe, *plan.script_args]
    # -P: the installed launcher, never a folder of that name in the working directory
    args = ["-u", "-P", "-m", "launcher.processes.script" if script else "launcher.boot", *script]
    try:
        if plan.elastic:
            from . import elastic

            elastic.launch(config, plan, args)
        else:
            elastic_launch(config, sys.executable)(*args)
    finally:
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def _loopback(plan: Plan) -> bool:
    """Whether node 0's address is this machine's loopback, so that every node runs here."""
    address = socket.getaddrinfo(plan.master_addr, None, type=socket.SOCK_STREAM)[0][4][0]
    return ipaddress.ip_address(address).is_loopback


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
