"""`launch --slurm` against a real Slurm: a throw-away cluster of three virtual nodes on this machine
(tests/slurm_lab.py). Rendering is checked without it; everything that submits needs it. CI installs
the daemons and runs as root, so there these tests must run, not skip."""

import dataclasses
import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import torch

import slurm_lab
from conftest import (
    TINY,
    WANDB,
    assert_same,
    clean_env,
    in_process,
    launch,
    ok,
    params,
    records,
    refused,
    summary,
    torchrun,
)
from launcher.cli import jobs
from launcher.cli import run as cli
from launcher.plan import PARENT_ENV, PLAN_ENV, Plan
from launcher.processes import env, slurm
from launcher.runs.files import update_summary

WHY_NOT = slurm_lab.unavailable()
SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture(scope="module")
def lab():
    if WHY_NOT:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Slurm tests: {WHY_NOT}")
        pytest.skip(WHY_NOT)
    cluster = slurm_lab.Lab().start()
    yield cluster
    cluster.stop()


@pytest.fixture(autouse=True)
def nothing_left_queued(request):
    yield
    if "lab" in request.fixturenames:
        request.getfixturevalue("lab").clear()


def submit(lab, tmp_path: Path, name: str, *flags) -> tuple[str, Path, Path]:
    """(job id, run dir, dump folder) of a 2-node × 2-process tiny-recipe job."""
    dump = tmp_path / name
    dump.mkdir()
    run_dir = dump / "run"
    out = ok(launch(TINY, "--slurm", "--nodes", "2", "--cpu", "--procs", "2", "--run-dir", run_dir, "--dump-dir", dump,
                    *flags, env=clean_env(SLURM_CONF=lab.env["SLURM_CONF"]))).stdout
    job = re.search(r"submitted job (\d+)", out).group(1)
    assert f"follow:  tail -f {run_dir / f'slurm-{job}.out'}" in out and f"cancel:  scancel {job}" in out
    return job, run_dir, dump


def log(run_dir: Path, job: str) -> str:
    return (run_dir / f"slurm-{job}.out").read_text()


COMMON = ("--max-steps", "24", "--noise", "0.1", "--log-every", "1")
SECRET = "SENTINEL-$(id)-7f3a"  # a recipe hyperparameter named like a secret


@pytest.fixture(scope="module")
def reference(lab, tmp_path_factory):
    """An unsignalled 2-node job: its final parameters are what a requeued one must reach."""
    tmp = tmp_path_factory.mktemp("reference")
    job, run_dir, dump = submit(lab, tmp, "reference", *COMMON, "--wandb", "offline", "--job-name",
                                f"it's \"quoted\" $(touch {tmp}/pwned)", "--api-token", SECRET)
    lab.wait(job)
    return job, run_dir, dump, tmp


def test_a_two_node_job_trains_one_model_with_one_wandb_run(reference):
    job, run_dir, dump, tmp = reference
    text = log(run_dir, job)
    assert "done: 24 steps" in text, text
    final = [params(dump, rank) for rank in range(4)]
    for rank in range(1, 4):
        assert_same(final[rank], final[0])
    assert len(list(run_dir.rglob("offline-run-*"))) == 1
    assert (run_dir / "slurm.sbatch").exists() and (run_dir / "logs" / "rank-3.out").exists()
    # the job name went through quoting intact and ran nothing
    assert f"launch: job {job} (it's \"quoted\" $(touch {tmp}/pwned)) on node[" in text
    assert not (tmp / "pwned").exists()
    # the secret reached the job through the environment (the script stops when it is unset) and no file
    assert not [p for p in run_dir.rglob("*") if p.is_file() and b"SENTINEL" in p.read_bytes()]


