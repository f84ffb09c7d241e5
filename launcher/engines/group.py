"""The process group and the Accelerator of one worker, exactly as planned or not at all."""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from ..plan import Plan, attempt


def accelerator(plan: Plan):
    """The Accelerator the plan asks for; fails loudly rather than run something else."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    guard(int(os.environ.get("WORLD_SIZE", "1")), plan)
    if plan.world_size > 1 or plan.engine != "ddp":  # sharding needs a process group, even of one
        join(plan)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=plan.find_unused_parameters)
    acc = Accelerator(cpu=plan.device == "cpu", kwargs_handlers=[ddp])  # precision is the launcher's: see autocast()
    guard(acc.num_processes, plan)
    if acc.device.type != plan.device:
        raise RuntimeError(f"planned device {plan.device} but Accelerate chose {acc.device}")
    return acc


def attempt_store(world_size: int, timeout: timedelta):
    """A client of the launcher's store whose keys are this restart attempt's own, which env:// does not give: a
    restarted worker reading the attempt before's would look for the address of a dead process and hang. Where the
    agents share no store (an elastic job's: processes/elastic.py), rank 0 hosts a new one, as env:// does."""
    env = os.environ
    host = env.get("TORCHELASTIC_USE_AGENT_STORE") == "False" and env.get("RANK") == "0"
    store = torch.distributed.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size, is_master=host,
                                       timeout=timeout)
    return torch.distributed.PrefixStore(f"launcher/attempt-{attempt()}", store)


def join(plan: Plan) -> None:
    """Join the process group (Accelerate then finds it ready), with two things env:// does not give:
    keys of its own for every restart attempt, and the plan's timeout for a collective waiting on a silent rank."""
    env = os.environ
    if "MASTER_ADDR" in env:
        store = attempt_store(plan.world_size, timedelta(seconds=plan.timeout))
    else:  # one process, inside launch itself
        store = torch.distributed.HashStore()
    if plan.device == "cuda":
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("gloo" if plan.device == "cpu" else "nccl", store=store,
                                         rank=int(env.get("RANK", "0")), world_size=plan.world_size,
                                         timeout=timedelta(seconds=plan.timeout))


def step_timeout(plan: Plan) -> None:
    """After the first step (compiling, a resume's loads, the first allocations: --timeout), the training group's
    collectives wait --step-timeout, as torchtitan shortens them: a rank that hangs later is found sooner. Each
    rank switches on its own; one that has not yet keeps the longer wait."""
    if plan.step_timeout != plan.timeout and torch.distributed.is_initialized():
        torch.distributed.distributed_c10d._set_pg_timeout(timedelta(seconds=plan.step_timeout))


def guard(seen: int, plan: Plan) -> None:
    """A worker that sees another world than planned would train a separate model, silently: stop it."""
    if seen != plan.world_size:
        raise RuntimeError(
            f"this process sees a world of {seen} process(es) but the plan has {plan.world_size}: "
            "it would train a separate model instead of joining the job (were RANK/WORLD_SIZE/LOCAL_RANK lost?)"
        )
