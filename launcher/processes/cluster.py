"""Where this node stands in a job, read in one place: the launcher's flags first; for what they leave out, the
environment of the first of these that started the process: torchrun's and Kubeflow Trainer's (PET_*), a Slurm
job step's, SkyPilot's. One environment supplies all it says, never a mix of two: README's table."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import UsageError

DEFAULT_PORT = 29500  # torchrun's, where an environment names node 0 but no port
SLURM = "the Slurm job step's variables"


@dataclass(frozen=True)
class Place:
    """What an environment says of this node; None where it says nothing."""

    source: str  # the environment, as the console names it
    nodes: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    per_node: int | str | None = None  # processes on each node; "auto" or "gpu": one per GPU


def environment(env: Mapping[str, str]) -> Place | None:
    """The place the first environment present gives (see the module's note), or None outside any."""
    for read in (_torchrun, _slurm, _skypilot):
        place = read(env)
        if place is not None:
            return place
    return None


def _torchrun(env: Mapping[str, str]) -> Place | None:
    """torchrun's variables, which Kubeflow Trainer's torch runtime sets in every pod."""
    if not any(name in env for name in ("PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR")):
        return None
    source = "torchrun's and Kubeflow's PET_* variables"
    nodes = env.get("PET_NNODES")
    if nodes is not None and ":" in nodes:
        raise UsageError(f"PET_NNODES={nodes} asks for an elastic node count, which the launcher does not take from "
                         "the environment: give it as flags, --nodes MIN:MAX and each node's --node-rank")
    per_node = env.get("PET_NPROC_PER_NODE", "")
    return Place(source, _number(env, "PET_NNODES", source, low=1), _number(env, "PET_NODE_RANK", source),
                 env.get("PET_MASTER_ADDR") or None, _number(env, "PET_MASTER_PORT", source, low=1),
                 # auto (Kubeflow's with GPUs) or gpu: every GPU; cpu: what --procs says
                 per_node if per_node in ("auto", "gpu") else _number(env, "PET_NPROC_PER_NODE", source, low=1)
                 if per_node != "cpu" else None)


def _slurm(env: Mapping[str, str]) -> Place | None:
    """A Slurm job step (srun): its nodes, this task's node, and node 0 as the step's first host. The batch script
    itself (no step yet) and a launcher that submits one (--slurm) are not inside one."""
    if "SLURM_STEP_ID" not in env or "SLURM_NODEID" not in env:
        return None
    source = SLURM
    nodes = _number(env, "SLURM_STEP_NUM_NODES", source, low=1) or _number(env, "SLURM_NNODES", source, low=1)
    job, rank = _number(env, "SLURM_JOB_ID", source), _number(env, "SLURM_NODEID", source)
    if (nodes or 1) == 1:  # one node: its rendezvous on loopback, any free port
        return Place(source, nodes, rank)
    return Place(source, nodes, rank, _first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")),
                 20000 + job % 20000 if job is not None else None)  # the batch script's choice, slurm/launch.sbatch


def _skypilot(env: Mapping[str, str]) -> Place | None:
    if "SKYPILOT_NODE_RANK" not in env:
        return None
    source = "SkyPilot's SKYPILOT_* variables"
    ips = env.get("SKYPILOT_NODE_IPS", "").split()
    gpus = _number(env, "SKYPILOT_NUM_GPUS_PER_NODE", source)
    return Place(source, _number(env, "SKYPILOT_NUM_NODES", source, low=1), _number(env, "SKYPILOT_NODE_RANK", source),
                 ips[0] if ips else None, None, gpus or None)


def _number(env: Mapping[str, str], name: str, source: str, low: int = 0) -> int | None:
    text = env.get(name)
    if text is None or text == "":
        return None
    if not text.strip().isdigit() or int(text) < low:
        raise UsageError(f"{name}={text} is not a whole number{f' of at least {low}' if low else ''} (read from "
                         f"{source}, for what the flags leave out)")
    return int(text)


def _first_host(nodelist: str | None) -> str | None:
    """The address of the first host of a Slurm node list (node[01-04],gpu7) as the other nodes reach it, its
    NodeAddr, as slurm/launch.sbatch finds it; None without scontrol."""
    if not nodelist or not shutil.which("scontrol"):
        return None
    hosts = _scontrol("show", "hostnames", nodelist).split()
    if not hosts:
        return None
    found = re.search(r"NodeAddr=(\S+)", _scontrol("show", "node", hosts[0]))
    return found.group(1) if found else hosts[0]


def _scontrol(*args: str) -> str:
    try:
        done = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""
