"""Recipes of every shape: dict batches padded by a collate function, the recipe's own step, counts that weight
the loss, models that compute their own loss, streams; and every recipe that breaks the contract stopped with
one line and exit 2. Real processes over gloo where processes matter, the launcher in this process where they
do not."""

import re
import textwrap
from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from conftest import ROOT, assert_close, assert_same, eval_record, launch, ok, params, records, train_records
from launcher.cli import run as cli
from launcher.recipe import data, steps
from launcher.runs import export

TOKENS = ROOT / "tests" / "recipes" / "tokens.py"
SPLIT = ("--cpu", "--procs", "2", "--grad-accum", "2")  # 4 micro-batches of 4 sequences per step of 16


def tokens(tmp_path, name: str, *flags, check: bool = True):
    """Run the tokens recipe in tmp_path/name (run directory name/run, dumps in name); return (folder, result)."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    where = () if "--procs" in flags else ("--cpu",)
    result = launch(TOKENS, *where, "--wandb", "disabled", "--run-dir", folder / "run", "--dump-dir", folder, *flags)
    return folder, ok(result) if check else result


@dataclass
class Tagged:
    value: torch.Tensor
    note: str


Point = namedtuple("Point", "x y")
CPU = torch.device("cpu")


def test_batches_are_trees():
    """Any nesting of dicts, tuples, namedtuples and dataclasses is collated and moved as it is; strings stay on
    the host."""
    samples = [{"ids": torch.full((2,), i), "tag": Tagged(torch.tensor(float(i)), f"s{i}"),
                "at": Point(torch.tensor(i), torch.tensor(-i)), "pair": (torch.tensor(i), "left")} for i in range(3)]
    batch = data.to_device(data.collate(samples), CPU)
    assert torch.equal(batch["ids"], torch.tensor([[0, 0], [1, 1], [2, 2]]))
    assert isinstance(batch["tag"], Tagged) and torch.equal(batch["tag"].value, torch.tensor([0.0, 1.0, 2.0]))
    assert batch["tag"].note == ["s0", "s1", "s2"]
    assert isinstance(batch["at"], Point) and torch.equal(batch["at"].y, torch.tensor([0, -1, -2]))
    assert list(batch["pair"][1]) == ["left"] * 3 and data.size(batch) == 3


@pytest.mark.parametrize("split", [{"x": torch.randn(10, 3), "y": torch.arange(10)},
                                   TensorDataset(torch.randn(10, 3), torch.arange(10), torch.randn(10))],
                         ids=["dict-of-tensors", "three-tensors"])
def test_the_fast_path_gives_the_dataloaders_batches(split):
    fast, slow = (data.loader(split, "train", CPU, 0, on, None) for on in (True, False))
    assert fast.fast and not slow.fast
    # 2 steps of 4 samples, 2 micro-steps, one process
    for a, b in zip(fast.train_epoch(0, 0, 0, 2, 4, 2, 1, 0), slow.train_epoch(0, 0, 0, 2, 4, 2, 1, 0), strict=True):
        assert type(a) is dict if isinstance(split, dict) else isinstance(a, tuple)
        for x, y in zip(data.leaves(a), data.leaves(b), strict=True):
            assert torch.equal(x, y)


def test_evaluation_cuts_batches_to_each_ranks_own_samples():
    """5 samples on 2 ranks in batches of 2: rank 0 has 3, rank 1 has 2 and a padding batch marked not real."""
    loader = data.loader(TensorDataset(torch.arange(5)), "val", CPU, 0, True, None)
    got = {rank: [(b[0].tolist(), real) for b, real in loader.eval_batches(2, 2, rank)] for rank in range(2)}
    assert got == {0: [([0, 2], True), ([4], True)], 1: [([1, 3], True), ([0], False)]}


def test_a_loss_that_is_a_module_moves_with_the_model():
    """Checked with the meta device: the call the launcher makes for a GPU (none here)."""
    class Recipe:
        @staticmethod
        def loss(hp):
            return nn.CrossEntropyLoss(weight=torch.ones(3))

    _, _, loss_fn = steps.steps(Recipe, None, torch.device("meta"))
    assert loss_fn.weight.device.type == "meta"


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    """Token counts, 2 processes × 2 micro-steps, clipping: the reference of the tests below."""
    folder, result = tokens(tmp_path_factory.mktemp("split"), "split", *SPLIT, "--log-every", "1",
                            "--clip-grad", "0.5")
    return folder, result


@pytest.fixture(scope="module")
def mean_split(tmp_path_factory):
    """The same, with a step that averages each micro-batch alone and gives no count."""
    folder, _ = tokens(tmp_path_factory.mktemp("mean"), "mean-split", *SPLIT, "--style", "mean", "--clip-grad", "0.5")
    return folder


def test_counts_make_accumulation_and_processes_exact(tmp_path, split_run, mean_split):
    """Sequences of 3 to 12 tokens: the micro-batches hold different token counts. With counts, 2 processes × 2
    micro-steps give the parameters of one batch on one process (the mean over every token of the global batch);
    a step that averages each micro-batch alone (--style mean) does not."""
    split, result = split_run
    one, _ = tokens(tmp_path, "one", "--clip-grad", "0.5")
    assert_close(params(split, 0, "final"), params(one, 0, "final"), rtol=1e-5, atol=1e-6)
    assert_same(params(split, 1, "final"), params(split, 0, "final"))
    mean_one, _ = tokens(tmp_path, "mean-one", "--style", "mean", "--clip-grad", "0.5")
    assert_close(params(mean_one, 0, "final"), params(one, 0, "final"), rtol=1e-5, atol=1e-6)  # one micro-batch
    gap = max((params(mean_split, 0, "final")[k] - params(one, 0, "final")[k]).abs().max().item()
              for k in params(one, 0, "final"))
    assert gap > 1e-3  # per-micro-batch means weigh short sequences' tokens more
    logged = train_records(split / "run")
    assert all(r["items_per_s"] > r["samples_per_s"] for r in logged.values())  # several tokens per sample
    assert " items/s  " in result.stdout


@pytest.mark.parametrize("engine", [("--engine", "fsdp"), ("--engine", "deepspeed", "--zero", "3")],
                         ids=["fsdp", "zero3"])
def test_a_dict_batch_recipe_trains_alike_under_every_engine(tmp_path, split_run, engine):
    split, _ = split_run
    folder, _ = tokens(tmp_path, engine[1], *SPLIT, "--log-every", "1", "--clip-grad", "0.5", *engine)
    got, want = train_records(folder / "run"), train_records(split / "run")
    assert got.keys() == want.keys() == set(range(1, 13))
    for step in want:
        for key in ("train/loss", "grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5), (step, key)
    def evaluations(run):
        return [r[k] for r in records(run) if "val/loss" in r for k in ("val/loss", "val/acc")]

    assert evaluations(folder / "run") == pytest.approx(evaluations(split / "run"), rel=1e-5)
    final = "checkpoints/step-00000012"
    assert_close(export.weights(folder / "run" / final), export.weights(split / "run" / final), rtol=1e-5, atol=1e-6)


def test_a_model_that_computes_its_own_loss(tmp_path, mean_split):
    """The Hugging Face convention: the model takes the labels and returns {"loss", "logits"}; the step hands
    the output on as it is. The same training as the step that computes the same loss itself."""
    hf, _ = tokens(tmp_path, "hf", *SPLIT, "--style", "hf", "--clip-grad", "0.5")
    assert_close(params(hf, 0, "final"), params(mean_split, 0, "final"), rtol=1e-6)
    losses = [r["train/loss"] for r in train_records(hf / "run").values()]
    assert losses[-1] < losses[0]


def test_the_numbers_a_step_returns_beside_its_loss_are_logged_as_the_loss_is(tmp_path):
    """--style extras returns ce + 0.1 × aux as its loss, with ce and aux beside it: train/ce and train/aux are
    averaged over the window, the micro-steps and the ranks exactly as train/loss (so the sum holds in every
    record), val/ce and val/aux over the split; a checkpoint between two log steps keeps their window's sums."""
    flags = (*SPLIT, "--style", "extras", "--log-every", "3")
    whole, result = tokens(tmp_path, "whole", *flags, "--save-every", "4", "--keep", "0")
    logged = train_records(whole / "run")
    assert sorted(logged) == [3, 6, 9, 12]
    for r in logged.values():
        assert r["train/loss"] == pytest.approx(r["train/ce"] + 0.1 * r["train/aux"], rel=1e-6)
    evaluations = [r for r in records(whole / "run") if "val/loss" in r]
    assert evaluations and all(r["val/loss"] == pytest.approx(r["val/ce"] + 0.1 * r["val/aux"], rel=1e-6)
                               and "val/acc" in r for r in evaluations)
    assert re.search(r"step +12/12 .* loss \d\.\d{4}  aux \d\.\d{4}  ce \d\.\d{4}  lr ", result.stdout)
    again, _ = tokens(tmp_path, "again", *flags, "--resume", whole / "run" / "checkpoints" / "step-00000004")
    resumed = train_records(again / "run")  # its first record, at step 6, holds steps 4 to 6 as the whole run's
    for key in ("train/loss", "train/ce", "train/aux"):
        assert resumed[6][key] == pytest.approx(logged[6][key], rel=1e-6), key


