"""Training through the real CLI, with real processes over gloo: what ranks end with, and what gets logged."""

import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.classification import (
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from tqdm import tqdm

from conftest import (
    ROOT,
    TINY,
    assert_close,
    cifar_source,
    clean_env,
    console,
    eval_record,
    history,
    in_process,
    launch,
    ok,
    params,
    records,
    summary,
    train_records,
)
from launcher import progress
from launcher.plan import PLAN_ENV, Plan
from launcher.recipe import contract as recipe
from launcher.runs import export
from launcher.runs import files as runfiles


def train_tiny(tmp_path: Path, name: str, *flags, procs: int = 1) -> Path:
    """Run the tiny recipe; return its dump folder (the run directory is beside it)."""
    dump = tmp_path / name
    dump.mkdir()
    where = ["--cpu", "--procs", procs] if procs > 1 else ["--cpu"]
    ok(launch(TINY, *where, "--wandb", "disabled", "--run-dir", dump / "run", "--dump-dir", dump, *flags))
    return dump


REFERENCE = ("--epochs", "2", "--batch-size", "16", "--log-every", "1")  # 12 steps of 16 samples


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The reference run on one process, which the tests below vary one flag of."""
    return train_tiny(tmp_path_factory.mktemp("single"), "single", *REFERENCE)


@pytest.fixture(scope="module")
def double(tmp_path_factory) -> Path:
    """The reference run on two processes."""
    return train_tiny(tmp_path_factory.mktemp("double"), "double", *REFERENCE, procs=2)


def test_two_processes_end_with_identical_parameters(double):
    final0, final1 = params(double, 0), params(double, 1)
    for k in final0:
        assert torch.equal(final0[k], final1[k]), k
    assert not torch.equal(final0["0.weight"], params(double, 0, "init")["0.weight"])  # it did train
    steps = train_records(double / "run")
    assert max(steps) == 2 * (96 // 16)
    assert steps[max(steps)]["train/loss"] < steps[min(steps)]["train/loss"]
    config = json.loads((double / "run" / "config.json").read_text())
    assert config["plan"]["nproc"] == 2 and config["data"]["total_steps"] == 12
    assert {"torch", "accelerate", "wandb"} <= config["versions"].keys()


def test_world_size_guard_stops_a_worker_that_would_train_alone(tmp_path):
    plan = Plan(recipe=str(TINY), hparams={"batch_size": 16, "epochs": 1}, run_dir=str(tmp_path), name="guard",
                nproc=2)
    result = subprocess.run([sys.executable, "-m", "launcher.boot"], capture_output=True, text=True, timeout=120,
                            env=clean_env(**{PLAN_ENV: plan.to_json()}))
    assert result.returncode != 0
    assert "this process sees a world of 1 process(es) but the plan has 2" in result.stderr


def test_world_size_guard_under_torchrun(tmp_path):
    """Two processes started by torchrun for a plan of three: every rank refuses, none trains."""
    plan = Plan(recipe=str(TINY), hparams={"batch_size": 15, "epochs": 1}, run_dir=str(tmp_path), name="guard",
                nproc=3)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", "0", "-m", "launcher.boot"],
                            capture_output=True, text=True, timeout=120,
                            env=clean_env(**{PLAN_ENV: plan.to_json(), "ACCELERATE_USE_CPU": "1"}))
    assert result.returncode != 0
    assert "sees a world of 2 process(es) but the plan has 3" in result.stderr + result.stdout
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("procs", [1, 2])
def test_accumulation_equals_one_big_step(tmp_path, single, double, procs):
    """K micro-steps of B/K samples give the parameters of one step of B (fp32, rtol 1e-5)."""
    one = single if procs == 1 else double
    accum = train_tiny(tmp_path, "accum", *REFERENCE, "--grad-accum", "4", procs=procs)
    assert_close(params(accum, 0), params(one, 0), rtol=1e-5)
    assert not torch.equal(params(one, 0)["2.weight"], params(one, 0, "init")["2.weight"])


def test_augment_is_told_the_epoch_of_every_micro_batch(tmp_path):
    """6 steps an epoch of 2 micro-batches, on each of 2 processes: the augment's epoch is 0 for a rank's first 12
    calls and 1 for its last 12 (the pre-flight's augmented sample comes before them, in epoch 0)."""
    dump = train_tiny(tmp_path, "told", *REFERENCE, "--noise", "0.1", "--grad-accum", "2", procs=2)
    for rank in range(2):
        told = torch.load(dump / f"rank{rank}-epochs.pt")
        assert told[-24:] == [0] * 12 + [1] * 12 and set(told[:-24]) <= {0}, (rank, told)


def test_two_processes_optimise_like_one(single, double):
    """The global batch is the same samples on 1 or N processes, so training is the same up to rounding."""
    assert_close(params(double, 0), params(single, 0), rtol=1e-5)


def test_clipping_bounds_the_update_and_logs_the_norm_before_clipping(tmp_path):
    """SGD with lr 1 and no momentum: the update is minus the (clipped) gradient."""
    flags = ("--lr", "1", "--momentum", "0", "--schedule", "constant", "--max-steps", "1", "--log-every", "1",
             "--grad-accum", "2")
    free = train_tiny(tmp_path, "free", *flags, procs=2)
    clipped = train_tiny(tmp_path, "clipped", *flags, "--clip-grad", "0.05", procs=2)

    def update_norm(dump):
        before, after = params(dump, 0, "init"), params(dump, 0)
        return torch.cat([(after[k] - before[k]).flatten() for k in before]).norm().item()

    true_norm = update_norm(free)
    assert true_norm > 0.05  # otherwise the bound would prove nothing
    assert train_records(free / "run")[1]["grad_norm"] == pytest.approx(true_norm, rel=1e-5)
    assert 0.05 * 0.999 < update_norm(clipped) <= 0.05 * (1 + 1e-5)
    assert train_records(clipped / "run")[1]["grad_norm"] == pytest.approx(true_norm, rel=1e-5)


@pytest.mark.parametrize("per_sample", [False, True], ids=["tensors", "dataloader"])
def test_evaluation_on_two_processes_equals_one(tmp_path, per_sample):
    """37 validation and 23 test samples: divisible by neither the eval batch (8) nor the world size (2)."""
    flags = ["--lr", "0", "--batch-size", "8", "--max-steps", "2"] + (["--per-sample"] if per_sample else [])
    single = train_tiny(tmp_path, "single", *flags)
    double = train_tiny(tmp_path, "double", *flags, procs=2)
    for split, size in (("val", 37), ("test", 23)):
        one, two = eval_record(single / "run", split), eval_record(double / "run", split)
        assert one["count"] == two["count"] == size  # every sample once: no padding duplicates, none dropped
        assert two["acc"] == one["acc"]
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)


def test_learning_rate_follows_optimizer_steps_on_any_number_of_processes(single, double):
    single, double = train_records(single / "run"), train_records(double / "run")
    total, warm = 12, 3  # 96 samples / 16 per step × 2 epochs; a quarter of them (tiny.py's warmup) warm up
    for step in range(1, total + 1):
        k = step - 1  # the lr used by the k-th optimizer step (counted from 0)
        expected = 0.1 * ((k + 1) / warm if k < warm else 0.5 * (1 + math.cos(math.pi * (k - warm) / (total - warm))))
        assert single[step]["lr"] == pytest.approx(expected, rel=1e-9)
        assert double[step]["lr"] == single[step]["lr"]


def test_the_embedded_recipe_learns(tmp_path):
    """The README's first command: digits, two CPU processes, ≥ 95 % test accuracy, and a healthy run: no health
    warning from start to end. What it leaves: a summary, the console's log, the test split's confusion matrix, the
    pictures, and all of it in W&B (offline) and TensorBoard, read back."""
    run = tmp_path / "run"
    out = ok(launch(ROOT / "recipes" / "digits.py", "--cpu", "--procs", "2", "--wandb", "offline", "--tensorboard",
                    "--run-dir", run))
    assert "batch 64 = 2 processes × 1 accumulation × 32 per device" in out.stdout
    started = r"^start-up [\d.]+ s: data and model [\d.]+ s · pre-flight [\d.]+ s · engine [\d.]+ s$"
    assert re.search(started, out.stdout, re.M), out.stdout
    assert eval_record(run, "test")["acc"] >= 0.95
    assert "check  pre-flight: no warning" in out.stdout and "verdict: no sign of trouble" in out.stdout
    assert "warning" not in out.stdout.replace("pre-flight: no warning", "")
    # what the run says of itself: summary.json and console.log
    done = summary(run)
    assert (done["state"], done["reason"], done["warnings"], done["verdict"]) == ("completed", None, [], [])
    assert done["step"] == done["total_steps"] == max(train_records(run))
    assert done["metrics"] == {**{f"val/{k}": v for k, v in eval_record(run, "val").items()},
                               **{f"test/{k}": v for k, v in eval_record(run, "test").items()}}
    accuracies = [(r["val/acc"], -r["step"]) for r in records(run) if "val/acc" in r]
    best, step = max(accuracies)  # digits keeps the best val/acc, the first of equals
    assert done["best"] == {"metric": "val/acc", "value": best, "step": -step}
    assert done["samples_per_s"] == train_records(run)[done["step"]]["samples_per_s"] and done["wall_s"] > 0
    assert sorted(console(run)) == sorted(out.stdout.splitlines() + out.stderr.splitlines())
    # the test split was evaluated with the best checkpoint's weights: exported, and evaluated here, they give its
    # metrics, which the last step's weights do not
    best_step = -step
    assert f"best val/acc {best:.4f} at step {best_step}  test/" in out.stdout
    assert best_step == done["step"] or f"(step {best_step}'s weights)" in out.stdout
    last = f"step-{done['step']:08d}"
    tested = {name: evaluate_digits(run / "checkpoints" / name, tmp_path) for name in ("best", last)}
    predicted = tested["best"].pop("predicted")
    assert tested["best"] == pytest.approx({"loss": done["metrics"]["test/loss"], "acc": done["metrics"]["test/acc"]},
                                           rel=1e-5)
    tested[last].pop("predicted")
    assert best_step == done["step"] or tested["best"] != tested[last]
    # the test split's confusion matrix and per-class scores are the best weights' (torchmetrics recomputes them)
    classes = next(r for r in records(run) if r.get("event") == "classes")
    truth = recipe.load(ROOT / "recipes" / "digits.py").data(None).test.tensors[1]
    assert classes["names"] == [str(i) for i in range(10)] and classes["weights_step"] == best_step
    assert classes["matrix"] == MulticlassConfusionMatrix(10)(predicted, truth).tolist()
    for name, metric in (("precision", MulticlassPrecision), ("recall", MulticlassRecall), ("f1", MulticlassF1Score)):
        assert classes[name] == pytest.approx(metric(10, average=None)(predicted, truth).tolist(), abs=1e-6), name
    # the pictures: files of a sensible size that are not blank, the same in W&B's run and in TensorBoard's files
    drawn = {path.stem: path for path in (run / "pictures").glob("*.png")}
    assert sorted(drawn) == ["classes", "confusion", "curves", "metrics"]
    assert f"pictures: curves.png, metrics.png, confusion.png, classes.png → {run / 'pictures'}" in out.stdout
    for name, path in drawn.items():
        with Image.open(path) as image:
            assert 400 <= image.width <= 2000 and 300 <= image.height <= 2000, (name, image.size)
            assert len(image.convert("L").getcolors(maxcolors=1 << 16)) > 20, f"{name}.png is (nearly) blank"
    wandb_run = next((run / "wandb").glob("offline-run-*"))
    logged = history(wandb_run)[done["step"]]
    for name, path in drawn.items():
        assert (wandb_run / "files" / logged[f"pictures/{name}.path"]).read_bytes() == path.read_bytes()
    assert logged["test/classes.nrows"] == 10
    board = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    board.Reload()
    validated = {r["step"]: r["val/acc"] for r in records(run) if "val/acc" in r}
    assert {e.step: e.value for e in board.Scalars("val/acc")} == pytest.approx(validated)
    assert [e.step for e in board.Scalars("train/loss")] == sorted(train_records(run))
    for name, path in drawn.items():
        with Image.open(path) as image:
            shown = board.Images(f"pictures/{name}")[-1]
            assert (shown.step, shown.width, shown.height) == (done["step"], image.width, image.height)


def evaluate_digits(checkpoint: Path, tmp_path: Path) -> dict:
    """The digits recipe's test loss, accuracy and predicted classes with a checkpoint's weights, exported as
    safetensors."""
    digits = recipe.load(ROOT / "recipes" / "digits.py")
    hp = digits.Hparams()
    net = digits.model(hp).eval()
    net.load_state_dict(load_file(export.export(checkpoint, tmp_path / f"{checkpoint.name}.safetensors")))
    x, y = digits.data(hp).test.tensors
    with torch.no_grad():
        logits = net(x)
    return {"loss": digits.loss(hp)(logits, y).item(), "acc": (logits.argmax(1) == y).float().mean().item(),
            "predicted": logits.argmax(1)}


def test_the_console_log_keeps_what_a_terminal_ends_up_showing(tmp_path, monkeypatch):
    """The progress bar, drawn by tqdm as on a terminal, leaves nothing in console.log, nor does an evaluation's bar
    drawn while it is open; lines written around them, and a line written in pieces, arrive whole."""
    terminal = io.StringIO()
    terminal.isatty = lambda: True
    stream = runfiles.ConsoleLog(terminal, tmp_path / "console.log")
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv("COLUMNS", "100")
    bar = tqdm(total=50, file=stream, mininterval=0, leave=False)
    for step in range(1, 51):
        bar.update()
        if step % 20 == 0:
            bar.write(f"step {step}/50  loss 0.5", file=stream)
            assert list(progress(range(4), "eval val")) == [0, 1, 2, 3]
    bar.close()
    stream.write("done: 50 ")
    stream.write("steps\r\n")
    assert "\r" in terminal.getvalue() and "50/50" in terminal.getvalue()  # the bar was drawn
    assert (tmp_path / "console.log").read_text() == "step 20/50  loss 0.5\nstep 40/50  loss 0.5\ndone: 50 steps\n"
    # a log that cannot be written (/dev/full: no space left) is given up; the console shows every line once
    terminal = io.StringIO()
    full = runfiles.ConsoleLog(terminal, Path("/dev/full"))
    for line in ("launch: error: the disk is full", "and this line too"):
        print(line, file=full, flush=True)
    assert terminal.getvalue() == "launch: error: the disk is full\nand this line too\n" and full.fd is None


def test_long_phases_draw_a_bar_on_a_terminal_alone_and_say_how_long_they_took(tmp_path, monkeypatch, capsys):
    terminal = io.StringIO()
    terminal.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.delenv("RANK", raising=False)  # the launcher's own process
    assert list(progress(range(3), "decoding", unit="image")) == [0, 1, 2]
    assert re.search(r"decoding: +0%\|.*\| 0/3", terminal.getvalue())  # drawn, then erased at the end
    for rank, tty in (("1", True), ("0", False)):  # another rank, or no terminal: nothing drawn
        monkeypatch.setenv("RANK", rank)
        terminal = io.StringIO()
        terminal.isatty = lambda tty=tty: tty
        monkeypatch.setattr(sys, "stderr", terminal)
        assert list(progress(range(3), "decoding")) == [0, 1, 2] and terminal.getvalue() == ""
    monkeypatch.undo()
    # a recipe's prepare(hp) that takes a second or more says so when it ends
    slow = tmp_path / "slow.py"
    slow.write_text(TINY.read_text() + "\n\ndef prepare(hp):\n    import time\n    time.sleep(1.1)\n")
    code, out, _ = in_process(capsys, slow, "--cpu", "--check")
    assert code == 0 and re.search(r"^launch: slow\.py prepared its data in 1\.\d s$", out, re.M), out


@pytest.mark.slow
@pytest.mark.skipif(cifar_source() is None, reason="CIFAR10_DIR does not point at CIFAR-10 (.ci/run sets it to "
                                                   "../shared/data, which holds cifar10-jpeg.tar.gz)")
def test_cifar_debug_run_on_the_shared_data(tmp_path, cifar_cache):
    run = tmp_path / "run"
    out = ok(launch(ROOT / "recipes" / "cifar.py", "--debug", "--cpu", "--width", "16", "--batch-size", "128",
                    "--run-dir", run, "--cache-dir", cifar_cache, timeout=900))
    assert "(debug)" in out.stdout
    losses = [r["train/loss"] for _, r in sorted(train_records(run).items())]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1  # the loss falls
    assert eval_record(run, "val")["acc"] > 0.15  # above chance (0.1) after 30 steps


def test_bf16_autocast_on_two_cpu_processes(tmp_path, double):
    """bf16 really runs (the result moves off fp32's), stays close, and ranks still agree exactly."""
    fp32 = params(double, 0)
    dump = train_tiny(tmp_path, "bf16", *REFERENCE, "--precision", "bf16", procs=2)
    bf16 = params(dump, 0)
    for k in bf16:
        assert torch.equal(bf16[k], params(dump, 1)[k]), k
    assert any(not torch.equal(bf16[k], fp32[k]) for k in bf16)
    assert_close(bf16, fp32, rtol=0.05, atol=0.02)


def test_per_sample_datasets_with_dataloader_workers_train_like_tensors(tmp_path, double):
    loader = train_tiny(tmp_path, "loader", *REFERENCE, "--per-sample", "--workers", "2", procs=2)
    assert_close(params(loader, 0), params(double, 0), rtol=1e-6)


def test_the_device_data_path_and_the_dataloader_path_give_the_same_run(tmp_path, double):
    """--no-device-data sends the same batches through a DataLoader with a worker: the same weights, bit for
    bit; each records the share of step time it waited for data."""
    fast = double
    loader = train_tiny(tmp_path, "loader", *REFERENCE, "--no-device-data", "--workers", "1", procs=2)
    for rank in range(2):
        for k, v in params(fast, rank).items():
            assert torch.equal(params(loader, rank)[k], v), k
    for dump in (fast, loader):
        shares = [r["data_wait"] for r in train_records(dump / "run").values()]
        assert len(shares) == 12 and all(0 <= s < 1 for s in shares)


@pytest.mark.slow
def test_compile_trains_like_eager_and_keeps_the_recipes_parameter_names(tmp_path):
    common = ("--max-steps", "6", "--batch-size", "16", "--log-every", "1")
    eager = train_tiny(tmp_path, "eager", *common)
    compiled = train_tiny(tmp_path, "compiled", *common, "--compile")
    assert_close(params(compiled, 0), params(eager, 0), rtol=1e-4, atol=1e-6)
    assert export.weights(compiled / "run" / "checkpoints" / "step-00000006").keys() == params(eager, 0).keys()
    losses = [train_records(d / "run")[1]["train/loss"] for d in (eager, compiled)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert re.search(r"^compile: the first step took [\d.]+ s$", "\n".join(console(compiled / "run")), re.M)


def test_mfu_is_the_counted_flops_over_the_peak(tmp_path):
    """The first step's forward and backward are counted (tiny: Linear 8→16, Linear 16→3; the input needs no
    gradient): 2·176 FLOPs a sample forward, 2·176 for the weight gradients, 2·48 for the hidden gradient."""
    run = tmp_path / "run"
    result = ok(launch(TINY, "--cpu", "--procs", "2", "--max-steps", "4", "--log-every", "2", "--batch-size", "16",
                       "--grad-accum", "2", "--wandb", "disabled", "--run-dir", run,
                       env={**clean_env(), "LAUNCH_PEAK_TFLOPS": "1e-6"}))
    assert "MFU " in result.stdout
    for r in train_records(run).values():
        assert r["mfu"] * 1e6 * 2 * r["step_time"] == pytest.approx(800 * 16)  # 2 processes' peak
    bad = launch(TINY, "--cpu", "--run-dir", tmp_path / "bad", env={**clean_env(), "LAUNCH_PEAK_TFLOPS": "fast"})
    assert bad.returncode == 2 and "LAUNCH_PEAK_TFLOPS=fast: must be the device's peak" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_workers_keep_the_memory_a_step_frees(tmp_path):
    """glibc hands large freed blocks back to the system: each step would fault its activations in anew."""
    out = ok(launch(TINY, "--cpu", "--procs", "2", "--max-steps", "1", "--page-faults", "--no-health", "--wandb",
                    "disabled", "--run-dir", tmp_path / "run")).stdout
    assert float(re.search(r"page faults per page: ([\d.]+)", out).group(1)) < 0.25, out
    # glibc's default threshold, held where it starts: left alone it also rises once such a block is freed, after
    # a history no test controls (1 plain process in 6 kept the memory here), which the launcher's setting ends
    plain = subprocess.run([sys.executable, "-c", "from tiny import refaulted; print(refaulted())"], text=True,
                           capture_output=True, check=True,
                           env=clean_env(PYTHONPATH=TINY.parent, MALLOC_MMAP_THRESHOLD_=128 << 10))
    assert float(plain.stdout) > 0.5  # the launcher's setting is what makes the difference


@pytest.mark.parametrize("scores,start", [([0.96, 0.99, 0.97], 0.9), ([0.35, 0.8, 0.5], 0.3), ([0.04, 0.5, 0.9], 0.0)])
def test_the_class_bars_start_below_their_lowest_score(scores, start):
    """Scores all near 1 against a 0 … 1 axis would be slivers of one length: the axis starts at the tenth below."""
    from launcher.runs import pictures

    classes = {"names": ["a", "b", "c"], "support": [5, 6, 7], "precision": scores, "recall": scores[::-1],
               "f1": scores, "weights_step": 10}
    assert pictures.class_bars(classes, "t").axes[0].get_xlim() == pytest.approx((start, 1))


@pytest.mark.parametrize("xs,log,scale", [([1e-4, 1e-3, 1e-2], False, "log"), ([0.1, 0.2, 0.4], False, "linear"),
                                          ([0.1, 0.2, 0.4], True, "log"), ([-1.0, 0.0, 5.0], False, "linear")])
def test_a_sweeps_picture_is_logarithmic_where_its_values_span_a_factor_of_ten(xs, log, scale):
    from launcher.runs import pictures

    spec = {"flag": "--lr", "low": None, "high": None, "log": log}
    figure = pictures.sweep([(x, float(k)) for k, x in enumerate(xs)], spec, ["val/loss", "min"], "s")
    assert figure.axes[0].get_xscale() == scale


def test_the_best_evaluation_the_last_line_names_has_a_line_of_its_own(tmp_path):
    """Evaluations get console lines as often as the log's; the best one, which `done:` names, always does."""
    out = ok(launch(TINY, "--cpu", "--wandb", "disabled", "--run-dir", tmp_path / "run", "--max-steps", "12",
                    "--eval-every", "1", "--log-every", "4", "--lr", "0.5")).stdout
    best = int(re.search(r"best val/loss [\d.]+ at step (\d+)", out.splitlines()[-1])[1])
    assert best not in (1, 5, 9, 12), out  # between the evaluations shown as they ran: the case at hand
    logged = next(r for r in records(tmp_path / "run") if r["step"] == best and "val/loss" in r)
    assert (f"eval  step {best}  val/loss {logged['val/loss']:.4f}  val/acc {logged['val/acc']:.4f}  val/count 37.0000"
            f"  (the best val/loss; its line was not shown above)") in out.splitlines(), out
