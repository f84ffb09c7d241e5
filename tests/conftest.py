import fcntl
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from launcher.processes.env import cores

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "recipes" / "tiny.py"
LAUNCH = Path(sys.executable).parent / "launch"  # the installed console script, as a user runs it
WANDB = Path(sys.executable).parent / "wandb"
TORCHRUN = Path(sys.executable).parent / "torchrun"


def pytest_configure(config):
    # inductor compiles in the test's process: a pool of compile processes would each import torch first
    # (6 of the compile test's 36 CPU seconds)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))  # set in xdist's workers alone
    if workers:
        # each xdist worker's share of the cores, as the launcher divides them among a job's processes; a
        # one-process run would otherwise take every core beside the other worker's runs, and OpenMP's
        # threads spin on oversubscribed cores (two one-process LM runs side by side: 97 s on 2 threads
        # each, 43 s on one)
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores() // workers)))


TAG = "LAUNCHER_TEST_TAG"  # a variable a test's launch carries into every process it starts


def tagged(tag: str) -> list[int]:
    """Live processes (zombies have no environment left) that carry the tag."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"{TAG}={tag}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def clean_env(**extra) -> dict:
    """The test's environment without W&B credentials or modes inherited from the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch(*args, env=None, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCH), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env or clean_env(), cwd=cwd)


def torchrun(script: Path, *args, procs: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    """Plain torchrun, the reference a launched script is compared with. Its ranks go through torch's interpreter
    teardown, which on an oversubscribed machine aborts a finished rank now and then ("terminate called without
    an active exception": a gloo worker thread still dropping a finished collective's tensor wants the GIL while
    Python finalizes; about one run in eight with 4 ranks on 2 cores, more under load; the launcher's own script
    mode skips that teardown): such a run is run again, up to five times in all."""
    for _ in range(5):
        done = subprocess.run([str(TORCHRUN), "--nproc-per-node", str(procs), str(script), *map(str, args)],
                              capture_output=True, text=True, timeout=300, env=clean_env(**(env or {})))
        if done.returncode == 0 or "terminate called without an active exception" not in done.stderr:
            return done
    return done


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run_dir) if "train/loss" in r}


def in_process(capsys, *argv) -> tuple[int, str, str]:
    """`launch ARGV` in this process, for what ends before any training starts (a refusal, --check, a Slurm
    dry run or submission, an export): (exit code, stdout, stderr)."""
    from launcher.cli import commands

    try:
        commands.main([str(a) for a in argv])
        code = 0  # a command that ends by returning (export)
    except SystemExit as exited:
        code = exited.code
    out, err = capsys.readouterr()
    return code, out, err


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


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def console(run_dir: Path) -> list[str]:
    """The lines of the run's console.log, which nothing but whole lines may reach."""
    text = (Path(run_dir) / "console.log").read_text()
    assert "\r" not in text and text.endswith("\n"), text[-300:]
    return text.splitlines()


def eval_record(run_dir: Path, split: str) -> dict:
    """The last evaluation of a split, without its prefix."""
    found = [r for r in records(run_dir) if f"{split}/loss" in r]
    assert found, f"no {split} evaluation in {run_dir}/metrics.jsonl"
    return {k.split("/", 1)[1]: v for k, v in found[-1].items() if k.startswith(split + "/")}


# ---------------------------------------------------------------- runs and what they leave


def tiny(tmp_path: Path, name: str, *flags, procs: int = 1, check: bool = True, dump: bool = True):
    """Run the tiny recipe in tmp_path/name (its run directory is name/run); return (folder, result)."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    where = ["--cpu", "--procs", procs] if procs > 1 else ["--cpu"]
    dumping = ["--dump-dir", folder] if dump else []
    result = launch(TINY, *where, "--wandb", "disabled", "--run-dir", folder / "run", *dumping, *flags)
    return folder, ok(result) if check else result


UNSTOPPED = ("--max-steps", "16", "--noise", "0.1", "--log-every", "4")  # noise: every rank's generator counts


@pytest.fixture(scope="session")
def unstopped(tmp_path_factory):
    """The run that the checkpoint, signal and restart tests stop and resume, unstopped, on 1 or 2 processes:
    (folder, result), made once each."""
    made = {}

    def run(procs: int):
        if procs not in made:
            made[procs] = tiny(tmp_path_factory.mktemp(f"unstopped-{procs}"), "straight", *UNSTOPPED, procs=procs)
        return made[procs]
    return run


def rehash(checkpoint: Path) -> None:
    """Make the manifest agree with whatever the files now hold, as an attacker would."""
    import hashlib

    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (checkpoint / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def plant(file: Path, marker: Path, key: str = "optimizer_state_dict") -> None:
    """A torch file shaped like a checkpoint's ({KEY: ...}) whose pickle runs `touch MARKER` when it is unpickled with
    code allowed (the tiny recipe's Exploit), in the newest protocol, as a crafted file would be."""
    import pickle

    from launcher.recipe import contract as recipe

    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "wb") as f:
        torch.save({key: recipe.load(TINY).Exploit(marker)}, f, pickle_protocol=pickle.HIGHEST_PROTOCOL)


def params(dump_dir: Path, rank: int, tag: str = "final") -> dict[str, torch.Tensor]:
    return torch.load(dump_dir / f"rank{rank}-{tag}.pt", weights_only=True)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_close(a: dict, b: dict, rtol: float, atol: float = 1e-7) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def history(run: Path) -> dict[int, dict]:
    """Every value W&B recorded, merged per step."""
    out = subprocess.run([str(WANDB), "leet", "inspect", "--json", str(run)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    steps = defaultdict(dict)
    for line in out.splitlines():
        record = json.loads(line)
        if record["type"] == "history":
            item = record["history"]["item"]
            steps[item["_step"]].update(item)
    return dict(steps)


def cifar_source() -> Path | None:
    where = os.environ.get("CIFAR10_DIR")
    return Path(where) if where and Path(where).exists() else None


@pytest.fixture(scope="session")
def cifar_cache(tmp_path_factory) -> Path:
    """A --cache-dir holding the real CIFAR-10 decoded (10 s or more), made once for every test and every xdist
    worker: they share the parent of their temporary folders, and the first to come decodes under a lock."""
    from launcher.recipe import contract as recipe

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    cache = shared / "cifar-cache"
    cache.mkdir(exist_ok=True)
    with open(shared / "cifar-cache.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cifar = recipe.load(ROOT / "recipes" / "cifar.py")
        cifar.cached(cifar.Hparams(data_dir=str(cifar_source()), cache_dir=str(cache)))
    return cache
