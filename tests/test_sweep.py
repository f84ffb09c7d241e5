"""launch sweep: trials that are ordinary runs, ranked by `launch status`, resumed by rerunning the command."""

import json
import math
import os
import signal
import subprocess
import time

import pytest
from PIL import Image

from conftest import LAUNCH, TINY, clean_env, launch, ok, records, refused
from launcher.cli import leaderboard, search, sweep
from launcher.runs.files import write_json

SEARCH = ["--lr", "log:1e-3:1e-1", "--momentum", "0.5:0.9", "--epochs", "1:3"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A 4-trial random sweep of the tiny recipe, two trials at once on a core each: (folder, its output)."""
    folder = tmp_path_factory.mktemp("sweep") / "lr"
    out = ok(launch("sweep", TINY, "--cpu", "--wandb", "disabled", "--trials", "4", "--max-parallel", "2",
                    "--run-dir", folder, *SEARCH))
    return folder, out


def test_a_random_sweep_runs_each_trial_as_a_run_and_ranks_them(searched):
    folder, out = searched
    planned = json.loads((folder / "sweep.json").read_text())["trials"]
    assert len(planned) == 4
    for index, values in enumerate(planned):
        assert f"launch: trial {index} completed, best val/loss " in out.stdout
        lr, momentum, epochs = values["--lr"], values["--momentum"], values["--epochs"]
        assert 1e-3 <= lr <= 1e-1 and float(f"{lr:.3g}") == lr  # drawn inside, kept to 3 significant digits
        assert 0.5 <= momentum <= 0.9 and isinstance(epochs, int) and 1 <= epochs <= 3
        run = folder / f"trial-{index}"
        hparams = json.loads((run / "config.json").read_text())["plan"]["hparams"]
        assert (hparams["lr"], hparams["momentum"], hparams["epochs"]) == (lr, momentum, epochs)  # it ran with them
        assert json.loads((run / "summary.json").read_text())["state"] == "completed"
    assert len({v["--lr"] for v in planned}) == 4  # drawn, not repeated

    rows = [json.loads(line) for line in ok(launch("status", folder, "--json")).stdout.splitlines()]
    best = {r["trial"]: r["best"]["value"] for r in rows}
    assert list(best.values()) == sorted(best.values())  # val/loss: the smallest first
    for r in rows:  # each row is that trial's summary, with its values
        summary = json.loads((folder / f"trial-{r['trial']}" / "summary.json").read_text())
        assert r["best"] == summary["best"] and r["values"] == planned[r["trial"]]
    table = ok(launch("status", folder)).stdout.splitlines()
    assert table[1].split() == ["TRIAL", "STATE", "lr", "momentum", "epochs", "BEST", "val/loss", "(min)", "STEP"]
    assert [int(line.split()[0]) for line in table[2:6]] == [r["trial"] for r in rows]
    assert out.stdout.count("\nTRIAL  STATE") == 1  # the sweep ends with the same table
    for name in ("lr", "momentum", "epochs"):
        with Image.open(folder / "pictures" / f"{name}.png") as image:
            assert image.width >= 400 and len(image.convert("L").getcolors(maxcolors=1 << 16)) > 20, name


def test_the_draws_come_from_the_seed(searched, tmp_path):
    folder, _ = searched
    argv = [str(TINY), "--cpu", "--trials", "4", "--run-dir", str(tmp_path / "again"), *SEARCH]
    assert search.plan(argv)[0].trials == json.loads((folder / "sweep.json").read_text())["trials"]
    other = search.plan([*argv, "--sweep-seed", "1"])[0].trials
    assert other != search.plan(argv)[0].trials and all(1e-3 <= t["--lr"] <= 1e-1 for t in other)


def test_a_grid_takes_the_product_of_its_lists(tmp_path):
    trials = search.plan([str(TINY), "--cpu", "--grid", "--lr", "0.01,0.1", "--batch-size", "8,16,24",
                         "--run-dir", str(tmp_path)])[0].trials
    assert trials == [{"--lr": lr, "--batch-size": b} for lr in (0.01, 0.1) for b in (8, 16, 24)]


def test_a_stopped_sweep_continues_where_it_stopped(tmp_path):
    """Ctrl-C during the second of three trials: the running trial saves a checkpoint; the same command again keeps
    the first, resumes the second from its checkpoint and runs the third."""
    folder = tmp_path / "sweep"
    command = [str(LAUNCH), "sweep", str(TINY), "--cpu", "--wandb", "disabled", "--slow", "0.15", "--grid",
               "--lr", "0.01,0.03,0.1", "--run-dir", str(folder)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    deadline = time.monotonic() + 120
    second = folder / "trial-1" / "metrics.jsonl"
    while not (second.exists() and any(r.get("step", 0) >= 3 for r in records(second.parent))):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "launch: sweep stopped by SIGINT; the same command continues it" in err
    stopped = json.loads((folder / "trial-1" / "summary.json").read_text())
    assert stopped["state"] == "stopped" and "saved checkpoint" in stopped["reason"]
    assert not (folder / "trial-2").exists()
    first = (folder / "trial-0" / "summary.json").read_text()

    again = ok(subprocess.run(command, capture_output=True, text=True, env=clean_env(), timeout=300))
    assert "launch: 1 of 3 trials completed before; running the other 2" in again.stdout
    assert "trial 0 started" not in again.stdout
    assert (folder / "trial-0" / "summary.json").read_text() == first
    resumed = (folder / "trial-1" / "console.log").read_text()
    assert f"resuming from {folder / 'trial-1' / 'checkpoints'}" in resumed, resumed
    for index in range(3):
        assert json.loads((folder / f"trial-{index}" / "summary.json").read_text())["state"] == "completed"


def scored(tmp_path, specs: list[dict], trials: list[dict], values: list[float | None], mode: str = "min") -> str:
    """`launch status` of a sweep folder made by hand: each trial's best value (None: no result yet)."""
    write_json(tmp_path / "sweep.json", {"recipe": str(TINY), "fixed": [], "specs": specs, "trials": trials,
                                         "name": "hand", "best": ["val/acc", mode]})
    for index, value in enumerate(values):
        best = {"metric": "val/acc", "value": value, "step": 10} if value is not None else None
        (tmp_path / f"trial-{index}").mkdir()
        write_json(tmp_path / f"trial-{index}" / "summary.json",
                   {"state": "completed" if value is not None else "running", "best": best})
    return leaderboard.status_text(tmp_path)


LR = {"flag": "--lr", "text": "log:1e-4:1", "values": None, "low": 1e-4, "high": 1.0, "log": True, "integer": False}
BATCH = {"flag": "--batch-size", "text": "8,16,32", "values": [8, 16, 32], "low": None, "high": None, "log": False,
         "integer": False}


@pytest.mark.parametrize("lrs,accs,warned", [
    ([0.001, 0.01, 0.1], [0.5, 0.6, 0.9], "largest --lr tried (0.1)"),
    ([0.001, 0.01, 0.1], [0.9, 0.6, 0.5], "smallest --lr tried (0.001)"),
    ([0.001, 0.01, 0.1], [0.5, 0.9, 0.6], None),  # the best inside what was tried
    ([0.001, 0.1], [0.5, 0.9], None),  # two values say nothing of a range
    ([0.001, 0.01, 0.1], [0.5, 0.6, None], None),  # the largest has no result yet: two scored
], ids=["top-edge", "bottom-edge", "inside", "too-few", "unscored"])
def test_the_edge_warning_names_the_side_where_the_best_sits(tmp_path, lrs, accs, warned):
    text = scored(tmp_path, [LR], [{"--lr": lr} for lr in lrs], accs, mode="max")
    found = [line for line in text.splitlines() if line.startswith("warning:")]
    assert found == ([f"warning: the best val/acc came with the {warned}: the best value may lie beyond the range; "
                      "search further that way"] if warned else []), text


def test_a_grid_warns_per_searched_flag_and_ranks_unscored_trials_last(tmp_path):
    trials = [{"--lr": lr, "--batch-size": b} for lr in (0.001, 0.01, 0.1) for b in (8, 16, 32)]
    accs = [0.1 * (i % 3) + 0.01 * (i // 3) for i in range(9)]  # best: the largest batch, the largest lr
    accs[4] = None
    text = scored(tmp_path, [LR, BATCH], trials, accs, mode="max")
    assert "the largest --lr tried (0.1)" in text and "the largest --batch-size tried (32)" in text
    order = [line.split()[0] for line in text.splitlines()[2:11]]
    assert order[0] == "8" and order[-1] == "4", text
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == ["batch-size.png", "lr.png"]


@pytest.mark.parametrize("argv,message", [
    (["--trials", "2", "--nope", "1,2"], "unknown flag --nope (did you mean --noise?)"),
    (["--trials", "2", "--lr", "0.1:0.01"], "--lr 0.1:0.01: the range's ends are swapped (LOW:HIGH with LOW < HIGH)"),
    (["--trials", "2", "--lr", "log:0:1"], "--lr log:0:1: a log range must lie above zero"),
    (["--trials", "2", "--lr", "0.1,abc"], "--lr 0.1,abc: 'abc' is not a value --lr takes"),
    (["--trials", "2", "--epochs", "1.5:3"], "--epochs 1.5:3: '1.5' is not a value --epochs takes"),
    (["--trials", "2", "--schedule", "cosine,linear"],
     "--schedule cosine,linear: 'linear' is not one of constant, cosine"),
    (["--trials", "2", "--dump-dir", "log:a:b"], "--dump-dir log:a:b: a range needs a flag that takes a number"),
    (["--grid", "--trials", "2", "--lr", "1,2"],
     "give --trials N (random search) or --grid (every combination of the lists), one of them"),
    (["--lr", "1,2"], "give --trials N (random search) or --grid (every combination of the lists), one of them"),
    (["--grid", "--lr", "0.1:1"], "--lr 0.1:1: --grid takes lists (A,B,C); a range is drawn from with --trials N"),
    (["--trials", "0", "--lr", "1,2"], "--trials and --max-parallel must be at least 1"),
    (["--trials", "2", "--lr", "0.1"],
     "nothing to search: give at least one SPEC (--FLAG A,B,C, --FLAG LOW:HIGH or --FLAG log:LOW:HIGH)"),
    (["--grid", "--lr", "1,2", "--lr", "3,4"], "--lr is searched twice"),
    (["--grid", "--lr", "1,1"], "--lr 1,1: a value is listed twice"),
    (["--grid", "--epochs", "0,1"], "--epochs must be at least 1, not 0"),  # a trial's own check, as launch's
    (["--grid", "--lr", "1,2", "--name", "x", "--resume", "auto"], "--resume: a sweep sets it for each trial"),
    (["--grid", "--slurm", "--procs", "1,2", "--lr", "1"],
     "--procs cannot be searched with --slurm: every task of the job array has one allocation"),
    (["--grid", "--cpu", "--max-parallel", "3", "--lr", "1,2"],
     "--max-parallel 3 × 1 process per trial needs 3 CPU cores; this machine gives 2"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None)
def test_a_bad_sweep_is_one_line_and_exit_2(capsys, tmp_path, argv, message):
    if "--max-parallel" in argv and len(os.sched_getaffinity(0)) != 2:
        pytest.skip("the message counts this machine's 2 cores")
    line = refused(capsys, "sweep", TINY, "--wandb", "disabled", "--run-dir", tmp_path / "sweep", *argv)
    assert line == f"launch: error: {message}"
    assert not (tmp_path / "sweep" / "trial-0").exists()


def test_a_folder_holding_another_sweep_is_refused(capsys, searched):
    folder, _ = searched
    line = refused(capsys, "sweep", TINY, "--cpu", "--wandb", "disabled", "--trials", "3", "--run-dir", folder,
                   *SEARCH)
    assert line.startswith(f"launch: error: --run-dir {folder} holds another sweep")


def test_a_dry_run_prints_the_trials_and_starts_nothing(capsys, tmp_path):
    code = sweep.main([str(TINY), "--cpu", "--trials", "3", "--lr", "log:1e-3:1e-1", "--run-dir",
                       str(tmp_path / "s"), "--dry-run"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and out[0] == f"launch: sweep s: 3 trials in {tmp_path / 's'}" and out[1].split() == [
        "TRIAL", "lr"]
    assert [line.split()[0] for line in out[2:]] == ["0", "1", "2"]
    assert all(1e-3 <= float(line.split()[1]) <= 1e-1 and not math.isnan(float(line.split()[1])) for line in out[2:])
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("gpus,parallel,visible", [
    (1, None, [str(i) for i in range(8)]),
    (2, None, ["0,1", "2,3", "4,5", "6,7"]),
    (2, 3, ["0,1", "2,3", "4,5"]),
    (2, 5, "--max-parallel 5: 8 GPUs give 4 trials of 2 at once"),
], ids=["one-gpu-each", "two-gpus-each", "three-at-once", "more-than-fit"])
def test_gpu_trials_run_side_by_side_each_on_its_own_gpus(monkeypatch, tmp_path, gpus, parallel, visible):
    """The machine's 8 GPUs are shared out among the trials that run at once. torch.cuda's count is faked: this
    machine has no GPU (the GPU proof issue's script runs the real thing)."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    planned = search.plan([str(TINY), "--gpus", str(gpus), "--precision", "fp32", "--grid", "--lr", "0.1,0.2",
                          "--run-dir", str(tmp_path)])[0]
    if isinstance(visible, str):
        with pytest.raises(sweep.UsageError, match=visible):
            sweep.places(planned, parallel)
    else:
        assert [slot["CUDA_VISIBLE_DEVICES"] for slot in sweep.places(planned, parallel)] == visible
