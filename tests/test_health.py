"""The pre-flight checks name each planted fault, stay silent on healthy recipes, and reach the run's records;
the practitioners' helpers do what they say."""

import json

import pytest
import torch
from torch import nn

from conftest import ROOT, TINY, launch, ok
from launcher import FocalLoss, class_weights, freeze, param_groups


def check(*flags, recipe=TINY):
    return launch(recipe, "--cpu", "--check", *flags)


def warnings_of(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("warning: ")]


@pytest.mark.parametrize("recipe", [TINY, ROOT / "recipes" / "digits.py"])
def test_a_healthy_recipe_raises_no_warning(recipe):
    result = check(recipe=recipe)
    assert result.returncode == 0, result.stdout + result.stderr
    assert warnings_of(result) == [] and result.stdout.endswith("check  pre-flight: no warning\n")
    for what in ("inputs", "loss", "labels", "splits", "model"):
        assert f"check  {what} " in result.stdout


@pytest.mark.parametrize("flags,warning", [
    (("--input-scale", "1000"), "inputs are far from zero mean and unit scale (8 channels into 0 (Linear)"),
    (("--leak", "5"), "the same inputs appear in more than one split (5 shared by train and val, 5 shared by train "
                      "and test, 5 shared by val and test)"),
    (("--imbalance",), "the classes are imbalanced (2 classes, 10 … 86 training samples each (imbalance 8.6:1))"),
    (("--zero-layer",), "0.weight is initialised to all zeros"),
], ids=["inputs-x1000", "leak", "imbalance", "zero-layer"])
def test_each_planted_fault_is_named(flags, warning):
    result = check(*flags)
    assert result.returncode == 1, result.stdout + result.stderr
    found = warnings_of(result)
    assert any(warning in w for w in found), found
    assert len(found) == 1, found  # named once, and nothing else cried (tanh keeps the ×1000 loss near ln 3)


def test_a_run_records_the_preflight_and_trains_on(tmp_path):
    run = tmp_path / "run"
    result = ok(launch(TINY, "--cpu", "--procs", "2", "--leak", "3", "--wandb", "disabled", "--run-dir", run))
    assert "warning: the same inputs appear in more than one split" in result.stdout
    assert "done: 12 steps" in result.stdout
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    pre = [e for e in events if e.get("event") == "preflight"]
    assert len(pre) == 1 and pre[0]["step"] == 0
    assert pre[0]["shared_samples"] == {"train/val": 3, "train/test": 3, "val/test": 3}
    assert len(pre[0]["warnings"]) == 1
    resumed = ok(launch(TINY, "--cpu", "--max-steps", "14", "--resume", run, "--wandb", "disabled", "--run-dir", run))
    assert "check " not in resumed.stdout  # a resumed run does not check again


def test_no_preflight_skips_the_checks(tmp_path):
    result = ok(launch(TINY, "--cpu", "--zero-layer", "--no-preflight", "--wandb", "disabled",
                       "--run-dir", tmp_path / "run"))
    assert "check " not in result.stdout and "warning:" not in result.stdout


def test_class_weights_balance_the_classes():
    labels = torch.tensor([0] * 90 + [1] * 10)
    w = class_weights(labels)
    torch.testing.assert_close(w, torch.tensor([100 / 180, 100 / 20]))
    assert (w[labels].sum() / len(labels)).item() == pytest.approx(1.0)
    assert w[labels][labels == 0].sum() == pytest.approx(w[labels][labels == 1].sum())  # each class weighs alike


def test_focal_loss_is_cross_entropy_at_gamma_0_and_spares_easy_samples():
    torch.manual_seed(0)
    logits, target = torch.randn(32, 4), torch.randint(0, 4, (32,))
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0])
    for w in (None, weight):
        ce = nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)(logits, target)
        torch.testing.assert_close(FocalLoss(0.0, w, 0.1)(logits, target), ce)
    easy = torch.zeros(1, 4)
    easy[0, 2] = 8.0  # confidently right
    hard = torch.zeros(1, 4)  # undecided
    ratio = FocalLoss(2.0)(easy, torch.tensor([2])) / nn.functional.cross_entropy(easy, torch.tensor([2]))
    assert ratio < 1e-5
    assert FocalLoss(2.0)(hard, torch.tensor([2])) == pytest.approx(0.75 ** 2 * torch.log(torch.tensor(4.0)).item())


def test_per_layer_learning_rates_and_freezing_by_prefix():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    groups = param_groups(model, 0.01, lr=0.1, lr_factors={"0.": 0.1})
    got = [(g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in groups]
    want = [(0.1, 0.01, [id(model[2].weight)]), (0.1, 0.0, [id(model[2].bias)]),
            (0.01, 0.01, [id(model[0].weight)]), (0.01, 0.0, [id(model[0].bias)])]
    assert [(pytest.approx(lr), wd, ids) for lr, wd, ids in want] == got
    assert freeze(model, "0.") == 4 * 8 + 8
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad
    assert {id(p) for g in param_groups(model, 0.0) for p in g["params"]} == {id(model[2].weight), id(model[2].bias)}
    with pytest.raises(ValueError, match="no parameter name starts with 'encoder.'"):
        freeze(model, "encoder.")
    with pytest.raises(ValueError, match="no parameter name starts with 'head.'"):
        param_groups(model, 0.0, lr=0.1, lr_factors={"head.": 2.0})
