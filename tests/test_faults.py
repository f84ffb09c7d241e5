"""Faults with real processes: a rank that raises, hangs or dies; signals; restarts; non-finite values;
early stopping; and what the job listens on. Every process the launcher starts carries a tag in its
environment, so the tests can tell whether any of them outlived the job."""

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import termios
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from conftest import (
    LAUNCH,
    TAG,
    TINY,
    UNSTOPPED,
    assert_same,
    clean_env,
    console,
    launch,
    ok,
    params,
    records,
    refused,
    summary,
    tagged,
    tiny,
    train_records,
)
from launcher.cli import run as cli
from launcher.plan import Plan
from launcher.processes import env, flight, hang, spawn
from launcher.processes.stop import SIGNALS


def start(tmp_path: Path, name: str, *flags, procs: int = 2) -> tuple[subprocess.Popen, str, Path]:
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    tag = uuid.uuid4().hex
    where = ["--cpu", "--procs", str(procs)] if procs > 1 else ["--cpu"]
    process = subprocess.Popen(
        [str(LAUNCH), str(TINY), *where, "--wandb", "disabled", "--run-dir", str(folder / "run"), "--dump-dir",
         str(folder), *map(str, flags)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(**{TAG: tag}))
    return process, tag, folder


def wait_for_step(folder: Path, step: int, timeout: float = 60) -> None:
    metrics = folder / "run" / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and any(r["step"] >= step for r in records(folder / "run")):
            return
        time.sleep(0.1)
    raise AssertionError(f"no record of step {step} in {metrics} after {timeout} s")


def test_a_raising_rank_ends_the_job_fast_with_its_traceback_once_and_nothing_left(tmp_path):
    process, tag, folder = start(tmp_path, "raise", "--max-steps", "40", "--slow", "0.05", "--crash-at", "5",
                                 "--log-every", "2")
    out, err = process.communicate(timeout=120)
    ended = time.time()
    assert process.returncode == 1
    assert err.count("RuntimeError: planted crash at forward 5") == 1, err
    assert "launch: rank 1 failed: Traceback" in err and "tiny.py" in err
    assert ended - (folder / "crashed").stat().st_mtime < 30  # from the crash to the end of the job
    assert tagged(tag) == []
    # the run's record of it: the state and the exception in one line; the console's log as the console showed it
    failed = summary(folder / "run")
    assert (failed["state"], failed["reason"]) == ("failed", "rank 1 failed: RuntimeError: planted crash at forward 5")
    assert 1 <= failed["step"] < 5 and failed["total_steps"] == 40
    logged = console(folder / "run")  # the two streams' lines, as they came
    assert sorted(logged) == sorted(out.splitlines() + err.splitlines())
    assert logged[0].startswith("launch: tiny.py · 2 CPU processes")
    assert [line for line in logged if line][-1] == "RuntimeError: planted crash at forward 5"
    assert (folder / "run" / "pictures" / "curves.png").stat().st_size > 10_000  # the curves up to the failure


def test_a_rank_that_dies_without_a_word_is_reported_with_where_to_look(tmp_path):
    process, tag, folder = start(tmp_path, "die", "--max-steps", "40", "--crash-at", "3", "--fault", "die")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1
    assert err.strip().splitlines()[-1] == (f"launch: rank 1 exited with code 3 without a traceback; its output is "
                                            f"in {folder / 'run' / 'logs' / 'rank-1.err'} and rank-1.out")
    assert tagged(tag) == []


def test_a_silent_rank_fails_the_job_after_the_collective_timeout(tmp_path):
    """Silent in step 3: after the first step, whose collectives wait --timeout, they wait --step-timeout."""
    start_time = time.monotonic()
    process, tag, folder = start(tmp_path, "hang", "--max-steps", "40", "--crash-at", "3", "--fault", "hang",
                                 "--timeout", "120", "--step-timeout", "10")
    out, err = process.communicate(timeout=180)
    assert process.returncode == 1
    assert "launch: error: rank 0: a collective waited 10 s (--step-timeout) for a rank that stopped responding" \
        in err, err
    stacks = folder / "run" / "logs" / "stacks"
    # the silent rank, named with where it hung, and every rank's stack where the message says
    joined = re.search(r"; rank 1 was silent, in forward \(tiny\.py:\d+\) during step 3: it had joined (\d+) "
                       r"collectives, the others (\d+); every rank's stack: " + re.escape(f"{stacks}/rank-*.txt"), err)
    assert joined and int(joined[1]) < int(joined[2]), err
    silent, waiting = (stacks / "rank-1.txt").read_text(), (stacks / "rank-0.txt").read_text()
    assert "time.sleep(3600)" in silent and silent.startswith("rank 1 "), silent
    # rank 0 waited in the backward, where DDP all-reduces
    assert re.match(r"rank 0 .* during step 3, \d+ collectives joined; in backward \(ddp\.py:\d+\)", waiting), \
        waiting
    assert "Warning" not in err
    # torch's agent SIGTERMs the silent rank, which exits at once (a stalled rank has no step to save at) rather
    # than after the 30 s the agent would give it before a SIGKILL
    logs = "".join(p.read_text() for p in (folder / "run" / "logs").glob("rank-1.*"))
    assert f"SIGTERM while training was stalled (stacks: {stacks / 'rank-1.txt'}): exiting without a checkpoint" \
        in logs, logs
    assert time.monotonic() - start_time < 45
    assert tagged(tag) == []


def test_the_step_timeout_is_the_timeout_on_the_cpu_unless_given(tmp_path):
    """After the first step collectives wait --step-timeout (the test above); on the CPU that is --timeout unless
    given, so nothing changes there (on GPUs it is flags.STEP_TIMEOUT, 300 s: no GPU here to plan for)."""
    base = [str(TINY), "--cpu", "--run-dir", str(tmp_path / "run"), "--timeout", "90"]
    assert cli.parse(base)[0].step_timeout == 90
    assert cli.parse([*base, "--step-timeout", "20"])[0].step_timeout == 20


def test_gpu_workers_get_nccls_flight_recorder_into_the_run_logs_unless_the_user_set_it():
    """The variables as torchtitan sets them, both names of each where torch renamed one; on the CPU none. (NCCL
    itself cannot run here: benchmarks/gpu.py's flight-recorder step hangs a rank on two GPUs and reads the
    dumps.)"""
    gpu = Plan(recipe="r.py", hparams={}, run_dir="/runs/r", name="r", nproc=2, device="cuda")
    given = env.worker_env(gpu, {}, parent=7, cores=8, loopback="lo")
    assert {k: v for k, v in given.items() if k.startswith("TORCH_")} == {
        "TORCH_FR_BUFFER_SIZE": "20000", "TORCH_NCCL_TRACE_BUFFER_SIZE": "20000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_FR_DUMP_TEMP_FILE": "/runs/r/logs/flight-recorder/rank_",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/runs/r/logs/flight-recorder/rank_"}
    users = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
             "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/scratch/fr_"}
    kept = env.worker_env(gpu, users, parent=7, cores=8, loopback="lo")
    assert {k: v for k, v in kept.items() if k.startswith("TORCH_")} == {"TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
    cpu = Plan(recipe="r.py", hparams={}, run_dir="/runs/r", name="r", nproc=2)
    assert not [k for k in env.worker_env(cpu, {}, parent=7, cores=8, loopback="lo") if k.startswith("TORCH_")]


def test_a_failure_names_the_flight_recorders_fresh_dumps_and_how_to_read_them(tmp_path):
    """The files stand in for NCCL's dumps, which only a GPU run writes."""
    where = tmp_path / "logs" / "flight-recorder"
    environ = {"TORCH_FR_DUMP_TEMP_FILE": str(where / "rank_")}
    flight.prepare(environ)
    assert where.is_dir() and flight.dumped(environ, since=0, world=2) == ""
    for rank in (0, 1, 2):
        (where / f"rank_{rank}").write_bytes(b"pickled trace")
    (where / "rank_x").write_bytes(b"not a rank's")
    os.utime(where / "rank_2", (1, 1))  # an earlier start's
    told = flight.dumped(environ, since=time.time() - 60, world=2)
    assert told == (f"; a collective timed out and NCCL's flight recorder dumped the last collectives of ranks 0, 1 "
                    f"to {where}: `torchfrtrace {where} -p rank_` names the collective, and the ranks, that never "
                    "completed it")
    assert "-p rank_ --allow-incomplete-ranks`" in flight.dumped(environ, since=time.time() - 60, world=4)
    assert flight.dumped({}, since=0, world=2) == ""


@pytest.mark.parametrize("signum,procs", [(signal.SIGTERM, 2), (signal.SIGINT, 2), (signal.SIGINT, 1),
                                         (signal.SIGHUP, 2), (signal.SIGHUP, 1)],
                         ids=["sigterm-2-procs", "sigint-2-procs", "sigint-1-proc", "sighup-2-procs", "sighup-1-proc"])
def test_a_signal_saves_a_checkpoint_that_resume_continues_exactly(tmp_path, unstopped, signum, procs):
    common = UNSTOPPED
    straight, reference = unstopped(procs)
    process, tag, folder = start(tmp_path, "signalled", *common, "--slow", "0.2", procs=procs)
    wait_for_step(folder, 4)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert tagged(tag) == []
    saved = [p.name for p in (folder / "run" / "checkpoints").glob("step-*")]
    assert len(saved) == 1 and 3 <= int(saved[0][5:]) < 16
    assert err.strip().splitlines()[-1] == (
        f"launch: stopped by {signal.Signals(signum).name} at step {int(saved[0][5:])}: saved checkpoint "
        f"{folder / 'run' / 'checkpoints' / saved[0]}; continue with --resume auto --run-dir {folder / 'run'}")
    stopped = summary(folder / "run")
    assert (stopped["state"], stopped["reason"], stopped["step"]) == (
        "stopped", err.strip().splitlines()[-1].removeprefix("launch: "), int(saved[0][5:]))
    assert "pictures: curves.png" in out and f"→ {folder / 'run' / 'pictures'}" in out  # drawn at the stop
    if signum == signal.SIGTERM:  # launch resume: the command the run was started with, --resume auto
        resumed = ok(launch("resume", folder / "run", "--slow", "0"))
    else:
        _, resumed = tiny(tmp_path, "signalled", *common, "--resume", "auto", procs=procs)
    done = summary(folder / "run")
    assert (done["state"], done["reason"], done["step"], done["total_steps"]) == ("completed", None, 16, 16)
    assert done["metrics"] == summary(straight / "run")["metrics"]
    logged = console(folder / "run")  # both starts, each from its banner
    assert sum(line.startswith("launch: tiny.py") for line in logged) == 2 and logged[-1].startswith("done: 16 steps")
    for rank in range(procs):
        assert_same(params(folder, rank), params(straight, 0))
    if procs == 2:  # rank 1's output: the resumed start's, and the stopped start's kept beside it
        logs = folder / "run" / "logs"
        assert [(logs / name).exists() for name in ("rank-1.out", "rank-1.err", "rank-1.out.1", "rank-1.err.1",
                                                     "rank-1.out.2")] == [True, True, True, True, False]
    # the log and the verdict of the stopped-and-resumed run are the unstopped run's, the window cut by the stop too
    assert losses(folder / "run") == losses(straight / "run")
    assert judged(resumed.stdout) == judged(reference.stdout)


def losses(run: Path) -> dict:
    return {step: r["train/loss"] for step, r in train_records(run).items()}


def judged(out: str) -> list[str]:
    """The verdict's lines (its findings, and its notes): what the health checks concluded of a whole run."""
    lines = [line for line in out.splitlines() if line.startswith(("verdict:", "warning:"))
             and not line.startswith("warning: step ")]
    assert any(line.startswith("verdict:") for line in lines), out
    return lines


def test_max_restarts_recovers_from_a_crash_with_the_uninterrupted_parameters(tmp_path, unstopped):
    straight, _ = unstopped(2)  # how often a run saves or logs does not change its parameters
    folder, result = tiny(tmp_path, "restarted", *UNSTOPPED, "--save-every", "4", "--crash-at", "10",
                          "--max-restarts", "1", procs=2)
    assert (folder / "crashed").exists() and "resumed from" in result.stdout
    assert "step-00000008 at step 8" in result.stdout
    for rank in (0, 1):
        assert_same(params(folder, rank), params(straight, 0))
    logs = folder / "run" / "logs"  # the crashed start's output and exception, and the restart's output beside them
    assert "RuntimeError: planted crash at forward 10" in (logs / "errors" / "rank-1.json").read_text()
    assert [(logs / name).exists() for name in ("rank-1.out", "rank-1.err", "rank-1.restart-1.out",
                                                 "rank-1.restart-1.err", "errors/rank-1.restart-1.json")] == \
        [True, True, True, True, False]


def test_a_non_finite_gradient_stops_the_run_naming_step_and_parameter(tmp_path):
    _, result = tiny(tmp_path, "nan", "--max-steps", "16", "--nan-at", "5", procs=2, check=False, dump=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(  # every rank sees the same all-reduced gradient, so any of them may be the first to say so
        r"launch: error: rank [01]: non-finite gradient at step 5, first in 0\.weight \(loss nan\); lower the "
        r"learning rate, clip gradients \(--clip-grad\), check the inputs, or pass --skip-nonfinite to skip such "
        r"steps", last), last
    failed = summary(tmp_path / "nan" / "run")
    assert (failed["state"], failed["reason"], failed["step"]) == ("failed", last.removeprefix("launch: error: "), 5)
    assert console(tmp_path / "nan" / "run")[-1] == last


def test_skip_nonfinite_skips_counts_and_reports(tmp_path):
    folder, result = tiny(tmp_path, "skip", "--max-steps", "8", "--nan-at", "5", "--skip-nonfinite",
                          "--log-every", "4")
    assert "step 5: non-finite gradient in 0.weight (loss nan); step skipped (1 so far)" in result.stdout
    assert "(1 step skipped: non-finite)" in result.stdout
    logged = {r["step"]: r for r in records(folder / "run") if "train/loss" in r}
    assert logged[4]["skipped_steps"] == 0 and logged[8]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in params(folder, 0).values())


def test_early_stopping_ends_the_run_and_is_recorded(tmp_path):
    """With lr 0 the validation loss never improves on the first evaluation."""
    folder, result = tiny(tmp_path, "early", "--lr", "0", "--max-steps", "20", "--eval-every", "1",
                          "--early-stop", "2", dump=False)
    assert "early stop at step 3: val/loss has not improved for 2 evaluations (best" in result.stdout
    events = [r for r in records(folder / "run") if r.get("event") == "early_stop"]
    assert len(events) == 1 and events[0]["step"] == 3 and events[0]["best_step"] == 1
    assert max(r["step"] for r in records(folder / "run")) == 3
    assert any("test/loss" in r for r in records(folder / "run"))  # the test split is still evaluated


def listening_addresses(pids: list[int]) -> list[ipaddress._BaseAddress]:
    """Local addresses of the TCP sockets these processes listen on, from /proc."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                # the kernel prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))
                found.append(ipaddress.ip_address(words))
    return found


def test_a_single_node_job_listens_on_loopback_only(tmp_path):
    process, tag, folder = start(tmp_path, "listen", "--max-steps", "40", "--slow", "0.1", "--log-every", "1")
    try:
        wait_for_step(folder, 2)
        addresses = listening_addresses(tagged(tag))
        assert len(addresses) >= 3  # the launcher's rendezvous store and each worker's gloo endpoint
        assert all(a.is_loopback for a in addresses), addresses
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)


def test_a_folder_named_launcher_in_the_working_directory_does_not_shadow_the_package(tmp_path):
    """The parent of a clone holds a folder named launcher: every process still imports the installed package."""
    (tmp_path / "launcher").mkdir()
    result = ok(launch(TINY, "--cpu", "--procs", "2", "--max-steps", "2", "--wandb", "disabled", "--run-dir", "run",
                       cwd=tmp_path))
    assert "done: 2 steps" in result.stdout


def test_workers_die_with_their_launcher_however_it_died(tmp_path):
    process, tag, folder = start(tmp_path, "orphans", "--max-steps", "400", "--slow", "0.1", "--log-every", "1")
    wait_for_step(folder, 2)
    workers = [pid for pid in tagged(tag) if pid != process.pid]
    assert len(workers) == 2
    process.kill()  # SIGKILL: the launcher can do nothing about it
    process.communicate(timeout=10)
    deadline = time.monotonic() + 5
    while tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tagged(tag) == []


@pytest.mark.parametrize("procs", [1, 2])
def test_a_terminal_that_hangs_up_leaves_a_checkpoint(tmp_path, procs):
    """ssh drops: the launcher's terminal hangs up (the kernel sends SIGHUP), and every write to it fails from
    then on; the run saves its checkpoint and stops all the same."""
    master, terminal = os.openpty()

    def controlling_terminal():  # a session of its own, on the pty, as a login shell's
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    folder, tag = tmp_path / "hangup", uuid.uuid4().hex
    process = subprocess.Popen(
        [str(LAUNCH), str(TINY), "--cpu", "--procs", str(procs), "--wandb", "disabled", "--run-dir",
         str(folder / "run"), "--max-steps", "400", "--slow", "0.1", "--log-every", "1"],
        stdin=terminal, stdout=terminal, stderr=terminal, preexec_fn=controlling_terminal,
        env=clean_env(**{TAG: tag}))
    os.close(terminal)
    def screen():  # drained, so that nothing blocks on a full pty
        with contextlib.suppress(OSError):  # the hangup below closes it
            while os.read(master, 4096):
                pass

    threading.Thread(target=screen, daemon=True).start()
    wait_for_step(folder, 3)
    os.close(master)
    assert process.wait(timeout=120) == 128 + signal.SIGHUP
    saved = [p.name for p in (folder / "run" / "checkpoints").glob("step-*")]
    stopped = [r for r in records(folder / "run") if r.get("event") == "stopped"]
    assert len(saved) == 1 and stopped[0]["signal"] == "SIGHUP" and stopped[0]["checkpoint"].endswith(saved[0])
    assert tagged(tag) == []


@pytest.mark.parametrize("procs", [1, 2])
def test_a_signal_before_training_names_the_older_checkpoint_it_did_not_replace(tmp_path, procs):
    folder, _ = tiny(tmp_path, "early", "--max-steps", "4", "--save-every", "2", procs=procs)
    process, tag, _ = start(tmp_path, "early", "--max-steps", "400", "--resume", "auto", procs=procs)
    assert process.stdout.readline().startswith("launch: tiny.py")  # the run starts: the recipe loads
    if procs > 1:
        assert process.stdout.readline().startswith("launch: 2 processes")  # the workers start
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    run = folder / "run"
    assert process.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == (
        f"launch: stopped by SIGTERM with no checkpoint saved at the stop; the newest is "
        f"{run / 'checkpoints' / 'step-00000004'}: --resume auto --run-dir {run} continues from there")
    assert tagged(tag) == []


class Signalling:
    """A banner whose printing is interrupted by SIGTERM: a signal that comes at the first moment it can."""

    def __str__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return "launch: the banner"


def test_a_signal_while_the_banner_prints_is_a_stop_not_a_crash(tmp_path, capsys):
    plan = cli.parse([str(TINY), "--run-dir", str(tmp_path / "run")])[0]
    before = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        code = spawn.launch(plan, None, Signalling())
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    assert code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err == "launch: stopped by SIGTERM with no checkpoint saved at the stop, and there is none\n"


def test_a_rank_killed_from_outside_is_the_one_blamed(tmp_path):
    """kill -9 of rank 1: the agent then stops rank 0 with SIGTERM, and rank 0 may see the connection close
    first; neither makes rank 0 the cause."""
    process, tag, folder = start(tmp_path, "kill", "--max-steps", "400", "--slow", "0.05", "--log-every", "1")
    wait_for_step(folder, 3)
    rank_1 = next(pid for pid in tagged(tag) if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    os.kill(rank_1, signal.SIGKILL)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1
    assert err.strip().splitlines()[-1] == (f"launch: rank 1 was killed by SIGKILL (out of memory, or killed from "
                                            f"outside?); its output is in {folder / 'run' / 'logs' / 'rank-1.err'} and "
                                            "rank-1.out")
    assert tagged(tag) == []


def test_a_run_directory_holds_one_live_run_and_a_dead_one_leaves_no_lock(tmp_path):
    process, tag, folder = start(tmp_path, "live", "--max-steps", "400", "--slow", "0.1")
    run = folder / "run"
    try:
        wait_for_step(folder, 1)
        for extra in ([], ["--resume", "auto"], ["--slurm", "--dry-run", "--resume", "auto"]):
            second = launch(TINY, "--cpu", "--wandb", "disabled", "--run-dir", run, *extra)
            assert second.returncode == 2 and second.stdout == ""
            assert re.fullmatch(rf"launch: error: run directory {re.escape(str(run))} is in use by a live run \(pid "
                                rf"{process.pid} on {re.escape(socket.gethostname())} since [-\d: ]+\): wait for it to "
                                r"end, stop it, or choose another --run-dir or --name\n", second.stderr), second.stderr
    finally:
        process.kill()
        process.communicate(timeout=30)
    assert len([r for r in records(run) if "train/loss" in r]) == len({r["step"] for r in records(run)
                                                                       if "train/loss" in r})  # no doubled rows
    ok(launch(TINY, "--cpu", "--wandb", "disabled", "--run-dir", run, "--resume", "auto", "--max-steps", "2"))


def mounted(mount: Path, options: str) -> Path:
    """A tmpfs of its own at `mount` (mounting needs root, which CI has)."""
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a filesystem of the test's own ({result.stderr.strip()}): needs root")
    return mount


@pytest.fixture
def small_disk(tmp_path):
    yield mounted(tmp_path / "disk", "size=8m")
    subprocess.run(["umount", "--lazy", str(tmp_path / "disk")], check=True)


def test_a_read_only_run_directory_or_parent_is_one_line_and_exit_2(tmp_path):
    disk = mounted(tmp_path / "disk", "size=1m")
    try:
        (disk / "old").mkdir()
        (disk / "old" / "config.json").write_text('{"plan": {}}')
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        for run, what in ((disk / "new", "created"), (disk / "old", "written")):
            result = launch(TINY, "--cpu", "--procs", "2", "--wandb", "disabled", "--run-dir", run, "--resume", "auto")
            assert result.returncode == 2 and "processes" not in result.stdout
            assert result.stderr == f"launch: error: --run-dir {run} cannot be {what}: Read-only file system\n"
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as f:
        while True:
            f.write(b"\0" * (1 << 16))
            f.flush()
    return filler


@pytest.mark.parametrize("procs", [1, 2])
def test_a_full_disk_during_a_save_is_one_line_naming_it_and_the_checkpoint_kept(small_disk, procs):
    run = small_disk / "run"
    process = subprocess.Popen(
        [str(LAUNCH), str(TINY), "--cpu", "--procs", str(procs), "--wandb", "disabled", "--run-dir", str(run),
         "--max-steps", "400", "--slow", "0.1", "--save-every", "4", "--keep", "1", "--log-every", "1000",
         "--eval-epochs", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    deadline = time.monotonic() + 60
    while not (run / "checkpoints" / "step-00000004").exists():
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.05)
    filler = fill(small_disk)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1
    assert re.fullmatch(rf"launch: error: (rank [01]: )?saving checkpoint step-00000008 failed: no space left on the "
                        rf"filesystem at {re.escape(str(small_disk))} \([\d.]+ MiB free\); the newest complete "
                        rf"checkpoint is {re.escape(str(run / 'checkpoints' / 'step-00000004'))}\n", err), err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000004"]  # no half-written save
    filler.unlink()
    (run / "checkpoints" / ".step-00000009.tmp").mkdir()  # as a save killed mid-way leaves it
    resumed = ok(launch(TINY, "--cpu", "--procs", procs, "--wandb", "disabled", "--run-dir", run, "--resume", "auto",
                        "--max-steps", "10", "--eval-epochs", "0"))
    assert "resumed from" in resumed.stdout and "step-00000004 at step 4" in resumed.stdout
    assert not list((run / "checkpoints").glob(".*"))  # cleaned at the start


def stall(run_dir: Path, joined: dict[int, int], monkeypatch) -> None:
    """Each rank's watchdog (in this process), stalled at step 3 until it wrote its stacks."""
    for rank, count in joined.items():
        monkeypatch.setattr(hang, "collectives", lambda device, count=count: count)
        dog = hang.Watchdog(str(run_dir), rank, timeout=0.2, device=torch.device("cpu"))
        dog.beat(3)
        while not dog.written:
            time.sleep(0.01)
        dog.stop()


@pytest.mark.parametrize("joined,world,expected", [
    ({0: 8, 1: 7, 2: 8}, 3, r"rank 1 was silent, in stall \(test_faults\.py:\d+\) during step 3: it had joined 7 "
                            r"collectives, the others 8; every rank's stack: .*/logs/stacks/rank-\*\.txt"),
    ({0: 9, 1: 7, 2: 8}, 3, r"rank 1 was silent, .*: it had joined 7 collectives, the others 8/9; every rank's stack: "
                            r".*"),
    ({0: 8, 1: 8}, 2, r"every rank had joined 8 collectives: they waited for one another; every rank's stack: .*"),
    ({0: 8}, 2, r"rank 1 wrote no stack \(stuck without releasing Python's lock, or its node was lost\); every "
                r"rank's stack: .*"),
    ({}, 2, r""),  # no watchdog wrote: the caller says where the logs are instead
], ids=["one-behind", "uneven", "all-waiting", "one-missing", "none"])
def test_the_silent_rank_is_the_one_that_joined_the_fewest_collectives(tmp_path, monkeypatch, joined, world, expected):
    stall(tmp_path, joined, monkeypatch)
    assert re.fullmatch(expected, hang.silent(str(tmp_path), world, timeout=10))


def test_a_stack_from_an_earlier_stall_is_not_taken_for_this_one(tmp_path, monkeypatch):
    stall(tmp_path, {0: 8, 1: 7}, monkeypatch)
    old = time.time() - 60
    os.utime(hang.folder(tmp_path) / "rank-1.txt", (old, old))
    assert hang.silent(str(tmp_path), 2, timeout=10).startswith("rank 1 wrote no stack")


def test_a_watchdog_on_a_full_disk_writes_nothing_and_says_nothing(small_disk, capsys, monkeypatch):
    """The stacks help when there is room for them; a full disk makes no second failure out of them."""
    raised = []
    monkeypatch.setattr(threading, "excepthook", raised.append)
    dog = hang.Watchdog(str(small_disk), 0, timeout=0.2, device=torch.device("cpu"))
    fill(small_disk)
    while not dog.written:
        time.sleep(0.01)
    time.sleep(0.1)
    assert dog.thread.is_alive() and raised == []  # it watches on, for the next stall
    dog.stop()
    assert not (hang.folder(small_disk) / "rank-0.txt").exists() and capsys.readouterr() == ("", "")


def test_status_logs_and_cancel_follow_runs_from_their_directories(tmp_path, capsys):
    """A folder of runs, each in another state: completed, failed, lost (its launcher killed outright), and one that
    runs until `launch cancel` stops it with a checkpoint, while `launch logs -f` follows it to the end."""
    done, _ = tiny(tmp_path, "done", "--max-steps", "8")
    _, failed = tiny(tmp_path, "nan", "--max-steps", "16", "--nan-at", "3", check=False, dump=False)
    killed, tag, _ = start(tmp_path, "killed", "--max-steps", "400", "--slow", "0.1", procs=1)
    live, live_tag, folder = start(tmp_path, "live", "--max-steps", "400", "--slow", "0.1")
    wait_for_step(tmp_path / "killed", 4)
    killed.kill()  # no launcher is left to say how the run ended
    killed.wait(timeout=30)
    assert tagged(tag) == []
    wait_for_step(folder, 4)
    follower = subprocess.Popen([str(LAUNCH), "logs", folder / "run", "-f"], stdout=subprocess.PIPE, text=True)

    rows = {Path(r["run"]).parent.name: r for r in map(json.loads, ok(launch("status", tmp_path / "done" / "run",
            tmp_path / "nan" / "run", tmp_path / "killed" / "run", folder / "run", "--json")).stdout.splitlines())}
    assert {name: row["state"] for name, row in rows.items()} == {
        "done": "completed", "nan": "failed", "killed": "lost", "live": "running"}
    assert rows["nan"]["reason"] == failed.stderr.strip().splitlines()[-1].removeprefix("launch: error: ")
    assert rows["killed"]["reason"] == "its launcher ended without a word (killed, or its machine went down)"
    assert rows["live"]["step"] >= 4 and rows["live"]["total_steps"] == 400 and rows["live"]["eta_s"] > 0

    cancelled = ok(launch("cancel", folder / "run"))
    out, err = live.communicate(timeout=60)
    assert live.returncode == 128 + signal.SIGTERM and tagged(live_tag) == []
    stopped = err.strip().splitlines()[-1]
    assert cancelled.stdout.splitlines()[-1] == stopped  # the stop's line: where its checkpoint is
    assert re.fullmatch(r"launch: stopped by SIGTERM at step \d+: saved checkpoint .*step-\d+; continue with "
                        r"--resume auto --run-dir .*", stopped), stopped
    followed, _ = follower.communicate(timeout=30)
    assert followed.splitlines() == console(folder / "run") and followed.splitlines()[-1] == stopped

    # launch resume: nothing to do for a finished run; the stopped one continues as it was started
    assert ok(launch("resume", done / "run")).stdout == (
        f"launch: {done / 'run'} finished its 8 steps: nothing to resume (give flags, such as more --epochs, to "
        "train on)\n")
    further = summary(folder / "run")["step"] + 4
    resumed = ok(launch("resume", folder / "run", "--slow", "0", "--max-steps", further))
    assert f"resuming from {folder / 'run' / 'checkpoints'}" in resumed.stdout
    assert (summary(folder / "run")["state"], summary(folder / "run")["step"]) == ("completed", further)
    table = ok(launch("status", tmp_path)).stdout.splitlines()  # a folder of runs: the runs inside
    assert table[0].split() == ["RUN", "STATE", "STEP", "LOSS", "BEST", "ETA", "WALL"]
    assert [line.split()[1] for line in table[1:5]] == ["completed", "lost", "completed", "failed"]
    assert table[5] == f"  {tmp_path / 'killed' / 'run'}: {rows['killed']['reason']}"
    assert ok(launch("logs", done / "run")).stdout.splitlines() == console(done / "run")

    # what cannot be done says why, in one line
    (tmp_path / "empty").mkdir()
    assert refused(capsys, "cancel", done / "run").endswith("is not running: it is completed")
    assert refused(capsys, "logs", tmp_path / "empty") == f"launch: error: {tmp_path / 'empty'} is not a run directory"
    assert refused(capsys, "status", tmp_path / "empty").endswith(
        "holds no run (a run directory has a summary.json or a config.json)")