@pytest.mark.slow
def test_a_signalled_job_checkpoints_requeues_and_ends_like_an_unsignalled_one(lab, reference, tmp_path):
    job, run_dir, dump = submit(lab, tmp_path, "signalled", *COMMON, "--wandb", "disabled", "--slow", "0.3")
    reached(lab, run_dir, job, 5)
    subprocess.run(["scancel", "--batch", "--signal=USR2", job], env=lab.env, check=True)  # as Slurm would
    seen = []  # the summary's states, from the warning to the end: requeued, the run is "preempted" until it restarts
    deadline = time.monotonic() + 300
    while lab.state(job):
        assert time.monotonic() < deadline, lab.logs()
        state = summary(run_dir)
        if not seen or seen[-1] != (state["state"], state["reason"]):
            seen.append((state["state"], state["reason"]))
        time.sleep(0.1)
    text = log(run_dir, job)
    assert re.search(r"launch: stopped by SIGTERM at step \d+: saved checkpoint ", text), text
    assert f"launch: requeueing job {job}" in text, text
    saved = int(re.search(r"stopped by SIGTERM at step (\d+)", text)[1])
    preempted = ("preempted", f"Slurm's time limit: requeued (job {job}) to resume from step {saved}")
    assert [s for s, _ in seen if s != "stopped"] == ["running", "preempted", "running", "completed"], seen
    assert preempted in seen and seen[-1] == ("completed", None)
    assert re.search(rf"launch: job {job} .* start 2,", text) and "resumed from" in text
    assert "done: 24 steps" in text
    reference_dump = reference[2]
    for rank in range(4):
        assert_same(params(dump, rank), params(reference_dump, 0))


def exit_code(lab, job: str) -> str:
    """The job's ExitCode (code:signal), which Slurm keeps for a while after the job ends."""
    out = subprocess.run(["scontrol", "show", "job", job, "-o"], env=lab.env, capture_output=True, text=True).stdout
    return re.search(r"\bExitCode=(\S+)", out).group(1)


def test_a_crashing_rank_fails_the_job_with_exit_1_and_its_traceback_once(lab, tmp_path):
    """srun's --kill-on-bad-exit then SIGTERMs the other node's launcher (143), whose ranks meanwhile lose
    their peers: neither is the job's exit code or a second traceback."""
    job, run_dir, _ = submit(lab, tmp_path, "crash", *COMMON, "--wandb", "disabled", "--crash-at", "3")
    lab.wait(job)
    text = log(run_dir, job)
    assert text.count("RuntimeError: planted crash at forward 3") == 1, text
    assert "Traceback" not in text.split("RuntimeError: planted crash at forward 3", 1)[1], text
    assert exit_code(lab, job) == "1:0", text


def test_a_start_that_saves_nothing_is_not_requeued(lab, tmp_path):
    """Slurm's warning arrives during start-up (as with a --time too short): no checkpoint, no requeue."""
    job, run_dir, _ = submit(lab, tmp_path, "early", *COMMON, "--wandb", "disabled")
    deadline = time.monotonic() + 60
    while "start 1," not in (log(run_dir, job) if (run_dir / f"slurm-{job}.out").exists() else ""):
        assert time.monotonic() < deadline, lab.logs()
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR2", job], env=lab.env, check=True)
    lab.wait(job)
    text = log(run_dir, job)
    assert "launch: no checkpoint newer than none was saved in this start: not requeueing a job that makes no " \
           "progress (give it more --time)" in text, text
    assert "start 2," not in text and "requeueing job" not in text
    assert [summary(run_dir)[k] for k in ("state", "reason")] == ["stopped", "Slurm's time limit came before this "
                                                                   "start saved a checkpoint: not requeued (give the "
                                                                   "job more --time)"]


def test_requeues_stop_at_max_requeues(lab, tmp_path):
    job, run_dir, _ = submit(lab, tmp_path, "capped", *COMMON, "--wandb", "disabled", "--slow", "0.3",
                             "--max-requeues", "0")
    reached(lab, run_dir, job, 3)
    subprocess.run(["scancel", "--batch", "--signal=USR2", job], env=lab.env, check=True)
    lab.wait(job)
    text = log(run_dir, job)
    assert "launch: Slurm's warning: the time limit is 120 s away; saving a checkpoint to requeue" in text, text
    assert f"launch: the job was requeued 0 times (--max-requeues): not again; continue it with sbatch " \
           f"{run_dir / 'slurm.sbatch'}" in text, text
    assert "start 2," not in text and list((run_dir / "checkpoints").glob("step-*"))
    assert [summary(run_dir)[k] for k in ("state", "reason")] == ["stopped", "Slurm's time limit, after 0 requeues "
                                                                   "(--max-requeues): continue with sbatch "
                                                                   f"{run_dir / 'slurm.sbatch'}"]


