"""--nodes MIN:MAX: a job that trains on when a node leaves and takes nodes back when they come. torch's elastic agent
meets the others at a c10d rendezvous whose store node 0's launcher hosts on its bound socket; after each meeting
every start resumes from the run's newest checkpoint (train/checkpointer.py) and splits the same global batch over
the world it finds (Plan.resized). A restart after which a node is gone is a change of membership, not a failure:
--max-restarts counts the others, as torchrun does."""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta

from torch.distributed import TCPStore
from torch.distributed.elastic.agent.server.api import WorkerSpec, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous import RendezvousClosedError, RendezvousParameters
from torch.distributed.elastic.rendezvous import rendezvous_handler_registry as registry
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

from ..plan import ATTEMPT_ENV, Plan
from ..runs import checkpoint
from ..text import count

RENDEZVOUS = "launcher-elastic"
ATTEMPTS = "launcher/attempts"  # the job's count of starts, in the rendezvous store every node reaches
HEARTBEAT, MISSED = 2, 3  # a node silent for 3 heartbeats 2 s apart has left


def configs(plan: Plan) -> dict:
    """The rendezvous's timing: MIN nodes meet within --rendezvous-timeout (more by the time a node that left takes
    to be found gone), and once they have, the rest get half of it more to come."""
    return {"join_timeout": plan.rendezvous_timeout + HEARTBEAT * MISSED,
            "last_call_timeout": plan.rendezvous_timeout // 2,
            "keep_alive_interval": HEARTBEAT, "keep_alive_max_attempt": MISSED}


def launch(config, plan: Plan, args: list[str]) -> None:
    """torch's launch_agent with the launcher's agent: the same spec from the same LaunchConfig, its failures raised
    as ChildFailedError; the rendezvous is closed at the end unless a signal ended this node (the others go on)."""
    registry.register(RENDEZVOUS, _bound_rendezvous)  # again is a no-op
    # every meeting gives the workers a store of their own on its first node: torch's shared one is announced once,
    # and a node that joins later waits for that announcement in its own meeting for ever
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    params = RendezvousParameters(backend=config.rdzv_backend, endpoint=config.rdzv_endpoint, run_id=config.run_id,
                                  min_nodes=config.min_nodes, max_nodes=config.max_nodes,
                                  local_addr=config.local_addr, **config.rdzv_configs)
    spec = WorkerSpec(role="default", local_world_size=config.nproc_per_node, entrypoint=sys.executable,
                      args=tuple(args), rdzv_handler=registry.create_handler(params),
                      max_restarts=config.max_restarts, monitor_interval=config.monitor_interval,
                      local_addr=config.local_addr)
    agent = Agent(plan, spec=spec, logs_specs=config.logs_specs, start_method=config.start_method,
                  shutdown_timeout=config.shutdown_timeout)
    close = True
    try:
        result = agent.run()
        if result is None:  # it waited beyond the most nodes the job takes, and the job ended
            print(f"launch: the job ended while node {plan.node_rank} waited to join it", flush=True)
        elif result.is_failed():
            raise ChildFailedError(name=f"{plan.name} (node {plan.node_rank})", failures=result.failures)
    except SignalException:
        close = False
        raise
    finally:
        if close:
            spec.rdzv_handler.shutdown()


class Agent(LocalElasticAgent):
    """torch's agent, which restarts its workers after a failure while restarts are left (or at once when a node
    waits to join), with restarts counted by what the next meeting shows: a failure is free where a node has left
    since (its ranks' peers failed for want of it), and a node that comes or goes is said in one line."""

    def __init__(self, plan: Plan, **kwargs):
        super().__init__(**kwargs)
        self.plan, self.members, self.failed = plan, [], None

    def _monitor_workers(self, worker_group):
        result = super()._monitor_workers(worker_group)
        if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY):
            self.failed = result.failures
            self._remaining_restarts += 1  # the restart the agent takes now, charged once its meeting is known
        return result

    def _rendezvous(self, worker_group) -> None:
        failed, self.failed = self.failed, None
        try:
            super()._rendezvous(worker_group)
        except RendezvousClosedError:  # a node out of restarts ended the job: its output tells why
            if failed is None:
                raise
            raise ChildFailedError(name=self.plan.name, failures=failed) from None
        store, rank, size = worker_group.store, worker_group.group_rank, worker_group.group_world_size
        store.set(f"launcher/node/{rank}", f"node {self.plan.node_rank} ({socket.gethostname()})")
        members = [store.get(f"launcher/node/{r}").decode() for r in range(size)]
        if rank == 0:
            store.set("launcher/attempt", str(store.underlying_store.add(ATTEMPTS, 1) - 1))
        os.environ[ATTEMPT_ENV] = store.get("launcher/attempt").decode()  # the workers inherit it
        left = [m for m in self.members if m not in members]
        if failed is not None and not left:
            self._remaining_restarts -= 1
            if self._remaining_restarts < 0:
                raise ChildFailedError(name=self.plan.name, failures=failed)
        if self.members and members != self.members:
            print(f"launch: {_change(self.members, members, failed)}: {_going_on(self.plan, size)}", flush=True)
        self.members = members


def _change(before: list[str], now: list[str], failed: dict | None) -> str:
    """Who left at which step, and who came."""
    left, came = [m for m in before if m not in now], [m for m in now if m not in before]
    steps = [f.error_file_data.get("launcher", {}).get("step") for f in (failed or {}).values()]
    step = max((s for s in steps if s is not None), default=None)
    said = [f"{' and '.join(left)} left{f' at step {step}' if step else ''}"] if left else []
    return ", ".join(said + ([f"{' and '.join(came)} joined"] if came else []))


def _going_on(plan: Plan, nodes: int) -> str:
    newest = checkpoint.step_dirs(plan.run_dir)
    where = f"from {newest[0].name}" if newest else "from the start"
    return (f"training goes on on {count(nodes, 'node')} (of {plan.min_nodes}–{plan.nnodes}) {where}, the global "
            f"batch {plan.resized(nodes * plan.nproc).split()}")


def _bound_rendezvous(params):
    """torch's c10d rendezvous on a store of the launcher's: node 0's listens on the socket `listen` bound (TCPStore
    alone would listen on every interface), the others reach it there."""
    host, port = params.endpoint.rsplit(":", 1)
    fd = params.config.get("listen_fd")
    store = TCPStore(host, int(port), is_master=fd is not None, multi_tenant=True, wait_for_workers=False,
                     timeout=timedelta(seconds=params.get_as_int("join_timeout")),
                     master_listen_fd=int(fd) if fd is not None else None)
    handler = create_handler(store, C10dRendezvousBackend(store, params.run_id), params)
    handler.get_backend = lambda: RENDEZVOUS  # the registry checks that the handler answers to its own name
    return handler

