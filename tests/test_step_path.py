"""The per-step path does per step only what a step needs: its Python calls counted, not timed (the time is
benchmarks/overhead.py's, beside the hand-written loop). What a recipe gives is checked on its first step; a
later step walks no batch tree, inspects nothing, and calls the launcher's own functions a fixed number of
times."""

import sys
from collections import Counter
from pathlib import Path

import pytest

import launcher
from conftest import ROOT
from launcher.cli import run as cli
from launcher.engines import group
from launcher.runs import files, record
from launcher.train.loop import Trainer

MLP = ROOT / "benchmarks" / "mlp.py"
PACKAGE = str(Path(launcher.__file__).parent)
# the launcher's functions a step of one micro-batch of (x, y) tensors calls, the optimizer step and clip aside:
# the loop's step and after-step, the batch's fetch, the default step, the engine's backward and update, the
# telemetry's wait, FLOP counter and record, the schedule's factor per parameter group, the three `due`s
BUDGET = 23


def trainer(tmp_path: Path, *flags) -> tuple[Trainer, object]:
    plan, recipe, hp, _ = cli.parse([str(MLP), "--cpu", "--clip-grad", "1.0", "--max-steps", "1000", "--log-every",
                                     "1000", "--wandb", "disabled", "--run-dir", str(tmp_path / "run"),
                                     "--no-pictures", *flags])
    Path(plan.run_dir).mkdir()
    files.write_json(Path(plan.run_dir) / "config.json", record.record(plan))
    ours = Trainer(plan, group.accelerator(plan), recipe, hp)
    return ours, ours.epoch_batches(0, 0, ours.length.steps_per_epoch)


def calls(ours: Trainer, batches, steps: int) -> tuple[Counter, Counter]:
    """(the launcher's functions, every module's functions) called in `steps` steps after the first, by name."""
    mine, every = Counter(), Counter()

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            every[Path(code.co_filename).stem] += 1
            if code.co_filename.startswith(PACKAGE):
                mine[f"{Path(code.co_filename).name}:{code.co_name}"] += 1

    ours.train_step(batches)  # the first step checks what the recipe gave
    ours.after_step()
    sys.setprofile(profile)
    try:
        for _ in range(steps):
            ours.train_step(batches)
            ours.after_step()
    finally:
        sys.setprofile(None)
    return mine, every


@pytest.mark.parametrize("flags", [("--no-health",), ()], ids=["no-health", "health"])
def test_a_step_calls_the_launcher_a_fixed_number_of_times_and_walks_nothing(tmp_path, flags):
    ours, batches = trainer(tmp_path, *flags)
    assert ours.every > 30  # the 30 steps below hold no sampled health check
    short, _ = calls(ours, batches, 10)
    long, every = calls(ours, batches, 20)
    assert sum(long.values()) == 2 * sum(short.values())  # per step, the same: nothing grows with the run
    per_step = sum(long.values()) / 20
    assert per_step <= BUDGET, sorted(long.items())
    for walk in ("data.py:tree_map", "data.py:to_device", "data.py:describe", "steps.py:scalar", "steps.py:read",
                 "guards.py:first_output", "guards.py:unused_parameters", "preflight.py:preflight"):
        assert walk not in long, walk
    assert not every["inspect"] and not every["dataclasses"], every
