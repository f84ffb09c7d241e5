"""Two "nodes" on this machine: two launcher processes meeting over loopback, as two machines would."""

import signal
import socket
import subprocess
import time
import uuid

import pytest
import torch

from conftest import LAUNCH, TAG, TINY, clean_env, params, records, refused, summary, tagged
from launcher.plan import Plan


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(rank: int, port: int, run_dir, *flags, nodes="2", procs="2", tag="") -> subprocess.Popen:
    return subprocess.Popen(
        [str(LAUNCH), str(TINY), "--cpu", "--procs", procs, "--nodes", nodes, "--node-rank", str(rank),
         "--master-addr", "127.0.0.1", "--master-port", str(port), "--run-dir", str(run_dir), *map(str, flags)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(**{TAG: tag}))


def test_two_nodes_train_one_model_with_one_wandb_run(tmp_path):
    port, run_dir = free_port(), tmp_path / "run"
    flags = ("--wandb", "offline", "--dump-dir", tmp_path, "--max-steps", "12", "--noise", "0.1")
    nodes = [node(rank, port, run_dir, *flags) for rank in (1, 0)]  # the order they start in does not matter
    for process in nodes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, out + err
    final = [params(tmp_path, rank) for rank in range(4)]
    for rank in range(1, 4):
        for k in final[0]:
            assert torch.equal(final[rank][k], final[0][k]), (rank, k)
    assert not torch.equal(final[0]["0.weight"], params(tmp_path, 0, "init")["0.weight"])
    assert len(list(tmp_path.rglob("offline-run-*"))) == 1
    assert max(r["step"] for r in records(run_dir)) == 12
    # the ranks that print to no console (local rank 0 of each node does), in one folder whatever their node
    assert sorted(p.name for p in (run_dir / "logs").glob("rank-*")) == ["rank-1.err", "rank-1.out", "rank-3.err",
                                                                         "rank-3.out"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best", "step-00000012"]


@pytest.mark.parametrize("rank,reason,least", [(0, "1/2 clients joined", 8), (1, "while trying to connect", 4)])
def test_a_node_that_never_meets_the_others_fails_after_the_rendezvous_timeout(tmp_path, rank, reason, least):
    """Node 0 waits --rendezvous-timeout for the others; another node tries to reach node 0 for half of it, once
    or twice (60 s by default: README's figures; 8 s here)."""
    start = time.monotonic()
    alone = node(rank, free_port(), tmp_path / "run", "--wandb", "disabled", "--rendezvous-timeout", "8")
    out, err = alone.communicate(timeout=120)
    assert alone.returncode == 1
    assert "launch: error: the 2 nodes did not meet at 127.0.0.1:" in err and reason in err
    assert least < time.monotonic() - start < 40


def test_a_taken_port_is_refused_before_anything_starts(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = refused(capsys, TINY, "--cpu", "--nodes", "2", "--master-addr", "127.0.0.1", "--master-port", port,
                      "--run-dir", tmp_path / "run")
    assert err == (f"launch: error: cannot host the rendezvous on 127.0.0.1:{port} (Address already in use): the "
                   "port is in use (another job?); choose another --master-port")
    assert not (tmp_path / "run").exists()


def test_node_0_must_run_where_master_addr_points(tmp_path, capsys):
    err = refused(capsys, TINY, "--cpu", "--nodes", "2", "--master-addr", "192.0.2.1", "--run-dir", tmp_path / "run")
    assert "that is not an address of this machine; run node 0 on --master-addr" in err


@pytest.mark.slow
def test_a_four_rank_job_resumes_bit_for_bit(tmp_path):
    """With 3+ ranks the order of a gradient all-reduce decides the last bits; a resumed run must reduce in
    the layout the stopped one had (DDP rebuilds its buckets after the first backward)."""
    common = ("--wandb", "disabled", "--max-steps", "24", "--noise", "0.1", "--save-every", "8")

    def job(name, *flags):
        port, dump = free_port(), tmp_path / name
        dump.mkdir(exist_ok=True)
        nodes = [node(rank, port, dump / "run", *common, "--dump-dir", dump, *flags) for rank in (1, 0)]
        return [p.communicate(timeout=300) and p.returncode for p in nodes]

    assert job("straight") == [0, 0]
    assert 1 in job("crashed", "--crash-at", "9", "--crash-rank", "3")
    assert job("crashed", "--crash-at", "9", "--crash-rank", "3", "--resume", "auto") == [0, 0]
    for rank in range(4):
        final, straight = params(tmp_path / "crashed", rank), params(tmp_path / "straight", 0)
        for k in final:
            assert torch.equal(final[k], straight[k]), (rank, k)


@pytest.mark.parametrize("world,accum,micro", [(4, 1, 12), (3, 2, 8), (2, 2, 12), (1, 4, 12)])
def test_an_elastic_plan_keeps_its_global_batch_in_micro_batches_no_larger(world, accum, micro):
    """48 samples planned as 4 nodes × 1 process × 12; on fewer, each process takes its share in the largest
    micro-batch up to 12 that divides it."""
    plan = Plan(recipe="r.py", hparams={"batch_size": 48}, run_dir="run", name="run", nnodes=4, min_nodes=1)
    resized = plan.resized(world)
    assert (resized.world_size, resized.grad_accum, resized.micro_batch) == (world, accum, micro)
    assert resized.batch_size == 48 and resized.min_nodes == 1


def parent(pid: int) -> int | None:
    try:
        return int(open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[1])
    except OSError:
        return None


def wait_until(what, timeout: float = 120, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"waited {timeout} s"
        time.sleep(every)


def test_an_elastic_job_trains_on_when_a_node_is_lost_and_takes_it_back(tmp_path):
    """--nodes 1:2, a process on each node. kill -9 of node 1's launcher: its worker dies with it, node 0 says which
    node left at which step and how the batch is split now, and trains on alone from the newest checkpoint; node 1
    started again joins at once (node 0's workers save and restart); the run ends at its planned last step, both
    ranks with the same model, nothing left running, no restart counted (--max-restarts is 0)."""
    port, run_dir, tag = free_port(), tmp_path / "run", uuid.uuid4().hex
    flags = ("--wandb", "disabled", "--dump-dir", tmp_path, "--max-steps", "70", "--n-train", "320", "--slow",
             "0.15", "--save-every", "5", "--rendezvous-timeout", "8", "--no-health", "--no-pictures")
    first = node(0, port, run_dir, *flags, nodes="1:2", procs="1", tag=tag)
    second = node(1, port, run_dir, *flags, nodes="1:2", procs="1", tag=tag)
    checkpoints, console = run_dir / "checkpoints", run_dir / "console.log"
    wait_until(lambda: (checkpoints / "step-00000010").exists())
    second.kill()
    assert second.wait() == -signal.SIGKILL
    wait_until(lambda: all(first.pid in (pid, parent(pid)) for pid in tagged(tag)), 10)  # node 1's worker is gone
    wait_until(lambda: "left at step" in console.read_text())
    again = node(1, port, run_dir, *flags, nodes="1:2", procs="1", tag=tag)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, out + err
    assert again.communicate(timeout=60) and again.returncode == 0
    assert tagged(tag) == []
    left = next(line for line in out.splitlines() if "left at step" in line)
    assert left.startswith("launch: node 1 (") and "training goes on on 1 node (of 1–2) from step-" in left
    assert left.endswith("the global batch 16 = 1 process × 2 accumulation × 8 per process")
    joined = next(line for line in out.splitlines() if " joined" in line)
    assert joined.endswith("training goes on on 2 nodes (of 1–2) from step-%08d, the global batch 16 = 2 processes "
                           "× 1 accumulation × 8 per process" % int(joined.split("step-")[1][:8]))
    assert max(r["step"] for r in records(run_dir)) == 70 and summary(run_dir)["state"] == "completed"
    final = [params(tmp_path, rank) for rank in (0, 1)]
    for k in final[0]:
        assert torch.equal(final[0][k], final[1][k]), k