def test_status_and_cancel_reach_a_queued_a_running_and_a_preempted_job(lab, tmp_path):
    """A running job stops through `launch cancel` as through Slurm's warning, with a checkpoint and no requeue. A
    second one, queued behind it (each takes 2 of the 3 nodes' CPUs), starts then, and is preempted: Slurm stops it
    and requeues it (`scontrol requeuehold`: as a preemption does, and held there); `launch status` tells, and
    `launch cancel` cancels it in the queue."""
    env = clean_env(SLURM_CONF=lab.env["SLURM_CONF"])
    job, run_dir, _ = submit(lab, tmp_path, "running", "--max-steps", "400", "--log-every", "1", "--wandb", "disabled",
                             "--slow", "0.3")
    queued, queued_dir, _ = submit(lab, tmp_path, "queued", "--max-steps", "400", "--log-every", "1", "--wandb",
                                   "disabled", "--slow", "0.3")
    reached(lab, run_dir, job, 3)

    def rows() -> dict[str, dict]:
        out = ok(launch("status", tmp_path, "--json", env=env)).stdout
        return {Path(row["run"]).parent.name: row for row in map(json.loads, out.splitlines())}

    now = rows()
    assert [now["running"][k] for k in ("state", "queue", "slurm_job")] == ["running", "RUNNING", job]
    assert [now["queued"][k] for k in ("state", "queue", "slurm_job")] == ["queued", "PENDING", queued]
    assert f"queued (PENDING job {queued})" in ok(launch("status", queued_dir, env=env)).stdout

    assert ok(launch("cancel", run_dir, env=env)).stdout.startswith(f"launch: sent SIGTERM to job {job}: ")
    lab.wait(job)
    text = log(run_dir, job)
    assert re.search(r"launch: stopped by SIGTERM at step \d+: saved checkpoint ", text), text
    assert "start 2," not in text and "requeueing" not in text
    ended = rows()["running"]
    assert (ended["state"], ended.get("queue")) == ("stopped", None)
    assert ended["reason"].startswith("stopped by SIGTERM at step")

    reached(lab, queued_dir, queued, 2)  # the second job started once the first one's nodes were free
    # requeued and held, as a preempted job waiting for its nodes would be: free nodes would start it again at once
    subprocess.run(["scontrol", "requeuehold", queued], env=lab.env, check=True)
    deadline = time.monotonic() + 120
    while (row := rows()["queued"])["state"] != "preempted":
        assert time.monotonic() < deadline, (row, log(queued_dir, queued))
        time.sleep(0.5)
    assert row["queue"] in ("PENDING", "REQUEUED", "REQUEUE_HOLD") and row["reason"].startswith(
        f"stopped by Slurm and requeued (job {queued}): stopped by SIGTERM at step ")
    assert f"preempted ({row['queue']} job {queued})" in ok(launch("status", queued_dir, env=env)).stdout
    assert ok(launch("cancel", queued_dir, env=env)).stdout == f"launch: cancelled queued job {queued}\n"
    lab.wait(queued)
    assert [rows()["queued"][k] for k in ("state", "reason")] == [
        "stopped", f"cancelled while queued (Slurm job {queued})"]


