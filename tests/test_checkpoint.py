"""Checkpoints through the real CLI: exact resume, keep/best, and checkpoints that must not be trusted."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import (
    LAUNCH,
    ROOT,
    TINY,
    UNSTOPPED,
    assert_same,
    clean_env,
    eval_record,
    ok,
    params,
    plant,
    records,
    refused,
    rehash,
    tiny,
)
from launcher.runs import checkpoint


@pytest.mark.parametrize("procs", [1, 2])
@pytest.mark.parametrize("k", [3, 8], ids=["stop-in-first-epoch", "stop-in-second-epoch"])
def test_stop_at_k_and_resume_equals_the_uninterrupted_run(tmp_path, unstopped, procs, k):
    """6 steps per epoch; Gaussian input noise draws from every rank's generator, so the random state must
    come back too, not only weights, optimizer, schedule and data position."""
    common = UNSTOPPED
    straight, _ = unstopped(procs)
    crash_rank = str(procs - 1)
    stopped, result = tiny(tmp_path, "stopped", *common, "--save-every", str(k), "--crash-at", str(k + 1),
                           "--crash-rank", crash_rank, procs=procs, check=False)
    assert result.returncode == 1 and "planted crash" in result.stderr
    assert (stopped / "run" / "checkpoints" / f"step-{k:08d}").is_dir()
    _, resumed = tiny(tmp_path, "stopped", *common, "--save-every", str(k), "--crash-at", str(k + 1),
                      "--crash-rank", crash_rank, "--resume", "auto", procs=procs)
    assert f"resumed from {stopped / 'run' / 'checkpoints' / f'step-{k:08d}'} at step {k}" in resumed.stdout
    for rank in range(procs):
        assert_same(params(stopped, rank), params(straight, 0))
    steps = [r["step"] for r in records(stopped / "run") if "train/loss" in r]
    assert steps == sorted(set(steps))  # the resumed run's log has no repeated or missing records


def test_save_every_keeps_the_newest_and_the_best_apart(tmp_path):
    folder, _ = tiny(tmp_path, "keep", "--max-steps", "12", "--save-every", "2", "--keep", "2", "--eval-every", "2")
    checkpoints = folder / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "step-00000010", "step-00000012"]
    evals = [r for r in records(folder / "run") if "val/loss" in r]
    best = min(evals, key=lambda r: r["val/loss"])
    assert json.loads((checkpoints / "best" / "manifest.json").read_text())["step"] == best["step"]
    state = torch.load(checkpoints / "best" / "state.pt", weights_only=True)
    assert state["progress"]["best"][0] == pytest.approx(best["val/loss"])


def test_a_checkpoint_crafted_to_run_code_is_refused(tmp_path, capsys):
    folder, _ = tiny(tmp_path, "victim", "--max-steps", "2", dump=False)
    checkpoint = folder / "run" / "checkpoints" / "step-00000002"
    marker = tmp_path / "pwned"
    plant(checkpoint / "state.pt", marker, key="model")
    rehash(checkpoint)
    assert refused(capsys, TINY, "--cpu", "--wandb", "disabled", "--run-dir", tmp_path / "next", "--resume",
                   checkpoint) == (
        f"launch: error: --resume: {checkpoint / 'state.pt'} cannot be loaded safely: it refers to posix.system, "
        "which is neither a tensor nor plain data (a crafted or foreign file?); nothing in it was run")
    assert not marker.exists()


def test_resuming_from_another_run_never_writes_over_a_third(tmp_path, capsys):
    folder, _ = tiny(tmp_path, "source", "--max-steps", "2", dump=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")  # a run directory that holds a run
    assert "already holds a run" in refused(capsys, TINY, "--cpu", "--wandb", "disabled", "--run-dir",
                                            tmp_path / "other", "--resume",
                                            folder / "run" / "checkpoints" / "step-00000002")


def test_a_truncated_checkpoint_is_named_and_auto_resume_falls_back(tmp_path, capsys):
    common = ("--max-steps", "8", "--save-every", "2", "--keep", "0")
    folder, _ = tiny(tmp_path, "run", *common, "--max-steps", "6", dump=False)
    newest = folder / "run" / "checkpoints" / "step-00000006"
    data = (newest / "state.pt").read_bytes()
    (newest / "state.pt").write_bytes(data[: len(data) // 2])

    assert refused(capsys, TINY, "--cpu", "--wandb", "disabled", "--run-dir", tmp_path / "other", "--resume",
                   newest) == (f"launch: error: --resume: {newest / 'state.pt'} is truncated or damaged: "
                               f"{len(data) // 2} bytes, the manifest says {len(data)}")

    _, resumed = tiny(tmp_path, "run", *common, "--resume", "auto", dump=False)
    assert f"{newest / 'state.pt'} is truncated or damaged" in resumed.stderr
    assert "falling back to an earlier checkpoint" in resumed.stderr
    assert "resumed from" in resumed.stdout and "step-00000004 at step 4" in resumed.stdout
    assert eval_record(folder / "run", "test")["count"] == 23


def test_resume_auto_starts_fresh_without_a_checkpoint_and_stops_when_done(tmp_path):
    folder, first = tiny(tmp_path, "fresh", "--max-steps", "4", "--resume", "auto", dump=False)
    assert "resuming from" not in first.stdout and "starting fresh" not in first.stdout
    _, again = tiny(tmp_path, "fresh", "--max-steps", "4", "--resume", "auto", dump=False)
    assert "nothing to do: the run already finished its 4 steps" in again.stdout
    shutil.rmtree(folder / "run" / "checkpoints")
    _, fresh = tiny(tmp_path, "fresh", "--max-steps", "4", "--resume", "auto", dump=False)
    assert f"no checkpoint in {folder / 'run'}: starting fresh" in fresh.stdout


def refused_run(tmp_path, *flags) -> str:
    """The last line of a start of the tiny recipe that must be refused (exit 2) before anything starts."""
    result = subprocess.run([str(LAUNCH), str(TINY), "--cpu", "--wandb", "disabled", "--run-dir",
                             str(tmp_path / "refused"), *map(str, flags)], capture_output=True, text=True,
                            env=clean_env(), timeout=120)
    assert result.returncode == 2, result.stderr
    return result.stderr.splitlines()[-1]


def test_a_checkpoint_from_before_the_shards_still_resumes_exactly(tmp_path):
    """tests/data/checkpoint-v1: the whole state in state.pt, as the launcher wrote it before DCP. Resumed at step 4,
    the run ends bit for bit as an uninterrupted one; its next checkpoint is sharded."""
    old = tmp_path / "run" / "checkpoints" / "step-00000004"
    shutil.copytree(Path(__file__).parent / "data" / "checkpoint-v1", old)
    straight, _ = tiny(tmp_path, "straight", "--max-steps", "6", dump=True)
    resumed, result = tiny(tmp_path, "resumed", "--max-steps", "6", "--resume", old, dump=True)
    assert f"resumed from {old} at step 4" in result.stdout
    assert_same(params(resumed, 0), params(straight, 0))
    newest = resumed / "run" / "checkpoints" / "step-00000006"
    assert json.loads((newest / "manifest.json").read_text())["sharded"] and (newest / "sharded").is_dir()
    other = refused_run(tmp_path, "--engine", "fsdp", "--resume", old)
    assert other == (f"launch: error: {old} was written by --engine ddp before checkpoints were sharded: resume it "
                     f"with that engine, or take its weights with `launch export {old}`")


@pytest.mark.slow
def test_kill_9_during_an_asynchronous_save_leaves_the_previous_checkpoint_to_resume_from(tmp_path):
    """FSDP on 2 processes writes 200 MB checkpoints in the background; the job is killed -9 (launcher and
    workers) while one is being written. What is in checkpoints/ is complete or is not a checkpoint: the newest
    complete one verifies, the resume starts from it, removes the unfinished write and runs to the end."""
    run = tmp_path / "run"
    argv = [LAUNCH, ROOT / "recipes" / "digits.py", "--cpu", "--procs", "2", "--engine", "fsdp", "--hidden", "4096",
            "--save-every", "2", "--max-steps", "10", "--log-every", "2", "--wandb", "disabled", "--run-dir", run]
    job = subprocess.Popen(list(map(str, argv)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=clean_env(), start_new_session=True)
    folder, deadline = checkpoint.folder(run), time.monotonic() + 240
    writing = []
    while not writing and job.poll() is None and time.monotonic() < deadline:
        # a later save in flight once step 2's is complete: its shards begun, its manifest not yet written
        if (folder / "step-00000002" / "manifest.json").exists():
            writing = [p for p in folder.glob(".step-*.tmp") if (p / "sharded").is_dir()
                       and not (p / "manifest.json").exists()]
        time.sleep(0.002)
    os.killpg(job.pid, signal.SIGKILL)
    job.communicate(timeout=60)
    assert writing, "no asynchronous save was seen in flight"
    for step_dir in checkpoint.step_dirs(run):  # each one there is whole: the one being written did not count
        checkpoint.verify(step_dir)
    newest = checkpoint.step_dirs(run)[0]
    resumed = ok(subprocess.run(list(map(str, [*argv, "--resume", "auto"])), capture_output=True, text=True,
                                env=clean_env(), timeout=300))
    assert f"resumed from {newest} at step {int(newest.name[5:])}" in resumed.stdout
    assert "done: 10 steps" in resumed.stdout
    assert not list(folder.glob(".*.tmp"))
