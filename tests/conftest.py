import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "recipes" / "tiny.py"
LAUNCH = Path(sys.executable).parent / "launch"  # the installed console script, as a user runs it


def clean_env(**extra) -> dict:
    """The test's environment without W&B credentials or modes inherited from the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch(*args, env=None, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCH), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env or clean_env(), cwd=cwd)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run_dir) if "train/loss" in r}


def in_process(capsys, *argv) -> tuple[int, str, str]:
    """`launch ARGV` in this process, for what ends before any training starts (a refusal, --check, a Slurm
    dry run or submission): (exit code, stdout, stderr)."""
    import pytest

    from launcher import cli

    with pytest.raises(SystemExit) as exited:
        cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def refused(capsys, *argv) -> str:
    """`launch ARGV` in this process, which must refuse it before starting anything: exit 2 and one line on
    stderr, which this returns. No warning either: the installed command would print it above that line."""
    import warnings

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        code, _, err = in_process(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("launch: error: "), err
    assert not warned, [str(w.message) for w in warned]
    return err.strip()


def eval_record(run_dir: Path, split: str) -> dict:
    """The last evaluation of a split, without its prefix."""
    found = [r for r in records(run_dir) if f"{split}/loss" in r]
    assert found, f"no {split} evaluation in {run_dir}/metrics.jsonl"
    return {k.split("/", 1)[1]: v for k, v in found[-1].items() if k.startswith(split + "/")}
