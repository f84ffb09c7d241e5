"""docker/Dockerfile, checked without Docker: there is no Docker engine on the test machines (and no way
to pull the CUDA base image), so the image is never built here. What is checked: the base image carries
the torch that pyproject pins, the image installs this project and pins nothing of its own, the
entrypoint is the `launch` command, and the files it copies are enough to train and render a job."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import clean_env, ok

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PINS = dict(re.fullmatch(r"([\w-]+)==([\w.]+)", d).groups() for d in PROJECT["dependencies"])


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "docker" / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_the_base_image_is_pytorchs_cuda_runtime_with_the_pinned_torch():
    steps = instructions()
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)
    assert ("FROM", "${BASE}") in steps
    match = re.fullmatch(r"pytorch/pytorch:([\d.]+)-cuda[\d.]+-cudnn\d+-runtime", args["BASE"])
    assert match, f"not an official PyTorch CUDA runtime image: {args['BASE']}"
    assert match.group(1) == PINS["torch"], f"the image brings torch {match.group(1)}, pyproject pins {PINS['torch']}"
    # the devel image the comments suggest for compiling DeepSpeed ops carries the same torch
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert set(re.findall(r"pytorch/pytorch:([\d.]+)-", text)) == {PINS["torch"]}


def test_the_image_installs_this_project_and_pins_nothing_of_its_own():
    runs = [a for kind, a in instructions() if kind == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert installs == ["pip install -e ."], installs  # every version comes from pyproject
    assert not any("==" in r for r in runs)
    copies = [a.split() for kind, a in instructions() if kind == "COPY"]
    order = [kind for kind, _ in instructions()]
    assert order.index("COPY") < order.index("RUN")  # pyproject is in place before pip runs
    for *sources, _ in copies:
        for source in sources:
            assert (ROOT / source).exists(), source


def test_the_entrypoint_is_the_launch_command():
    entry = [a for kind, a in instructions() if kind == "ENTRYPOINT"]
    assert [json.loads(e) for e in entry] == [["launch"]]  # exec form: signals reach launch itself
    assert PROJECT["scripts"]["launch"] == "launcher.boot:launch"
    from launcher.boot import launch
    assert callable(launch)


def test_what_the_image_copies_is_enough_to_train_and_render_a_job(tmp_path):
    """The COPY lines' files alone, in a folder like /opt/launcher, run a recipe and render a Slurm job."""
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert {".git", ".venv", "runs"} <= set(ignored)
    image = tmp_path / "opt-launcher"
    for kind, a in instructions():
        if kind == "COPY":
            *sources, _ = a.split()
            for source in sources:
                assert not any(Path(source.rstrip("/")).match(p) for p in ignored), source
                target = image / source.rstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                copy = shutil.copytree if (ROOT / source).is_dir() else shutil.copy
                copy(ROOT / source, target, **({"dirs_exist_ok": True} if copy is shutil.copytree else {}))
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    env = clean_env(PYTHONPATH=str(image))
    where = subprocess.run([sys.executable, "-c", "import launcher.processes.slurm as s; print(s.TEMPLATE)"], env=env,
                           cwd=workspace, capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(image / "slurm" / "launch.sbatch")  # the copy runs, not this checkout
    run = [sys.executable, "-m", "launcher", str(image / "recipes" / "digits.py"), "--cpu", "--wandb", "disabled"]
    trained = ok(subprocess.run([*run, "--max-steps", "3", "--run-dir", "run"], cwd=workspace, env=env,
                                capture_output=True, text=True, timeout=300))
    assert "done: 3 steps" in trained.stdout and (workspace / "run" / "metrics.jsonl").exists()
    script = ok(subprocess.run([*run, "--slurm", "--dry-run", "--run-dir", "job"], cwd=workspace, env=env,
                               capture_output=True, text=True, timeout=300)).stdout
    assert script.startswith("#!/bin/bash") and f'"$resume" {image / "recipes" / "digits.py"} --cpu' in script