def order(epoch: int) -> list[int]:
    """The test stream's order in an epoch (tokens.Stream)."""
    return torch.randperm(96, generator=torch.Generator().manual_seed(epoch)).tolist()


@pytest.mark.slow
def test_a_stream_is_sharded_without_duplicates_or_gaps_and_resumes_exactly(tmp_path):
    """An IterableDataset of declared length on 2 processes × 2 DataLoader workers × 2 micro-steps: each micro-batch
    holds the stream's samples in the global batch's layout, so every step takes the stream's next 16 samples,
    once each. Stopped by a crash and resumed from step 4, it takes the same batches and ends bit-equal."""
    flags = (*SPLIT, "--workers", "2", "--stream", "--length", "--save-every", "4")
    straight, _ = tokens(tmp_path, "straight", *flags)
    for rank in range(2):
        seen = torch.load(straight / f"rank{rank}-seen.pt")
        assert len(seen) == 12 * 2
        for j, indices in enumerate(seen):
            step, k = divmod(j, 2)
            epoch, s = divmod(step, 6)
            begin = 16 * s + (2 * k + rank) * 4
            assert indices == order(epoch)[begin:begin + 4], (rank, j)
    stopped, result = tokens(tmp_path, "stopped", *flags, "--crash-at", "15", check=False)
    assert result.returncode == 1 and "planted crash at forward 15" in result.stderr
    tokens(tmp_path, "stopped", *flags, "--crash-at", "15", "--resume", "auto")
    for rank in range(2):
        assert_same(params(stopped, rank, "final"), params(straight, 0, "final"))
        # the resumed run's first forward settles DDP's buckets on the batch it then trains on
        resumed, before = torch.load(stopped / f"rank{rank}-seen.pt"), torch.load(straight / f"rank{rank}-seen.pt")
        assert resumed == [before[8]] + before[8:]


