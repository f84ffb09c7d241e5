"""Where the processes run: in this process, or this node's processes under torch.distributed's elastic agent
(agent.py), in the environment env.py gives them; how the job ended, in one line (failures.py tells a failed one)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from torch.distributed.elastic.multiprocessing import SignalException

from ..errors import PLAIN, RecipeError, Stopped
from ..plan import Plan
from ..runs import checkpoint
from ..runs.files import detach_terminal, publish_record, read_summary, update_summary
from ..text import count, first_line
from .collector import settle
from .stop import SIGNALS


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
    from ..runs import pictures

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
    from torch.distributed.elastic.rendezvous import RendezvousError

    from . import agent, env, failures, flight, hang

    os.environ.update(env.worker_env(plan, os.environ, os.getpid(), env.cores(), env.loopback()))
    flight.prepare(os.environ)
    started = time.time()
    config, port = agent.launch_config(plan, sock)
    nodes = f"{plan.min_nodes}–{plan.nnodes} (elastic)" if plan.elastic else plan.nnodes
    print(f"launch: {count(plan.nproc, 'process')}"
          f"{f' on node {plan.node_rank} of {nodes}' if plan.nnodes > 1 else ''}"
          f"{f' (as {plan.placed_by} say)' if plan.placed_by else ''}, rendezvous on "
          f"{plan.master_addr}:{port}{f', up to {plan.max_restarts} restarts' if plan.max_restarts else ''}",
          flush=True)
    settle()  # this process's set-up is done: from here it supervises
    try:
        agent.run(config, plan)
    except ChildFailedError as e:
        text, reason, code = failures.told(e, plan)
        dumped = flight.dumped(os.environ, started, plan.world_size)  # NCCL's watchdog ended a rank on a timeout
        stacks = hang.silent(plan.run_dir, plan.world_size, plan.timeout) if dumped else ""
        _failed(plan, text + dumped + (f"; {stacks}" if stacks else ""), reason)
        return code
    except (DistError, RendezvousError) as e:  # the agents' rendezvous: nodes that never came, node 0 out of reach
        if plan.elastic:
            _failed(plan, f"error: the nodes did not meet at {plan.master_addr}:{port} within "
                          f"{plan.rendezvous_timeout} s, {plan.min_nodes} at least "
                          f"({first_line(e) or type(e).__name__}): the job stops; the newest checkpoint stays, and "
                          f"--resume auto --run-dir {plan.run_dir} goes on from it once the nodes are back")
        else:
            _failed(plan, f"error: the {plan.nnodes} nodes did not meet at {plan.master_addr}:{port} "
                          f"({first_line(e)}); start every node with the same --nodes, --master-addr and "
                          "--master-port")
        return 1
    return 0
