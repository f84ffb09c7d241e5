"""The language-model recipe: it learns Tiny Shakespeare below the text's bigram entropy on 2 processes, the
engines agree on it, it resumes exactly, its data path builds a cache once, refuses data it cannot use in one
line, keeps validation and test apart from training, and its samples reach the console and W&B."""

import json
import os
import shutil

import pytest
import torch

from conftest import ROOT, assert_same, eval_record, history, launch, ok, records, train_records
from launcher.cli import run as cli
from launcher.recipe import contract as recipe
from launcher.runs import export

LM = ROOT / "recipes" / "lm.py"
lm = recipe.load(LM)
SMALL = ("--layers", "2", "--heads", "4", "--dim", "64", "--context", "32", "--batch-size", "32")
BIGRAM_ENTROPY = 2.45  # nats per byte of the whole text, measured: what a model of byte pairs reaches


def run_lm(tmp_path, name: str, *flags, procs: int = 2, wandb: str = "disabled"):
    run = tmp_path / name
    where = ("--cpu", "--procs", str(procs)) if procs > 1 else ("--cpu",)
    result = ok(launch(LM, *where, *SMALL, "--wandb", wandb, "--run-dir", run, *flags, cwd=tmp_path))
    return run, result


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """The small model, 2 processes, 300 steps, sampled and logged to an offline W&B run."""
    return run_lm(tmp_path_factory.mktemp("lm"), "learned", "--max-steps", "300", "--eval-every", "150",
                  "--sample-tokens", "60", wandb="offline")


def test_it_learns_below_the_bigram_entropy_and_samples(learned):
    run, result = learned
    assert "check  loss     initial " in result.stdout and "expected ln 256 = 5.545 for 256 classes" in result.stdout
    assert " tokens/s  " in result.stdout
    val = eval_record(run, "val")
    assert val["loss"] < BIGRAM_ENTROPY
    assert val["perplexity"] == pytest.approx(torch.tensor(val["loss"]).exp().item(), rel=1e-4)
    assert val["bpb"] == pytest.approx(val["loss"] / torch.log(torch.tensor(2.0)).item(), rel=1e-4)
    samples = [r for r in records(run) if r.get("event") == "sample"]
    assert [s["step"] for s in samples] == [150, 300]
    assert all(s["text"].startswith("ROMEO:\n") and len(s["text"]) > 40 for s in samples)
    assert f"sample step 300: {samples[-1]['text']}" in result.stdout
    wandb_run = next(run.glob("wandb/offline-run-*"))
    logged = history(wandb_run)
    assert logged[300]["sample._type"] == "table-file" and logged[300]["sample.nrows"] == 2
    table = json.loads((wandb_run / "files" / logged[300]["sample.path"]).read_text())
    assert table["columns"] == ["step", "text"] and table["data"] == [[s["step"], s["text"]] for s in samples]


FIRST_STEPS = ("--max-steps", "4", "--log-every", "1", "--grad-accum", "2", "--no-health")


@pytest.fixture(scope="module")
def ddp_steps(tmp_path_factory):
    return run_lm(tmp_path_factory.mktemp("ddp"), "ddp", *FIRST_STEPS)[0]


@pytest.mark.parametrize("engine", [("--engine", "fsdp"), ("--engine", "deepspeed", "--zero", "3")],
                         ids=["fsdp", "zero3"])
def test_the_engines_agree_on_the_first_steps(tmp_path, ddp_steps, engine):
    ddp = ddp_steps
    other, _ = run_lm(tmp_path, engine[1], *FIRST_STEPS, *engine)
    got, want = train_records(other), train_records(ddp)
    for step in range(1, 5):
        for key in ("train/loss", "grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4), (step, key)


def test_a_stopped_run_resumes_exactly(tmp_path):
    """Stopped after the checkpoint at step 4 (its later checkpoint and records removed), resumed: the weights of
    step 8 equal those of the run that never stopped."""
    common = ("--max-steps", "8", "--save-every", "4", "--eval-every", "4", "--sample-tokens", "8")
    straight, _ = run_lm(tmp_path, "straight", *common)
    stopped = tmp_path / "stopped"
    shutil.copytree(straight, stopped, ignore=shutil.ignore_patterns("step-00000008", "best"))
    run_lm(tmp_path, "stopped", *common, "--resume", "auto")
    final = "checkpoints/step-00000008"
    assert_same(export.weights(stopped / final), export.weights(straight / final))


def hparams(**values):
    return lm.Hparams(**values)


def test_data_is_cached_once_and_rebuilt_when_a_source_changes(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("To be, or not to be: that is the question.\n" * 300)
    (folder / "b.txt").write_text("Now is the winter of our discontent.\n" * 300)
    hp = hparams(data=str(folder))
    path = lm.tokens(hp)
    assert path == folder / ".tokens.bytes"
    assert path.read_bytes() == (folder / "a.txt").read_bytes() + (folder / "b.txt").read_bytes()
    built = path.stat().st_mtime_ns
    assert lm.tokens(hp) == path and path.stat().st_mtime_ns == built  # reused
    (folder / "b.txt").write_text("A horse! a horse! my kingdom for a horse!\n" * 300)
    lm.tokens(hp)
    assert path.stat().st_mtime_ns != built and path.read_bytes().endswith(b"for a horse!\n")


@pytest.mark.parametrize("content,message", [
    (None, "holds no .txt file"),
    (b"", "holds 0 bytes of text: too little to train and evaluate on"),
    (b"\xff\xfe\x00 binary" * 1000, "is not UTF-8 text"),
], ids=["empty-folder", "empty-file", "not-text"])
def test_data_it_cannot_use_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    folder = tmp_path / "texts"
    folder.mkdir()
    if content is not None:
        (folder / "a.txt").write_bytes(content)
    with pytest.raises(SystemExit) as stop:
        cli.main([str(LM), "--cpu", "--data", str(folder), "--wandb", "disabled", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists() and not list(folder.glob(".tokens*"))


def test_validation_and_test_share_no_token_position_with_training():
    hp = hparams()
    splits = lm.data(hp)

    def positions(windows):
        """The token positions a split reads, inputs and targets: [first, last] of its windows."""
        return windows.begin, windows.begin + (len(windows) - 1) * windows.stride + windows.context

    train, val, test = (positions(s) for s in (splits.train, splits.val, splits.test))
    assert train[1] < val[0] and val[1] < test[0] and test[1] < os.path.getsize(lm.token_file(hp))
    x, y = splits.val[0]
    assert torch.equal(x[1:], y[:-1])  # the target is the input moved by one
