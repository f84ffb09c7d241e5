"""Where the processes run: in this process, or this node's processes under torch.distributed's elastic agent."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from torch.distributed.elastic.multiprocessing import SignalException

from . import checkpoint
from .collector import settle
from .errors import PLAIN, RecipeError, Stopped
from .plan import PARENT_ENV, PLAN_ENV, Plan
from .runfiles import detach_terminal, publish_record, read_summary, update_summary
from .stop import SIGNALS
from .text import count, first_line

RENDEZVOUS = "launcher-static"
PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # --precision as Accelerate's mixed precision
SHUTDOWN_TIMEOUT = 120  # seconds the workers get to save a checkpoint after SIGTERM / SIGINT
# the agent SIGKILLs a rank 30 s after it SIGTERMed it: a SIGKILL sooner after the first failure came from outside
OUTSIDE_KILL = 10


def in_process(plan: Plan) -> bool:
    """One process runs right here (a debugger works) unless it may need restarting: that takes the agent."""
    return plan.world_size == 1 and plan.max_restarts == 0 and plan.script_args is None


def rendezvous_socket(plan: Plan) -> socket.socket | None:
    """Node 0 binds the rendezvous socket before anything starts, so a taken port or a foreign address is
    a usage error; one node listens on loopback and any free port."""
    if in_process(plan) or plan.node_rank != 0:
        return None
    return listen(plan.master_addr, plan.master_port)


class Interrupted(BaseException):
    """A stop signal outside the training loop. Like KeyboardInterrupt it is no Exception, so that no `except
    Exception` on its way (around a recipe's import, say) takes it for a failure."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.sigval = signal.Signals(signum)


def launch(plan: Plan, sock: socket.socket | None, banner: str) -> int:
    """Print the banner and run the plan; return the exit code. A stop signal ends the run with one line saying
    which checkpoint there is: the training loop saves one first (see stop.py); anywhere else (start-up, the
    final evaluation) the signal ends it at once, in this process through this handler, in the workers by their
    default action (torch's agent takes this process's signals over once they start, raising its own
    SignalException)."""
    def stop(signum, frame):
        raise Interrupted(signum)

    started = time.time()
    try:  # a signal may come as soon as its handler is set, while the banner prints
        for s in SIGNALS:
            signal.signal(s, stop)
        print(banner, flush=True)
        code = _in_process(plan) if in_process(plan) else _local_group(plan, sock)
    except (Interrupted, SignalException) as e:
        _stopped(plan, e.sigval, started)
        return 128 + e.sigval
    except Exception as e:  # its traceback follows
        _ended(plan, "failed", f"{type(e).__name__}: {first_line(e)}")
        raise
    if code == 0:
        _ended(plan, "completed")
    return code


def _ended(plan: Plan, state: str, reason: str | None = None) -> None:
    """How the job ended, in the run's summary.json: node 0's launcher alone writes it. A job that did not complete
    gets its pictures here where rank zero could not draw them (the launcher stopped it at another rank's failure)."""
    if plan.node_rank == 0:
        update_summary(plan.run_dir, state=state, reason=reason, eta_s=None)
        if state == "completed" and plan.script_args is not None:  # a script's start counts once it has run through
            publish_record(plan.run_dir)
        if state != "completed" and plan.pictures:
            _draw(Path(plan.run_dir), plan.name)


def _draw(run_dir: Path, title: str) -> None:
    curves, records = run_dir / "pictures" / "curves.png", run_dir / "metrics.jsonl"
    if not records.exists() or curves.exists() and curves.stat().st_mtime >= records.stat().st_mtime:
        return
    from . import pictures

    try:  # a record, which never changes how the run ended, nor hides why
        pictures.draw_run(run_dir, read_summary(str(run_dir)).get("best"), title)
    except Exception:
        pass


def _failed(plan: Plan, text: str, reason: str | None = None) -> None:
    """Why the job failed, once: on the console (with a traceback, where one tells), and in the summary in one
    line (the text's own, unless a shorter `reason` is given)."""
    print(f"launch: {text}", file=sys.stderr, flush=True)
    _ended(plan, "failed", reason or text.removeprefix("error: "))


def _in_process(plan: Plan) -> int:
    from . import worker

    try:
        worker.run(plan)
    except Stopped as stopped:
        raise Interrupted(stopped.signum) from None
    except Exception as e:
        known = worker.explain(e, plan)
        if not isinstance(known, PLAIN):
            raise
        _failed(plan, f"error: {known}")
        return 2 if isinstance(known, RecipeError) else 1
    return 0


def _stopped(plan: Plan, signum: int, started: float) -> None:
    """The last line of a stopped run: the checkpoint saved at the stop (rank zero records it), or else the
    newest one there is, said to be older: a signal during start-up or the final evaluation saves nothing."""
    name, resume = signal.Signals(signum).name, f"--resume auto --run-dir {plan.run_dir}"
    if signum == signal.SIGHUP:
        detach_terminal()
    if plan.script_args is not None:  # what it saved is the script's business
        where = f"{Path(plan.recipe).name} was sent it in each process (a handler of its own saves what it saves)"
        print(f"launch: stopped by {name}: {where}", file=sys.stderr, flush=True)
        _ended(plan, "stopped", f"stopped by {name}: {where}")
        return
    metrics = Path(plan.run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    stop = next((r for r in reversed(records) if r.get("event") == "stopped" and r["time"] >= started), None)
    found = checkpoint.step_dirs(plan.run_dir)
    if stop:
        where = f"at step {stop['step']}: saved checkpoint {stop['checkpoint']}; continue with {resume}"
    elif found:
        where = f"with no checkpoint saved at the stop; the newest is {found[0]}: {resume} continues from there"
    else:
        where = "with no checkpoint saved at the stop, and there is none"
    print(f"launch: stopped by {name} {where}", file=sys.stderr, flush=True)
    _ended(plan, "stopped", f"stopped by {name} {where}")


def listen(host: str, port: int) -> socket.socket:
    """The rendezvous socket, bound here: on `host`'s address alone, and the port is ours from now on."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    # a requeued job binds its port again while the last run's connections linger in TIME_WAIT; a port
    # somebody listens on is still refused
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen()
    except OSError:
        sock.close()
        raise
    return sock


def _local_group(plan: Plan, sock: socket.socket | None) -> int:
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .ranklogs import RankLogs

    _register_rendezvous()
    for name in list(logging.root.manager.loggerDict):  # torch sets a level on each; failures are reported below
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[PLAN_ENV] = plan.to_json()
    os.environ[PARENT_ENV] = str(os.getpid())
    # N processes share the cores this task was given (a Slurm allocation, taskset), not the machine's
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores() // plan.nproc)))
    single = plan.nnodes == 1
    if single:  # the ranks talk over loopback, and nothing of the job listens on another interface
        loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
        if loopback:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback)
    port = sock.getsockname()[1] if sock else plan.master_port
    # node 0 waits for every node; another node's attempt to reach it lasts half that (torch may try twice)
    rendezvous = {"rank": plan.node_rank, "timeout": plan.rendezvous_timeout if sock else plan.rendezvous_timeout // 2}
    if sock:
        rendezvous["listen_fd"] = sock.detach()  # the store owns it from here
    config = LaunchConfig(
        min_nodes=plan.nnodes,
        max_nodes=plan.nnodes,
        nproc_per_node=plan.nproc,
        run_id=plan.name,
        rdzv_backend=RENDEZVOUS,
        rdzv_endpoint=f"{plan.master_addr}:{port}",
        rdzv_configs=rendezvous,
        local_addr="127.0.0.1" if single else None,
        max_restarts=plan.max_restarts,
        monitor_interval=0.1,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        logs_specs=RankLogs(plan.run_dir),  # local rank 0 talks to this console; the others write to logs/rank-R.*
    )
    if plan.script_args is not None:  # what `accelerate launch` gives, for an unmodified Accelerator() to read
        os.environ.update(ACCELERATE_USE_CPU=str(plan.device == "cpu"), ACCELERATE_MIXED_PRECISION=PRECISION[
            plan.precision], ACCELERATE_GRADIENT_ACCUMULATION_STEPS=str(plan.grad_accum),
            ACCELERATE_DYNAMO_BACKEND="INDUCTOR" if plan.compile else "NO")
    print(f"launch: {count(plan.nproc, 'process')}"
          f"{f' on node {plan.node_rank} of {plan.nnodes}' if not single else ''}, rendezvous on "
          f"{plan.master_addr}:{port}{f', up to {plan.max_restarts} restarts' if plan.max_restarts else ''}",
          flush=True)
    settle()  # this process's set-up is done: from here it supervises
    try:
        # -P: the installed launcher, never a folder of that name in the working directory
        _agent(elastic_launch(config, sys.executable), plan)
    except ChildFailedError as e:
        rank, failure = root_cause(e.failures)
        text = _describe(rank, failure, plan)
        # a traceback: the summary's one line is the exception's
        _failed(plan, text, f"rank {rank} failed: {first_line(failure.message['message'])}" if "\n" in text else None)
        return 2 if failure.error_file_data.get("launcher", {}).get("usage") else 1
    except DistError as e:  # the agents' rendezvous: a node that never came, or node 0 out of reach
        _failed(plan, f"error: the {plan.nnodes} nodes did not meet at {plan.master_addr}:{port} ({first_line(e)}); "
                      "start every node with the same --nodes, --master-addr and --master-port")
        return 1
    return 0


def _agent(launch, plan: Plan) -> None:
    """torch's agent runs the job. Once it returns or raises, the job has ended and a signal has nothing left to
    stop: srun stopping every node after one failed must not cut this node's report short with a traceback of torch's
    signal handler, still installed."""
    script = [] if plan.script_args is None else [plan.recipe, *plan.script_args]
    try:
        launch("-u", "-P", "-m", "launcher.script" if script else "launcher.boot", *script)
    finally:
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def cores() -> int:
    """The CPUs this process may run on: Slurm's CPUs per task where it says, else the affinity mask."""
    given = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(given) if given.isdigit() else len(os.sched_getaffinity(0))


def root_cause(failures: dict) -> tuple:
    """(rank, failure) that caused the others. The agent lists failures in the order it found them, then stops
    the other ranks itself: SIGTERM, and SIGKILL after a grace period of 30 s. So a rank that died of SIGTERM is
    a consequence, as is one killed long after the first failure, and so is a rank whose own error says that a
    peer went away (a closed connection, a timed-out collective). Among the rest, the earliest: by the time the
    worker recorded, where it wrote a record, else when the agent found it; then in the agent's order."""
    def time_of(failure) -> float:
        return failure.error_file_data.get("launcher", {}).get("time", failure.timestamp)

    first = min(time_of(f) for f in failures.values())

    def key(item):
        position, (rank, failure) = item
        agent = failure.exitcode == -signal.SIGTERM or (failure.exitcode == -signal.SIGKILL
                                                        and time_of(failure) > first + OUTSIDE_KILL)
        peer = failure.error_file_data.get("launcher", {}).get("peer", False)
        return agent, peer, time_of(failure), position

    return min(enumerate(failures.items()), key=key)[1]


def _describe(rank: int, failure, plan: Plan) -> str:
    ours = failure.error_file_data.get("launcher")
    if ours and ours.get("usage"):  # the recipe breaks the contract: the same on every rank
        return f"error: {ours['text']}"
    if ours and ours["plain"]:
        return f"error: rank {rank}: {ours['text']}"
    if ours and ours.get("peer"):  # every failure here follows another's: on another node, which tells the cause
        return (f"rank {rank} lost another rank ({first_line(ours['text'])}); the cause is in that "
                "rank's output")
    message = failure.message
    if isinstance(message, dict):
        return f"rank {rank} failed: " + (message.get("extraInfo", {}).get("py_callstack") or message["message"])
    how = (f"was killed by {failure.signal_name()} (out of memory, or killed from outside?)" if failure.exitcode < 0
           else f"exited with code {failure.exitcode} without a traceback")
    if failure.local_rank == 0:  # its node's launcher printed its output
        return f"rank {rank} {how}; its output is above"
    from .ranklogs import files

    out, err, _ = files(plan.run_dir, rank, plan.max_restarts)  # the job fails once every restart has been used
    return f"rank {rank} {how}; its output is in {err} and {out.name}"


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