def reached(lab, run_dir: Path, job: str, step: int) -> None:
    """Wait until the job's run has logged `step`."""
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").exists() and max((r["step"] for r in records(run_dir)), default=0) >= step):
        assert time.monotonic() < deadline, log(run_dir, job) if (run_dir / f"slurm-{job}.out").exists() else "no log"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_sweep_is_one_job_array_whose_tasks_requeue_alone(lab, tmp_path):
    """Three trials, two at a time, as ONE job array; Slurm stops and requeues task 0 mid-run (a preemption), which
    resumes from its checkpoint while the others run on; three W&B runs in one group; `launch status` ranks them."""
    folder, env = tmp_path / "sweep", clean_env(SLURM_CONF=lab.env["SLURM_CONF"])
    out = ok(launch("sweep", TINY, "--slurm", "--cpu", "--procs", "2", "--wandb", "offline", "--max-steps", "40",
                    "--log-every", "1", "--slow", "0.1", "--grid", "--lr", "0.01,0.03,0.1", "--max-parallel", "2",
                    "--run-dir", folder, env=env, cwd=tmp_path)).stdout
    job = re.search(r"launch: submitted job array (\d+) \(3 tasks, 2 at once\): task I runs trial I", out).group(1)
    assert "#SBATCH --array=0,1,2%2" in (folder / "slurm.sbatch").read_text()
    first = folder / "trial-0"
    reached(lab, first, f"{job}_0", 3)
    subprocess.run(["scontrol", "requeue", f"{job}_0"], env=lab.env, check=True)
    lab.wait(job)
    text = log(first, f"{job}_0")
    assert re.search(r"launch: stopped by SIGTERM at step \d+: saved checkpoint ", text), text
    assert ", start 2," in text and f"resumed from {first / 'checkpoints'}" in text
    for index in (1, 2):
        assert ", start 2," not in log(folder / f"trial-{index}", f"{job}_{index}")
    rows = [json.loads(line) for line in ok(launch("status", folder, "--json", env=env)).stdout.splitlines()]
    assert [(r["state"], r["step"], r["slurm_job"]) for r in sorted(rows, key=lambda r: r["trial"])] == [
        ("completed", 40, f"{job}_{i}") for i in range(3)]
    assert [r["best"]["value"] for r in rows] == sorted(r["best"]["value"] for r in rows)
    for index, lr in enumerate((0.01, 0.03, 0.1)):
        starts = sorted((folder / f"trial-{index}" / "wandb").glob("offline-run-*"))
        assert len(starts) == (2 if index == 0 else 1)
        run = json.loads(next(line for line in subprocess.run(
            [str(WANDB), "leet", "inspect", "--json", str(starts[-1])], capture_output=True, text=True, check=True,
            timeout=60).stdout.splitlines() if '"type":"run"' in line))["run"]
        assert (run["run_group"], run["display_name"]) == ("sweep", f"sweep-{index}")
        assert json.loads((folder / f"trial-{index}" / "config.json").read_text())["plan"]["hparams"]["lr"] == lr


@pytest.mark.slow
@pytest.mark.parametrize("script", ["ddp_train.py", "accelerate_train.py"])
def test_a_training_script_runs_on_two_nodes_as_under_torchrun(lab, tmp_path, script):
    """A torchrun-style script and an Accelerate one, launched as they are on 2 nodes × 2 processes, train what
    torchrun trains with 4 processes (with the variables `accelerate launch` sets, for Accelerate's); the DDP
    script's own arguments, quotes, spaces and launcher-like flags included, reach it as they were."""
    out, note = tmp_path / "with space", "it's \"quoted\" --nodes 9"
    out.mkdir()
    run_dir = tmp_path / "run"
    extra = ["--note", note] if script == "ddp_train.py" else []
    submitted = ok(launch("--slurm", "--nodes", "2", "--cpu", "--procs", "2", "--run-dir", run_dir, SCRIPTS / script,
                          "--out", out / "slurm.pt", *extra, env=clean_env(SLURM_CONF=lab.env["SLURM_CONF"]),
                          cwd=tmp_path)).stdout
    job = re.search(r"submitted job (\d+)", submitted).group(1)
    lab.wait(job)
    text = log(run_dir, job)
    assert (f"world 4 note {note!r} loss " if extra else "processes 4 precision no accumulation 1") in text, text
    ok(torchrun(SCRIPTS / script, "--out", out / "torchrun.pt", procs=4, env={"ACCELERATE_USE_CPU": "True"}))
    trained, expected = (torch.load(out / f"{name}.pt", weights_only=True) for name in ("slurm", "torchrun"))
    assert all(torch.equal(trained[k], expected[k]) for k in expected)
    assert json.loads((run_dir / "summary.json").read_text())["state"] == "completed"


