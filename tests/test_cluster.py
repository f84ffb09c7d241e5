"""Where a node stands, read in one place: the flags first, then the first environment present (PET_*, a Slurm job
step, SkyPilot), all of its values and never a mix of two (processes/cluster.py; README's table)."""

import pytest

from conftest import TINY, refused
from launcher.cli import run as cli
from launcher.processes import cluster

PET = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "10.0.0.5", "PET_MASTER_PORT": "29400",
       "PET_NPROC_PER_NODE": "2"}
SLURM = {"SLURM_STEP_ID": "0", "SLURM_NODEID": "1", "SLURM_STEP_NUM_NODES": "2", "SLURM_NNODES": "3",
         "SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "n[1-2]"}
SKYPILOT = {"SKYPILOT_NODE_RANK": "1", "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_IPS": "10.1.0.1\n10.1.0.2\n",
            "SKYPILOT_NUM_GPUS_PER_NODE": "0"}
PET_SAYS = "torchrun's and Kubeflow's PET_* variables"
KEYS = ("nnodes", "node_rank", "master_addr", "master_port", "nproc", "placed_by")


def plan_in(monkeypatch, tmp_path, env: dict, *flags):
    for name in [*PET, *SLURM, *SKYPILOT]:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: Slurm's first host is not looked up
    plan = cli.parse([str(TINY), "--cpu", "--run-dir", str(tmp_path / "run"), *flags])[0]
    return tuple(getattr(plan, key) for key in KEYS)


@pytest.mark.parametrize("env,flags,expected", [
    ({}, [], (1, 0, "127.0.0.1", 0, 1, None)),
    (PET, [], (2, 1, "10.0.0.5", 29400, 2, "torchrun's and Kubeflow's PET_* variables")),
    # a flag wins over its variable; the others still come from the environment
    (PET, ["--node-rank", "0", "--master-addr", "127.0.0.1", "--procs", "1"],
     (2, 0, "127.0.0.1", 29400, 1, "torchrun's and Kubeflow's PET_* variables")),
    (SLURM, ["--master-addr", "n1"], (2, 1, "n1", 21234, 1, cluster.SLURM)),
    ({**SLURM, "SLURM_STEP_NUM_NODES": "1", "SLURM_NODEID": "0"}, [], (1, 0, "127.0.0.1", 0, 1, None)),
    (SKYPILOT, [], (2, 1, "10.1.0.1", 29500, 1, "SkyPilot's SKYPILOT_* variables")),
    # the first environment present says all: PET_* over Slurm's step over SkyPilot's
    ({**SKYPILOT, **SLURM, **PET}, [], (2, 1, "10.0.0.5", 29400, 2, "torchrun's and Kubeflow's PET_* variables")),
    ({**SKYPILOT, **SLURM}, ["--master-addr", "n1"], (2, 1, "n1", 21234, 1, cluster.SLURM)),
    ({**PET, "PET_NNODES": "1", "PET_NODE_RANK": "0"}, [], (1, 0, "10.0.0.5", 29400, 2, None)),
    # Kubeflow's auto (a node with GPUs): one process per GPU, of which there are none here
    ({**PET, "PET_NPROC_PER_NODE": "auto"}, [], (2, 1, "10.0.0.5", 29400, 1, PET_SAYS)),
], ids=["none", "pet", "flags-first", "slurm-step", "slurm-one-node", "skypilot", "pet-first", "slurm-before-sky",
        "pet-one-node", "pet-auto"])
def test_where_a_node_stands(env, flags, expected, monkeypatch, tmp_path):
    assert plan_in(monkeypatch, tmp_path, env, *flags) == expected


def test_submitting_a_slurm_job_reads_no_environment(monkeypatch, tmp_path):
    """--slurm submits from wherever it is run, an allocation or a pod included: the job's nodes set their own."""
    assert plan_in(monkeypatch, tmp_path, PET, "--slurm")[:4] == (1, 0, "127.0.0.1", 0)


@pytest.mark.parametrize("env,message", [
    ({**PET, "PET_NODE_RANK": "one"}, "PET_NODE_RANK=one is not a whole number (read from torchrun's and Kubeflow's "
                                      "PET_* variables, for what the flags leave out)"),
    ({**PET, "PET_NNODES": "0"}, "PET_NNODES=0 is not a whole number of at least 1"),
    ({**PET, "PET_NNODES": "1:2"}, "PET_NNODES=1:2 asks for an elastic node count, which the launcher does not take "
                                   "from the environment: give it as flags, --nodes MIN:MAX and each node's "
                                   "--node-rank"),
    ({**SKYPILOT, "SKYPILOT_NODE_RANK": "2"}, "--node-rank 2 must be below --nodes 2"),
    ({**SLURM}, "--nodes 2 needs --master-addr"),  # no scontrol to name the step's first host
], ids=["rank", "nodes", "range", "rank-too-high", "no-address"])
def test_a_bad_environment_is_one_line_and_exit_2(env, message, monkeypatch, tmp_path, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert message in refused(capsys, TINY, "--cpu", "--run-dir", tmp_path / "run")
