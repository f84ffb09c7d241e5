"""W&B with its real client: offline runs read back with `wandb leet inspect --json`."""

import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import LAUNCH, TINY, WANDB, clean_env, history, launch, ok, records, refused
from launcher.cli import run as cli


def config(run: Path) -> dict:
    out = subprocess.run([str(WANDB), "leet", "inspect", "--json", str(run)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return next(json.loads(line)["run"]["config"]["update"] for line in out.splitlines() if '"type":"run"' in line)


def test_two_processes_make_one_offline_run_with_the_logged_metrics(tmp_path):
    run_dir = tmp_path / "run"
    ok(launch(TINY, "--cpu", "--procs", "2", "--wandb", "offline", "--run-dir", run_dir, "--max-steps", "12",
              "--log-every", "3", "--eval-every", "6", cwd=tmp_path))
    runs = list(tmp_path.rglob("offline-run-*"))
    assert len(runs) == 1 and runs[0].parent == run_dir / "wandb", runs  # rank 1 made none

    logged = history(runs[0])
    assert sorted(step for step, item in logged.items() if "train/loss" in item) == [3, 6, 9, 12]
    local = defaultdict(dict)
    for r in records(run_dir):
        local[r["step"]].update(r)
    for step in (3, 6, 9, 12):
        for key in ("train/loss", "lr", "grad_norm", "samples_per_s"):
            assert logged[step][key] == local[step][key], (step, key)
    for step in range(1, 13):  # the sampled health checks (every step of so short a run) reach W&B too
        for key in ("health/grad_norm/0.weight", "health/update_ratio/2.weight"):
            assert logged[step][key] == local[step][key], (step, key)
    for step in (6, 12):
        assert logged[step]["val/loss"] == local[step]["val/loss"]
        assert logged[step]["val/count"] == 37
    assert "val/loss" not in logged[3] and "val/loss" not in logged[9]
    assert logged[12]["test/count"] == 23
    assert config(runs[0])["plan"]["nproc"] == 2


def test_disabled_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    ok(launch(TINY, "--cpu", "--wandb", "disabled", "--run-dir", run_dir, "--max-steps", "3", cwd=tmp_path))
    assert not list(tmp_path.rglob("*wandb*"))
    assert (run_dir / "metrics.jsonl").exists()


def test_online_without_a_key_warns_once_and_trains_on(tmp_path):
    run_dir = tmp_path / "run"
    result = ok(launch(TINY, "--cpu", "--procs", "2", "--wandb", "online", "--run-dir", run_dir, "--max-steps", "3",
                       env=clean_env(HOME=tmp_path, NETRC=tmp_path / "no-netrc"), cwd=tmp_path, timeout=180))
    warnings = [line for line in result.stderr.splitlines() if "W&B could not start" in line]
    assert len(warnings) == 1, result.stderr
    assert "No API key configured" in warnings[0]
    assert max(r["step"] for r in records(run_dir)) == 3


@pytest.mark.parametrize("env,mode", [
    ({}, "offline"),
    ({"WANDB_API_KEY": "x" * 40}, "online"),
    ({"WANDB_MODE": "disabled", "WANDB_API_KEY": "x" * 40}, "disabled"),
    ({"WANDB_MODE": "dryrun"}, "offline"),
])
def test_default_mode(monkeypatch, tmp_path, env, mode):
    for k in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cli.default_wandb_mode() == mode


def test_default_mode_finds_a_netrc_login(monkeypatch, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(netrc))
    assert cli.default_wandb_mode() == "online"


def test_the_api_key_and_secret_hyperparameters_are_written_nowhere(tmp_path, capsys):
    sentinel = "SENTINEL" + "5e" * 16  # 40 characters, like a real key
    run_dir = tmp_path / "run"
    result = ok(launch(TINY, "--cpu", "--procs", "2", "--wandb", "offline", "--run-dir", run_dir, "--max-steps", "3",
                       "--api-token", sentinel, env=clean_env(WANDB_API_KEY=sentinel), cwd=tmp_path))
    assert sentinel not in result.stdout + result.stderr
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any(f.suffix == ".wandb" for f in files) and any(f.name == "config.json" for f in files)
    for f in files:
        assert sentinel.encode() not in f.read_bytes(), f
    # the command to resume with holds the flag without its value, which a resume must be given again
    assert json.loads((run_dir / "config.json").read_text())["command"][-2:] == ["--api-token", "<redacted>"]
    assert refused(capsys, "resume", run_dir, "--max-steps", "6") == (
        f"launch: error: {run_dir} was started with --api-token, whose value is not recorded (a secret): give it again")


def test_every_start_of_a_resumed_offline_run_is_uploaded_by_the_one_command_printed_at_the_end(tmp_path):
    run_dir = tmp_path / "a run"  # a space: the printed command is pasted into a shell as it is
    common = (TINY, "--cpu", "--wandb", "offline", "--run-dir", run_dir, "--save-every", "4")
    ok(launch(*common, "--max-steps", "8", cwd=tmp_path))
    last = ok(launch(*common, "--max-steps", "16", "--resume", "auto", cwd=tmp_path)).stdout.splitlines()[-1]
    starts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(starts) == 2 and len({s.name.rsplit("-", 1)[1] for s in starts}) == 1  # one run id
    assert last == f"W&B: upload all 2 starts of this run with `wandb sync '{run_dir / 'wandb'}'`"
    command = shlex.split(last.split("`")[1])
    listed = subprocess.run([str(WANDB), *command[1:], "--dry-run"], capture_output=True, text=True, timeout=60,
                            env=clean_env(HOME=str(tmp_path)), cwd=tmp_path).stderr
    assert "Would sync 2 run(s)" in listed, listed
    # the two starts hold the whole run between them
    steps = sorted(step for start in starts for step, item in history(start).items() if "train/loss" in item)
    assert steps == [r["step"] for r in records(run_dir) if "train/loss" in r] and steps[-1] == 16


def tree(pid: int) -> list[int]:
    """pid and every process under it."""
    children = defaultdict(list)
    for entry in Path("/proc").iterdir():
        try:
            children[int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])].append(int(entry.name))
        except (ValueError, OSError):
            pass
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children[found[-1]]
    return found


def test_a_signal_to_every_process_of_the_job_still_saves_a_checkpoint(tmp_path):
    """Slurm's preemption and scancel signal every process of the job, W&B's service process too: the run goes on
    without W&B to the checkpoint of its stop, and says so once."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([str(LAUNCH), TINY, "--cpu", "--procs", "2", "--wandb", "offline", "--run-dir", run_dir,
                             "--max-steps", "200", "--log-every", "1", "--slow", "0.1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env(), cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").exists() and sum("train/loss" in r for r in records(run_dir)) >= 2):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    processes = tree(proc.pid)
    assert any(b"wandb-core" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in processes)
    for pid in processes:
        os.kill(pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out, err)
    assert re.search(r"launch: stopped by SIGTERM at step \d+: saved checkpoint ", err), err
    assert err.count("launch: warning: W&B stopped at step ") == 1 and "Traceback" not in out + err, err
    assert json.loads((run_dir / "summary.json").read_text())["state"] == "stopped"