def test_a_preempted_script_gets_sigterm_in_its_own_handler(lab, tmp_path):
    run_dir, saved = tmp_path / "run", tmp_path / "saved"
    submitted = ok(launch("--slurm", "--cpu", "--procs", "2", "--run-dir", run_dir, SCRIPTS / "handler.py", "--saved",
                          saved, env=clean_env(SLURM_CONF=lab.env["SLURM_CONF"]), cwd=tmp_path)).stdout
    job = re.search(r"submitted job (\d+)", submitted).group(1)
    deadline = time.monotonic() + 120
    while "training" not in (log(run_dir, job) if (run_dir / f"slurm-{job}.out").exists() else ""):
        assert time.monotonic() < deadline, lab.state(job)
        time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", job], env=lab.env, check=True)
    while not all((tmp_path / f"saved-{rank}").exists() for rank in (0, 1)):
        assert time.monotonic() < deadline, log(run_dir, job)
        time.sleep(0.5)
    assert [(tmp_path / f"saved-{rank}").read_text() for rank in (0, 1)] == ["SIGTERM", "SIGTERM"]


def test_a_script_saves_on_its_own_signal_at_the_time_limit_and_is_requeued(lab, tmp_path):
    """--script-signal USR1: at Slurm's time-limit warning every process of the script gets USR1 (the launchers
    and the batch script's tasks ignore it), saves and stops, and the job is requeued to start again."""
    run_dir, saved = tmp_path / "run", tmp_path / "saved"
    submitted = ok(launch("--slurm", "--cpu", "--procs", "2", "--script-signal", "USR1", "--run-dir", run_dir,
                          SCRIPTS / "handler.py", "--saved", saved, "--signal", "USR1",
                          env=clean_env(SLURM_CONF=lab.env["SLURM_CONF"]), cwd=tmp_path)).stdout
    job = re.search(r"submitted job (\d+)", submitted).group(1)
    deadline = time.monotonic() + 120
    while "training" not in (text := log(run_dir, job) if (run_dir / f"slurm-{job}.out").exists() else ""):
        assert time.monotonic() < deadline, (lab.state(job), text)
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR2", job], env=lab.env, check=True)  # as Slurm would
    while ", start 2," not in log(run_dir, job):
        assert time.monotonic() < deadline, log(run_dir, job)
        time.sleep(0.5)
    assert [(tmp_path / f"saved-{rank}").read_text() for rank in (0, 1)] == ["SIGUSR1", "SIGUSR1"]
    assert f"launch: requeueing job {job}" in log(run_dir, job)


def test_gpus_requested_but_not_visible_fail_the_job_with_a_message(lab, tmp_path):
    """The lab's nodes have two fake GPUs each: Slurm sets CUDA_VISIBLE_DEVICES, but CUDA sees none."""
    run_dir = tmp_path / "run"
    out = ok(launch(TINY, "--slurm", "--nodes", "1", "--gpus", "2", "--workers", "0", "--run-dir", run_dir,
                    env=clean_env(SLURM_CONF=lab.env["SLURM_CONF"]))).stdout  # 2 CPUs: the lab node's all
    job = re.search(r"submitted job (\d+)", out).group(1)
    lab.wait(job)
    assert ("launch: error: --gpus 2: no GPUs visible (CUDA_VISIBLE_DEVICES=0,1); use --cpu to run on the CPU"
            in log(run_dir, job))