def test_throughput_in_the_recipes_unit_and_an_evaluation_step_of_its_own(tmp_path, capsys):
    recipe = tmp_path / "named.py"
    recipe.write_text(TOKENS.read_text() + '\ncounts = "tokens"\n\n'
                      'def eval_step(model, batch, hp):\n    return {"loss": torch.tensor(7.0), "count": 1}\n')
    with pytest.raises(SystemExit) as stop:
        cli.main([str(recipe), "--cpu", "--style", "pair", "--max-steps", "2", "--log-every", "1", "--wandb",
                  "disabled", "--run-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and " tokens/s  " in out
    logged = train_records(tmp_path / "run")
    assert logged[1]["tokens_per_s"] > logged[1]["samples_per_s"] > 0
    assert [r["val/loss"] for r in records(tmp_path / "run") if "val/loss" in r] == [7.0]


def test_a_stream_without_a_length_runs_for_max_steps_and_says_when_it_runs_dry(tmp_path):
    folder, result = tokens(tmp_path, "dry", "--stream", "--max-steps", "8", check=False)
    assert result.returncode == 1
    assert ("the training stream ran out at step 6 of 8 (96 samples): lower --max-steps, or make its length "
            "(__len__) the number of samples it yields in one epoch") in result.stderr
    assert "data: train stream, val 30 samples · 8 steps/epoch" in result.stdout


def test_unused_parameters_under_ddp(tmp_path):
    _, refused = tokens(tmp_path, "refused", *SPLIT, "--unused", "--max-steps", "2", check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "launch: error: spare.weight, spare.bias got no gradient in the first step: under DDP every trainable "
        "parameter must take part in every step. Set find_unused_parameters = True in the recipe (or pass "
        "--find-unused-parameters) if they are used only in some steps; else remove them or freeze them "
        "(launcher.freeze)")
    tokens(tmp_path, "allowed", *SPLIT, "--unused", "--max-steps", "2", "--find-unused-parameters")


# ---------------------------------------------------------------- recipes that break the contract

BASE = """
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset
from launcher import Splits

@dataclass
class Hparams:
    epochs: int = 1
    batch_size: int = 8
    lr: float = 0.1

X = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()

def data(hp):
    return Splits(train=TensorDataset(X, Y))

def model(hp):
    return nn.Linear(4, 2)

def loss(hp):
    return nn.CrossEntropyLoss()

class Stream(IterableDataset):
    def __iter__(self):
        return iter(zip(X, Y))
"""

BAD = {
    "dict-batch-default-step": (
        "def data(hp):\n    return Splits(train={'x': X, 'y': Y})",
        "the default step takes (input, target) batches and computes loss(hp)(model(input), target), but a batch is "
        "a dict with keys x, y: define step(model, batch, hp) in the recipe"),
    "ragged-without-collate": (
        "def data(hp):\n    return Splits(train=[{'ids': torch.arange(1 + i % 5)} for i in range(32)])\n"
        "def step(model, batch, hp):\n    return model(batch['ids']).sum()",
        "the train split's samples cannot be batched by torch's default_collate (stack expects each tensor to be "
        "equal size"),
    "stream-without-length": (
        "def data(hp):\n    return Splits(train=Stream())",
        "the training split is a stream without a length: give --max-steps N, or define __len__ on it"),
    "stream-as-val": (
        "def data(hp):\n    return Splits(train=TensorDataset(X, Y), val=Stream())",
        "the val split is a stream (IterableDataset); evaluation is exact over a split of known size"),
    "tuple-output": (
        "class Two(nn.Linear):\n    def forward(self, x):\n        y = super().forward(x)\n        return y, y\n"
        "def model(hp):\n    return Two(4, 2)",
        "the model returns a tuple of 2, which the loss from loss(hp) cannot take ("),
    "loss-not-a-scalar": (
        "def loss(hp):\n    return nn.CrossEntropyLoss(reduction='none')",
        "the loss from loss(hp) is a tensor (8,) of torch.float32, not a floating-point scalar: reduce it"),
    "float64-model": (
        "def model(hp):\n    return nn.Linear(4, 2).double()",
        "model(hp) returns a model whose parameter weight is float64: build it in float32"),
    "fewer-classes-than-labels": (
        "def data(hp):\n    return Splits(train=TensorDataset(X, torch.arange(32) % 3))",
        "the model scores 2 classes (its output is (8, 2)), but a training label is 2: labels are class indices "
        "0 … 1"),
    "classes-last-in-cross-entropy": (
        "def data(hp):\n    x = X.view(32, 2, 2)\n    return Splits(train=TensorDataset(x, (x[..., 0] > 0).long()))\n"
        "def step(model, batch, hp):\n    x, y = batch\n    return F.cross_entropy(model[0](x), y)\n"
        "def model(hp):\n    return nn.Sequential(nn.Linear(2, 3))",
        "cross_entropy takes the classes in dimension 1, but the model's scores are (8, 2, 3) and the targets "
        "(8, 2)"),
    "data-without-splits": (
        "def data(hp):\n    return {'train': TensorDataset(X, Y)}",
        "data(hp) returned a dict with keys train; it returns launcher.Splits(train=..., val=..., test=...)"),
    "step-returns-text": (
        "def step(model, batch, hp):\n    return 'loss'",
        "step() returned a str; a step returns the loss, (loss, count), or a dict with 'loss'"),
    "metrics-without-predictions": (
        "def data(hp):\n    return Splits(train=TensorDataset(X, Y), val=TensorDataset(X, Y))\n"
        "def step(model, batch, hp):\n    x, y = batch\n    return F.cross_entropy(model(x), y)\n"
        "def metrics(hp):\n    from torchmetrics.classification import MulticlassAccuracy\n"
        "    return {'acc': MulticlassAccuracy(num_classes=2)}",
        "metrics(hp) needs the step's predictions: return {'loss': ..., 'preds': ..., 'target': ...} from the step"),
    "counts-declared-but-not-given": (
        "counts = 'tokens'\ndef step(model, batch, hp):\n    x, y = batch\n    return F.cross_entropy(model(x), y)",
        "the recipe says its counts are tokens (counts = 'tokens'), but step() returns no count"),
    "loss-without-gradient": (
        "def step(model, batch, hp):\n    x, y = batch\n    with torch.no_grad():\n"
        "        return F.cross_entropy(model(x), y)",
        "the step's loss does not depend on any trainable parameter"),
    "collate-for-no-split": (
        "def data(hp):\n    return Splits(train=TensorDataset(X, Y), collate_fn={'training': list})",
        "Splits(collate_fn=...) names no split training (train, val, test)"),
    # found when the recipe is loaded
    "training-step": (
        "def training_step(model, batch, hp):\n    return model(batch[0]).sum()",
        "training_step() is not part of the recipe contract, so nothing would call it; a recipe defines Hparams, "
        "data, model, loss and optionally prepare, metrics, optimizer, step, eval_step"),
    "misspelt-metrics": (
        "def metric(hp):\n    return {}",
        "metric() is not part of the recipe contract, so nothing would call it; did you mean metrics()?"),
    "loss-as-the-loss-function": (
        "def loss(out, y):\n    return F.cross_entropy(out, y)",
        "loss(out, y) cannot be called as loss(hp): it returns the loss function"),
    "no-loss-and-no-step": (
        "del loss",
        "lacks loss (a recipe defines Hparams, data, model and loss, or a step of its own)"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_recipe_that_breaks_the_contract_is_one_line_and_exit_2(tmp_path, capsys, case):
    extra, message = BAD[case]
    recipe = tmp_path / "bad.py"
    recipe.write_text(BASE + "\n" + extra + "\n")
    flags = [] if case == "stream-without-length" else ["--max-steps", "2"]
    with pytest.raises(SystemExit) as stop:
        cli.main([str(recipe), "--cpu", "--wandb", "disabled", "--run-dir", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch: error: "), err
    assert message in lines[0], lines[0]


# ---------------------------------------------------------------- health checks that understand the task

HEALTH = {
    "regression": (
        "Y = X @ torch.randn(4, 1, generator=torch.Generator().manual_seed(1))\n"
        "def model(hp):\n    return nn.Linear(4, 1)\n"
        "def loss(hp):\n    return nn.MSELoss()",
        ["check  loss     initial ", " (no expected value: mse_loss is a regression loss)",
         "check  labels   real-valued targets (1,): no classes to balance"], []),
    "regression-broadcast": (
        "Y = X[:, 0] * 2\n"
        "def model(hp):\n    return nn.Linear(4, 1)\n"
        "def loss(hp):\n    return nn.MSELoss()",
        [], ["mse_loss compares the model's output (8, 1) with targets (8,): they broadcast to (8, 8)"]),
    "binary": (
        "Y = (X[:, 0] > 0.8).float()[:, None]\n"
        "def model(hp):\n    return nn.Linear(4, 1)\n"
        "def loss(hp):\n    return nn.BCEWithLogitsLoss()",
        ["for binary labels, ", "check  labels   binary labels, 5 … 27 training samples each (imbalance 5.4:1)"],
        ["the classes are imbalanced", "set its last layer's bias to log(p / (1 - p))"]),
    "binary-weighted": (
        "Y = (X[:, 0] > 0.8).float()[:, None]\n"
        "def model(hp):\n    return nn.Linear(4, 1)\n"
        "def loss(hp):\n    return nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0]))",
        ["(no expected value: binary_cross_entropy_with_logits with weights)",
         "(imbalance 5.4:1); the loss weights them"], []),
    "sequence": (
        "Y = torch.randint(0, 5, (32, 6), generator=torch.Generator().manual_seed(2))\n"
        "X = torch.randint(0, 9, (32, 6), generator=torch.Generator().manual_seed(3))\n"
        "def model(hp):\n    return nn.Sequential(nn.Embedding(9, 8), nn.Linear(8, 5))\n"
        "def step(model, batch, hp):\n    x, y = batch\n"
        "    return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)",
        ["check  inputs   (6,) integer (0 takes indices): not checked",
         "expected ln 5 = 1.609 for 5 classes", "check  labels   a label per position (6,): class balance not checked"],
        []),
    "dict-batch": (
        "def data(hp):\n    return Splits(train=[{'x': x, 'label': y} for x, y in zip(X, Y)])\n"
        "def step(model, batch, hp):\n"
        "    return {'loss': 2 * F.cross_entropy(model(batch['x']), batch['label'])}",
        ["check  labels   2 classes, 14 … 18 training samples each (imbalance 1.3:1)\n",
         "check  splits   only a training split",
         "(no expected value: the step's loss "], []),
    "two-losses": (
        "def step(model, batch, hp):\n    x, y = batch\n    out = model(x)\n"
        "    return F.cross_entropy(out, y) + 0.1 * F.mse_loss(out, torch.zeros_like(out))",
        ["(no expected value: the loss combines 2 loss functions (cross_entropy, mse_loss))"], []),
}


@pytest.mark.parametrize("case", HEALTH)
def test_the_preflight_reads_the_task(tmp_path, capsys, case):
    extra, lines, warnings = HEALTH[case]
    recipe = tmp_path / "task.py"
    recipe.write_text(BASE + "\n" + extra + "\n")
    with pytest.raises(SystemExit) as stop:
        cli.main([str(recipe), "--cpu", "--check"])
    out = capsys.readouterr().out
    found = [w for w in out.splitlines() if w.startswith("warning: ")]
    assert stop.value.code == (1 if warnings else 0), out
    for line in lines:
        assert line in out, out
    assert len(found) == len(warnings) and all(any(w in f for f in found) for w in warnings), out
    assert "not checked (" not in out  # no check fell over


def test_a_huge_split_is_sampled_for_the_preflight(tmp_path, capsys):
    """A memory-mapped dataset of 300,000 samples trains through the DataLoader with workers; the pre-flight
    hashes a sample of it, and says so."""
    recipe = tmp_path / "huge.py"
    recipe.write_text(BASE + textwrap.dedent(f"""
        import numpy as np
        from torch.utils.data import Dataset

        class Rows(Dataset):
            def __init__(self, path, n):
                self.path, self.n = path, n
            def __len__(self):
                return self.n
            def __getitem__(self, i):
                rows = np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.n, 4))
                return torch.from_numpy(np.array(rows[i])), int(rows[i, 0] > 0)

        def data(hp):
            path = {str(tmp_path / 'rows.f32')!r}
            rows = np.memmap(path, dtype=np.float32, mode="w+", shape=(300_000, 4))
            rows[:] = np.random.default_rng(0).standard_normal((300_000, 4), dtype=np.float32)
            rows.flush()
            return Splits(train=Rows(path, 300_000), val=Rows(path, 1_000))
    """))
    result = ok(launch(recipe, "--cpu", "--workers", "2", "--max-steps", "3", "--wandb", "disabled",
                       "--run-dir", tmp_path / "run"))
    assert "(train 20,000 of 300,000 sampled / val 1,000 hashed)" in result.stdout
    assert "at least" in result.stdout and "shared by train and val" in result.stdout  # val rows are train rows
    assert "labels   2 classes, " in result.stdout and "(2,000 sampled)" in result.stdout
    assert "done: 3 steps" in result.stdout


def test_the_speakers_recipe_learns_who_speaks(tmp_path):
    """The README's dict-batch example: speeches of different lengths padded per batch, a step of its own;
    three epochs on one process already beat chance (1 in 8) and raise no health warning."""
    run = tmp_path / "run"
    result = ok(launch(ROOT / "recipes" / "speakers.py", "--cpu", "--epochs", "3", "--wandb", "disabled",
                       "--run-dir", run))
    assert "check  loss     initial 2.079, expected ln 8 = 2.079 for 8 classes" in result.stdout
    assert "warning" not in result.stdout.replace("pre-flight: no warning", "")
    assert eval_record(run, "test")["acc"] > 0.2
