"""Training scripts that are not recipes, launched as they are: `launch [launcher flags] SCRIPT [its arguments]`."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import LAUNCH, ROOT, TINY, clean_env, launch, ok, refused, torchrun
from launcher.recipe import contract as recipe

SCRIPTS = ROOT / "tests" / "scripts"
DDP, ACCELERATE, ALONE, HANDLER = (SCRIPTS / name for name in ("ddp_train.py", "accelerate_train.py", "alone.py",
                                                                "handler.py"))
NOTE = "it's \"quoted\" --run-dir x  two spaces"  # a script's argument reaches it as it was, a launcher flag or not


def params(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_a_torchrun_script_trains_as_under_torchrun(tmp_path):
    """Its training runs at import, with no main guard: telling it from a recipe must not run it."""
    out = tmp_path / "with space"
    out.mkdir()
    run_dir = tmp_path / "run"
    ran = ok(launch("--cpu", "--procs", "2", "--run-dir", run_dir, DDP, "--out", out / "launch.pt", "--note", NOTE))
    reference = ok(torchrun(DDP, "--out", out / "torchrun.pt"))
    launched, expected = params(out / "launch.pt"), params(out / "torchrun.pt")
    assert launched.keys() == expected.keys() and all(torch.equal(launched[k], expected[k]) for k in expected)
    assert f"world 2 note {NOTE!r} loss " in ran.stdout
    assert ran.stdout.split("loss ")[1] == reference.stdout.split("loss ")[1]
    assert ran.stdout.startswith(f"launch: ddp_train.py (a script) · 2 CPU processes (gloo) · fp32 · run dir {run_dir}")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["command"] == ["--cpu", "--procs", "2", str(DDP), "--out", str(out / "launch.pt"), "--note", NOTE]
    assert config["environment"]["PATH"] == os.environ["PATH"]
    assert json.loads((run_dir / "summary.json").read_text())["state"] == "completed"
    assert f"note {NOTE!r}" in (run_dir / "console.log").read_text()  # rank 0's output
    assert (run_dir / "logs" / "rank-1.out").exists()


def test_an_accelerate_script_takes_the_launchers_choices(tmp_path):
    """An unmodified Accelerator() reads the processes, --precision and --grad-accum from the environment, as from
    `accelerate launch`. Its reference: torchrun with the variables `accelerate launch` sets (on a machine without
    a GPU, `accelerate launch --cpu` runs one process, and --multi_gpu runs processes that never meet)."""
    ran = ok(launch("--cpu", "--procs", "2", "--precision", "bf16", "--grad-accum", "2", "--run-dir",
                    tmp_path / "run", ACCELERATE, "--out", tmp_path / "launch.pt"))
    assert "processes 2 precision bf16 accumulation 2 device cpu:0 evaluated 37" in ran.stdout
    ok(torchrun(ACCELERATE, "--out", tmp_path / "torchrun.pt", env={"ACCELERATE_USE_CPU": "True",
       "ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"}))
    launched, expected = params(tmp_path / "launch.pt"), params(tmp_path / "torchrun.pt")
    assert all(torch.equal(launched[k], expected[k]) for k in expected)


def test_a_failing_rank_ends_the_script_with_its_traceback_once(tmp_path):
    run_dir = tmp_path / "run"
    result = launch("--cpu", "--procs", "2", "--run-dir", run_dir, DDP, "--out", tmp_path / "p.pt", "--crash-rank", "1")
    assert result.returncode == 1
    shown = result.stdout + result.stderr
    assert shown.count("Traceback") == 1 and shown.count("ValueError: planted failure on rank 1") == 1, shown
    assert f'launch: rank 1 failed: Traceback (most recent call last):\n  File "{DDP}", line' in result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["state"], summary["reason"]) == ("failed", "rank 1 failed: ValueError: planted failure on rank 1")


def test_max_restarts_reruns_a_crashed_script(tmp_path):
    run_dir = tmp_path / "run"
    result = ok(launch("--cpu", "--procs", "2", "--max-restarts", "1", "--run-dir", run_dir, DDP, "--out",
                       tmp_path / "p.pt", "--crash-first-start"))
    assert "world 2" in result.stdout and (tmp_path / "p.pt").exists()
    assert (run_dir / "logs" / "rank-1.restart-1.out").exists()
    first = (run_dir / "logs" / "errors" / "rank-1.json").read_text()
    assert "RuntimeError: planted failure of the first start" in first


def test_sigterm_reaches_the_scripts_own_handler(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([str(LAUNCH), "--cpu", "--procs", "2", "--run-dir", str(run_dir), str(HANDLER),
                             "--saved", str(tmp_path / "saved")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=clean_env())
    deadline = time.monotonic() + 120
    while "training" not in (run_dir / "console.log").read_text() if (run_dir / "console.log").exists() else True:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out, err)
    assert [(tmp_path / f"saved-{rank}").read_text() for rank in (0, 1)] == ["SIGTERM", "SIGTERM"]
    assert "launch: stopped by SIGTERM: handler.py was sent it in each process" in err
    assert json.loads((run_dir / "summary.json").read_text())["state"] == "stopped"


def test_every_word_after_the_script_is_its_own_even_one_spelled_like_a_launcher_flag(tmp_path):
    """nanoGPT's `train.py --compile=False`: --compile and --debug are launcher flags that take no value, and
    --resume auto with --run-dir would make a run directory's resume; after SCRIPT they are the script's."""
    run_dir = tmp_path / "run"
    own = ["--compile=False", "--debug=1", "--resume", "auto", "--run-dir", "elsewhere", "--nproc-per-node", "3"]
    ok(launch("--cpu", "--run-dir", run_dir, ALONE, *own))
    assert json.loads((run_dir / "config.json").read_text())["command"] == ["--cpu", str(ALONE), *own]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_script_that_needs_a_gpu_is_told_so_on_a_machine_without_one(tmp_path):
    failed = launch("--cpu", "--run-dir", tmp_path / "run", SCRIPTS / "cuda_only.py")
    assert failed.returncode == 1
    assert "AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'" in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith(
        "cuda_only.py needs a GPU (it calls CUDA or NCCL) and this machine has none (torch "), failed.stderr


@pytest.mark.parametrize("procs,warned", [("2", True), ("1", False)])
def test_a_script_that_never_joins_a_process_group_is_told_so(tmp_path, procs, warned):
    result = ok(launch("--cpu", "--procs", procs, "--run-dir", tmp_path / "run", ALONE))
    warning = ("launch: warning: alone.py never joined a process group, though 2 processes were started: each "
               "trained on its own, as 2 separate runs")
    assert (warning in result.stderr) == warned and result.stderr.count("launch: warning:") == warned, result.stderr


@pytest.mark.parametrize("flags,message", [
    (["--engine", "fsdp"], "--engine fsdp with a script: its engine is its own (DDP, FSDP or DeepSpeed in its code, "
                           "or Accelerate's config); the launcher starts its processes"),
    (["--clip-grad", "1"], "--clip-grad is for a recipe, which the launcher trains; ddp_train.py is a script, which "
                           "trains itself"),
    (["--debug"], "--debug is for a recipe, which the launcher trains; ddp_train.py is a script, which trains itself"),
    (["--resume", "runs/x"], "--resume runs/x: a script resumes from its own checkpoints; --resume auto reuses its "
                             "run directory"),
    (["--procs", "2"], "--procs N needs --cpu (for GPU processes use --gpus N)"),
    (["--script-signal", "USR1"], "--script-signal goes with --slurm: it is what the script gets at Slurm's "
                                  "time-limit warning"),
    (["--slurm", "--cpu", "--script-signal", "KILL"], "--script-signal KILL: expected a signal a script can handle, "
                                                      "e.g. TERM or USR1"),
], ids=["engine", "training-flag", "debug", "resume-checkpoint", "procs-without-cpu", "script-signal-alone",
        "script-signal-kill"])
def test_a_launcher_flag_a_script_cannot_take_is_one_line_and_exit_2(capsys, tmp_path, flags, message):
    assert refused(capsys, *flags, "--run-dir", tmp_path / "run", DDP, "--out", "x") == f"launch: error: {message}"
    assert not (tmp_path / "run").exists()


def test_a_recipe_takes_no_script_signal(capsys, tmp_path):
    assert refused(capsys, TINY, "--slurm", "--cpu", "--script-signal", "USR1", "--run-dir", tmp_path / "run") == (
        "launch: error: --script-signal is for a training script; a recipe saves and stops on SIGTERM")


def test_a_recipe_is_told_from_a_script_by_its_syntax_alone(tmp_path):
    cases = {
        "torchrun.py": ("import torch.distributed as dist\ndist.init_process_group('gloo')\nmodel = 1\n", False),
        "functions.py": ("def data(hp):\n    pass\n\ndef model(hp):\n    pass\n", True),
        "one-function.py": ("def model():\n    return 1\n", False),
        "imported.py": ("from elsewhere import Hparams, data, model, loss\n", True),
        "broken.py": ("def (:\n", True),
    }
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        assert recipe.is_recipe(tmp_path / name) == expected, name
    for path in [*(ROOT / "recipes").glob("*.py"), TINY]:
        assert recipe.is_recipe(path), path
    for path in SCRIPTS.glob("*.py"):
        assert not recipe.is_recipe(path), path


def test_a_silent_rank_fails_the_script_after_the_collective_timeout(tmp_path):
    """--timeout is the script's collective timeout unless it gives one of its own; the rank that timed out is
    told as one that lost another, not as the cause."""
    began = time.monotonic()
    result = launch("--cpu", "--procs", "2", "--timeout", "10", "--run-dir", tmp_path / "run", SCRIPTS / "silent.py")
    assert result.returncode == 1 and time.monotonic() - began < 60
    assert "launch: rank 0 lost another rank (" in result.stderr and "Timed out waiting 10000ms" in result.stderr


def test_a_script_run_resumes_with_its_own_arguments_last(tmp_path):
    run_dir = tmp_path / "run"
    ok(launch("--cpu", "--procs", "2", "--run-dir", run_dir, DDP, "--out", tmp_path / "first.pt"))
    again = ok(launch("resume", run_dir, "--max-restarts", "1"))
    assert "world 2 note '' loss " in again.stdout and (tmp_path / "first.pt").exists()
    assert json.loads((run_dir / "config.json").read_text())["plan"]["max_restarts"] == 1