@pytest.mark.parametrize("allocation,srun,message", [
    (["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"], "srun --ntasks-per-node=2",
     "this Slurm step runs 2 tasks per node (2); run one launcher per node (srun --ntasks-per-node=1)"),
    (["--nodes=2", "--ntasks-per-node=1"], "srun --ntasks-per-node=1",
     "--nodes 3, but this Slurm step spans 2 node(s)"),
], ids=["two-tasks-per-node", "world-size-mismatch"])
def test_a_hand_written_job_that_would_hang_is_an_error(lab, tmp_path, allocation, srun, message):
    script = tmp_path / "job.sbatch"
    command = shlex.join([str(Path(os.sys.executable)), "-m", "launcher", str(TINY), "--cpu", "--nodes", "3",
                          "--master-addr", "127.0.0.1", "--run-dir", str(tmp_path / "run")])
    script.write_text(f"#!/bin/bash\n#SBATCH --output={tmp_path}/out.txt\n"
                      f"{srun} bash -c 'exec \"$@\" --node-rank \"$SLURM_NODEID\"' launch {command}\n")
    job = subprocess.run(["sbatch", "--parsable", *allocation, str(script)], env=lab.env, capture_output=True,
                         text=True, check=True).stdout.strip()
    lab.wait(job)
    text = (tmp_path / "out.txt").read_text()
    assert f"launch: error: {message}" in text, text
    assert not (tmp_path / "run").exists()


def test_a_hand_written_job_step_needs_no_node_flags(lab, tmp_path):
    """`srun launch RECIPE` in a 2-node allocation: the node count, this node's rank and node 0's address come from
    the job step (processes/cluster.py), as torchrun's would come from its flags."""
    run_dir, script = tmp_path / "run", tmp_path / "job.sbatch"
    command = shlex.join([str(Path(os.sys.executable)), "-m", "launcher", str(TINY), "--cpu", "--max-steps", "6",
                          "--wandb", "disabled", "--run-dir", str(run_dir), "--dump-dir", str(tmp_path)])
    script.write_text(f"#!/bin/bash\n#SBATCH --output={tmp_path}/out.txt\nsrun --ntasks-per-node=1 {command}\n")
    job = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", str(script)], env=lab.env,
                         capture_output=True, text=True, check=True).stdout.strip()
    lab.wait(job)
    text = (tmp_path / "out.txt").read_text()
    assert (f"1 process on node 0 of 2 (as the Slurm job step's variables say), rendezvous on 127.0.0.1:"
            f"{20000 + int(job) % 20000}") in text, text
    assert max(r["step"] for r in records(run_dir)) == 6
    assert_same(params(tmp_path, 0), params(tmp_path, 1))


@pytest.mark.parametrize("flags,reason", [
    (["--partition", "nowhere"], "invalid partition"),
    (["--nodes", "4"], "requested node configuration is not available"),  # the lab has 3 nodes
    (["--procs", "4"], "requested node configuration is not available"),  # 4 CPUs per task, 2 per node
], ids=["no-such-partition", "more-nodes-than-there-are", "more-cpus-than-a-node-has"])
def test_sbatch_refusing_the_job_is_one_line_and_exit_2(lab, tmp_path, monkeypatch, capsys, flags, reason):
    """A request no node can satisfy would pend forever: sbatch --test-only says so at submission."""
    monkeypatch.setenv("SLURM_CONF", lab.env["SLURM_CONF"])
    line = refused(capsys, TINY, "--slurm", "--cpu", *flags, "--run-dir", tmp_path / "run")
    assert line.startswith("launch: error: sbatch refused the job: ") and reason in line.lower()
    assert not tmp_path.joinpath("run").exists()  # nothing left that would block the next try


@pytest.mark.parametrize("queue,again,state", [
    ("RUNNING 2030-01-01T00:00:00", True, "queued"),  # began after the stop was written
    ("RUNNING 2020-01-01T00:00:00", False, "stopped"),  # the stopped start itself, its script ending
    ("PENDING N/A", False, "preempted"),
    ("", False, "stopped"),
], ids=["started-again", "still-ending", "requeued", "gone"])
def test_the_status_of_a_stopped_job_tells_a_new_start_from_the_old_one(tmp_path, monkeypatch, queue, again, state):
    """Between Slurm starting a requeued job again and its launcher writing "running", the summary still tells the
    earlier start's stop: Slurm's start time, later than the summary's, says which. (squeue is faked: the window
    lasts the second or two a launcher takes to start.)"""
    fake = tmp_path / "bin" / "squeue"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho '{queue}'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    update_summary(str(tmp_path), state="stopped", reason="stopped by SIGTERM at step 3", slurm_job="7")
    row = jobs.status(tmp_path)
    assert row["state"] == state and row["reason"].endswith("stopped by SIGTERM at step 3")
    assert ("Slurm started job 7 again" in row["reason"]) == again


def test_a_hanging_sbatch_is_one_line_and_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nsleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(slurm, "SBATCH_TIMEOUT", 1)
    run_dir = tmp_path / "runs" / "r"
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(TINY), "--slurm", "--cpu", "--run-dir", str(run_dir)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("launch: error: sbatch did not answer within 1 s (is slurmctld reachable? "
                                       "`sinfo` tells); nothing was submitted\n")
    assert not (tmp_path / "runs").exists()  # the retry is not blocked


def dry_run(capsys, *flags) -> str:
    """The script `launch TINY --slurm FLAGS --dry-run` prints, in this process."""
    code, script, err = in_process(capsys, TINY, "--slurm", *flags, "--dry-run")
    assert code == 0, err
    return script


def test_dry_run_renders_a_readable_script_with_every_value_quoted(tmp_path, monkeypatch, capsys):
    """No cluster needed: the script is printed, nothing is written or submitted."""
    name = "a b'c\"d $(touch MARKER) `id`"
    dump = tmp_path / "dump dir; rm -rf ~"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "SENTINEL" + "0" * 32)
    script = dry_run(capsys, "--nodes", "2", "--cpu", "--procs", "2", "--partition", "gpu queue", "--time", "1:00:00",
                     "--job-name", name, "--run-dir", tmp_path / "run", "--dump-dir", dump)
    assert not (tmp_path / "run").exists() and "SENTINEL" not in script
    # it names the file `launch --slurm` would write, as what that would do, not as a file this wrote
    assert f"# `launch --slurm` (without --dry-run) writes it to {tmp_path / 'run' / 'slurm.sbatch'} and " in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid bash
    directives = {key: value for key, _, value in (line[len("#SBATCH --"):].partition("=")
                                                   for line in script.splitlines() if line.startswith("#SBATCH --"))}
    assert shlex.split(directives["job-name"]) == [name]  # sbatch reads #SBATCH values with shell quoting
    assert shlex.split(directives["partition"]) == ["gpu queue"]
    assert directives["nodes"] == "2" and directives["ntasks-per-node"] == "1"
    assert directives["cpus-per-task"] == "2" and directives["signal"] == "B:USR2@120" and "requeue" in directives
    command = script.split('\n  "$codes" ', 1)[1].split("&\n", 1)[0]
    words = shlex.split(command.replace("\\\n", " "))
    assert Path(words[0]).parent == Path(os.sys.executable).parent  # the environment launch runs from
    assert words[1:4] == ["-P", "-m", "launcher"]  # -P: never a folder named launcher in the cwd
    # the job's own flags first, then the recipe (a training script's arguments would end the line)
    assert words[4:13] == ["--nodes", "$SLURM_NNODES", "--master-addr", "$addr", "--master-port", "$port",
                           "--resume", "$resume", str(TINY)]
    assert words[words.index("--dump-dir") + 1] == str(dump)
    assert "--slurm" not in words and "--partition" not in words and "--job-name" not in words
    assert "\nresume=auto\n" in script  # the job looks for the newest checkpoint when it starts
    secret = dry_run(capsys, "--cpu", "--api-token=SENTINEL")
    assert "SENTINEL" not in secret and ' --api-token "${LAUNCH_SECRET_API_TOKEN:?is not set: ' in secret


def test_a_gpu_job_asks_for_a_core_per_process_and_per_dataloader_worker(capsys):
    script = dry_run(capsys, "--gpus", "2", "--workers", "3")
    assert "#SBATCH --gpus-per-node=2\n#SBATCH --cpus-per-task=8\n" in script


def test_threads_are_sized_from_the_cpus_the_task_was_given(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert env.cores() == 3
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert env.cores() == len(os.sched_getaffinity(0))


def test_workers_get_the_plan_their_share_of_the_cores_and_loopback_and_keep_what_the_user_set():
    plan = Plan(recipe="r.py", hparams={}, run_dir="run", name="r", nproc=4)
    given = env.worker_env(plan, {}, parent=7, cores=9, loopback="lo")
    assert given == {PLAN_ENV: plan.to_json(), PARENT_ENV: "7", "OMP_NUM_THREADS": "2", "GLOO_SOCKET_IFNAME": "lo",
                     "NCCL_SOCKET_IFNAME": "lo"}
    users = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0", PLAN_ENV: "stale", PARENT_ENV: "1"}
    kept = env.worker_env(plan, users, parent=7, cores=9, loopback="lo")
    assert kept == {PLAN_ENV: plan.to_json(), PARENT_ENV: "7", "NCCL_SOCKET_IFNAME": "lo"}
    nodes = dataclasses.replace(plan, nnodes=2, nproc=16)
    assert env.worker_env(nodes, {}, parent=7, cores=9, loopback="lo")["OMP_NUM_THREADS"] == "1"
    assert "GLOO_SOCKET_IFNAME" not in env.worker_env(nodes, {}, parent=7, cores=9, loopback="lo")
    script = dataclasses.replace(plan, script_args=[], precision="bf16", grad_accum=3)
    accelerate = {k: v for k, v in env.worker_env(script, {"ACCELERATE_USE_CPU": "False"}, 7, 9, "lo").items()
                  if k.startswith("ACCELERATE_")}
    assert accelerate == {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "bf16",
                          "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "3", "ACCELERATE_DYNAMO_BACKEND": "NO"}


def test_a_line_break_cannot_reach_the_script(tmp_path, capsys):
    err = refused(capsys, TINY, "--slurm", "--cpu", "--job-name", "x\nrm -rf ~", "--run-dir", tmp_path / "run",
                  "--dry-run")
    assert err == "launch: error: --job-name contains a line break, which cannot go into a batch script"


def test_a_site_template_is_rendered_and_a_wrong_placeholder_named(tmp_path, capsys):
    site = tmp_path / "site.sbatch"
    site.write_text(slurm.TEMPLATE.read_text().replace("set -uo pipefail", "set -uo pipefail\nmodule load cuda/12")
                    .replace("{{python}} -P -m launcher", "launch"))  # as in a container image
    script = dry_run(capsys, "--cpu", "--slurm-template", site, "--run-dir", tmp_path / "run")
    assert "module load cuda/12\n" in script and '"$codes" launch \\\n' in script and f' {TINY} ' in script
    assert "{{" not in script
    assert "--slurm-template" not in script
    site.write_text(site.read_text() + "echo {{partiton}}\n")
    err = refused(capsys, TINY, "--slurm", "--cpu", "--slurm-template", site, "--run-dir", tmp_path / "run",
                  "--dry-run")
    assert err.startswith(f"launch: error: --slurm-template {site}: unknown placeholder {{{{partiton}}}} "
                          "(known: script, job_name,")
    last = len(slurm.TEMPLATE.read_text().splitlines())
    for bad, message in (('echo "job {{job_name}} starts"\n', f" line {last + 1}: {{{{job_name}}}} inside double "
                                                                "quotes; the launcher quotes every value for the "
                                                                "shell itself: remove the quotes"),
                         ("if true; then\n", f": the script it gives is not valid bash: bash: line {last + 2}: "
                                             "syntax error")):
        site.write_text(slurm.TEMPLATE.read_text() + bad)
        err = refused(capsys, TINY, "--slurm", "--cpu", "--slurm-template", site, "--run-dir", tmp_path / "run",
                      "--dry-run")
        assert err.startswith(f"launch: error: --slurm-template {site}{message}")
    assert refused(capsys, TINY, "--slurm", "--cpu", "--slurm-template", tmp_path / "none", "--dry-run") == (
        f"launch: error: --slurm-template {tmp_path / 'none'}: No such file or directory")
