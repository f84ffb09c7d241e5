"""The pre-flight checks name each planted fault, stay silent on healthy recipes, and reach the run's records;
the practitioners' helpers do what they say."""

import json
import re

import pytest
import torch
from torch import nn

from conftest import ROOT, TINY, in_process, launch, ok, records, refused
from launcher import FocalLoss, class_weights, freeze, param_groups
from launcher.health import debugging, neardup
from launcher.health import monitor as health


def check(capsys, *flags, recipe=TINY) -> tuple[int, str]:
    """`launch RECIPE --cpu --check FLAGS`, in this process: (exit code, what it printed)."""
    code, out, err = in_process(capsys, recipe, "--cpu", "--check", *flags)
    return code, out + err


def warnings_of(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("warning: ")]


PLANTED = ROOT / "tests" / "recipes" / "planted.py"


@pytest.mark.parametrize("recipe,flags", [(TINY, ()), (ROOT / "recipes" / "digits.py", ()), (PLANTED, ()),
                                          (PLANTED, ("--batchnorm",)), (ROOT / "recipes" / "speakers.py", ())],
                         ids=["tiny", "digits", "planted-none", "planted-batchnorm", "speakers"])
def test_a_healthy_recipe_raises_no_warning(recipe, flags, capsys):
    code, out = check(capsys, *flags, recipe=recipe)
    assert code == 0, out
    assert warnings_of(out) == [] and out.endswith("check  pre-flight: no warning\n")
    for what in ("inputs", "loss", "eval", "labels", "splits", "near", "model"):
        assert f"check  {what} " in out
    assert "check  eval     outputs in eval mode depend on each sample alone (" in out
    if recipe.name in ("digits.py", "planted.py"):  # the one near-duplicate the digits data holds, reported quietly
        assert "check  near     1 of the 360 test inputs nearly copies a train input (test 129 ≈ train 203)" in out


NEAR = "of the 360 test inputs nearly copy train inputs (test 0 ≈ train 0, test 1 ≈ train 1, test 2 ≈ train 2, …)"


@pytest.mark.parametrize("flags,warning", [
    (("--fault", "near-duplicates"), f"61 {NEAR} (cosine ≥ 0.99 after centring)"),
    (("--fault", "near-duplicates", "--noise", "0.01"), f"61 {NEAR}"),
    (("--fault", "near-duplicates", "--noise", "0.05"), f"61 {NEAR}"),
    (("--fault", "near-duplicates", "--copies", "10"), "11 of the 360 test inputs nearly copy train inputs"),
    (("--fault", "batchnorm-train"), "in eval mode, a sample's output depends on the other samples of its batch (32 "
                                     "samples alone and inside 64), first at 1 (StuckInTraining, still in training "
                                     "mode)"),
    (("--fault", "dropout-eval"), "in eval mode, the same batch evaluated twice gives other outputs, first at 2 "
                                  "(AlwaysDropout):"),
    (("--fault", "frozen-in-optimizer"), "the optimizer holds 2 frozen parameter tensors (16,640 values: 0.weight, "
                                         "0.bias)"),
], ids=["near-1e-3", "near-1e-2", "near-5e-2", "near-10", "batchnorm", "dropout", "frozen"])
def test_each_planted_fault_of_the_second_round_is_named_once(flags, warning, capsys):
    code, out = check(capsys, *flags, recipe=PLANTED)
    assert code == 1, out
    found = warnings_of(out)
    assert len(found) == 1 and warning in found[0], found


def test_near_duplicates_under_the_share_are_reported_but_not_warned(capsys):
    """1 % of a split earns a warning: 3 planted (and the data's own) of 360 are 1.1 %, 2 are 0.8 %."""
    assert check(capsys, "--fault", "near-duplicates", "--copies", "3", recipe=PLANTED)[0] == 1
    code, out = check(capsys, "--fault", "near-duplicates", "--copies", "2", recipe=PLANTED)
    assert code == 0 and "check  near     3 of the 360 test inputs nearly copy train inputs" in out


def test_the_near_duplicate_search_finds_copies_through_noise_and_light_not_through_a_flip():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2000, 3, 16, 16, generator=g)
    b = torch.rand(500, 3, 16, 16, generator=g)
    b[10] = a[7] + 0.02 * torch.randn(3, 16, 16, generator=g)  # noise of 7 % of the pixels' spread
    b[20] = 0.5 * a[8] + 0.3  # darker, lower contrast
    b[30] = a[9]  # an exact copy: the hash check's
    b[40] = a[10].flip(-1)  # a mirror image: missed, by design
    assert neardup.search(a, b, seed=0).tolist() == [[10, 7], [20, 8]]
    assert neardup.search(a, torch.rand(500, 3, 16, 16, generator=g), seed=0).tolist() == []
    assert neardup.eligible(torch.zeros(4, 16, dtype=torch.long)) == "int64 inputs (indices, not values)"
    assert neardup.eligible(torch.zeros(4, 3, 8, 8, dtype=torch.uint8)) is None


@pytest.mark.parametrize("test,sizes,warned", [
    ({"test/acc": 0.0056, "test/loss": 13.4}, {"val": 180, "test": 360}, True),
    ({"test/acc": 0.98, "test/loss": 0.08}, {"val": 180, "test": 360}, False),
    ({"test/acc": 0.85, "test/loss": 0.3}, {"val": 180, "test": 360}, True),  # 0.144, 5.2 standard errors of 0.028
    ({"test/acc": 0.90, "test/loss": 0.3}, {"val": 180, "test": 360}, False),  # 0.094: 4.1 of them
    ({"test/acc": 0.85, "test/loss": 0.3}, {"val": 18, "test": 36}, False),  # the gap of 5.2 in splits a tenth as big
    ({"test/acc": 0.0056}, {"val": 180, "test": None}, False),  # a stream: no size to judge by
])
def test_a_test_metric_far_from_validation_is_named_beyond_chance(test, sizes, warned):
    found = health.test_gap({"val/acc": 0.9944, "val/loss": 0.06}, test, sizes)
    assert len(found) == warned
    if warned:
        assert found[0].startswith(f"the test metrics are far from the validation metrics of the same weights: "
                                   f"test/acc {test['test/acc']:.4g} against val/acc 0.9944")


def test_test_labels_that_disagree_with_training_are_named_at_the_end(tmp_path):
    result = ok(launch(PLANTED, "--cpu", "--fault", "shifted-test", "--wandb", "disabled", "--run-dir", tmp_path))
    found = warnings_of(result.stdout)
    assert len(found) == 1 and found[0].startswith(
        "warning: the test metrics are far from the validation metrics of the same weights: test/acc 0.005556 "
        "against val/acc 0.9944 (360 and 180 samples: chance moves it by about 0.043)"), found
    assert "check  pre-flight: no warning" in result.stdout
    verdict = [r for r in records(tmp_path) if r.get("event") == "verdict"][0]
    assert verdict["findings"] == [found[0].removeprefix("warning: ")]


@pytest.mark.parametrize("flags,warning", [
    (("--input-scale", "1000"), "inputs are far from zero mean and unit scale (8 channels into 0 (Linear)"),
    (("--leak", "5"), "the same inputs appear in more than one split (5 shared by train and val, 5 shared by train "
                      "and test, 5 shared by val and test)"),
    (("--imbalance",), "the classes are imbalanced (2 classes, 10 … 86 training samples each (imbalance 8.6:1))"),
    (("--zero-layer",), "0.weight is initialised to all zeros"),
], ids=["inputs-x1000", "leak", "imbalance", "zero-layer"])
def test_each_planted_fault_is_named(flags, warning, capsys):
    code, out = check(capsys, *flags)
    assert code == 1, out
    found = warnings_of(out)
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
    result = ok(launch(TINY, "--cpu", "--zero-layer", "--no-health", "--wandb", "disabled",
                       "--run-dir", tmp_path / "run"))
    assert "check " not in result.stdout and "warning:" not in result.stdout
    result = ok(launch(PLANTED, "--cpu", "--fault", "shifted-test", "--max-steps", "60", "--no-health",
                       "--wandb", "disabled", "--run-dir", tmp_path / "shifted"))  # and the end's comparison
    assert "test/acc 0.0" in result.stdout and "warning:" not in result.stdout + result.stderr


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


def run_tiny(tmp_path, *flags):
    run = tmp_path / "run"
    result = ok(launch(TINY, "--cpu", "--procs", "2", "--log-every", "1", "--wandb", "disabled", "--run-dir", run,
                       *flags))
    return result, [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_healthy_training_raises_no_warning_and_records_each_layer(tmp_path, activation):
    result, records = run_tiny(tmp_path, "--activation", activation)
    assert "warning:" not in result.stdout, result.stdout
    assert "check  pre-flight: no warning" in result.stdout
    assert "verdict: no sign of trouble (training loss " in result.stdout
    sampled = [r for r in records if "health/grad_norm/0.weight" in r]
    assert len(sampled) == 12  # 12 steps, one sample in max(1, 12 // 25)
    for r in sampled:
        assert r["health/grad_norm/0.weight"] > 0 and 1e-5 < r["health/update_ratio/2.weight"] < 1
        assert (r.get("health/dead/1", 0.0) < 0.5) and ("health/dead/1" in r) == (activation == "relu")


def test_dead_relus_are_named(tmp_path):
    result, records = run_tiny(tmp_path, "--activation", "relu", "--first-bias", "-10")
    assert ("warning: step 1: dead ReLUs in 1: 100% of their units output zero for the whole batch"
            in result.stdout)
    assert result.stdout.count("dead ReLUs") == 1  # once, not every step
    assert [e["warnings"] for e in records if e.get("event") == "health"][0][0].startswith("step 1: dead ReLUs in 1")


def test_a_diverging_learning_rate_gets_its_verdict(tmp_path):
    result, records = run_tiny(tmp_path, "--lr", "5", "--schedule", "constant")
    assert "warning: the learning rate looks too high: the training loss rose from" in result.stdout
    # 12 steps: updates of about half the weights per step are not yet judged (fresh weights move fast)
    assert "verdict: too short to judge the size of updates (12 steps;" in result.stdout
    verdict = [e for e in records if e.get("event") == "verdict"][0]
    assert any(f.startswith("the learning rate looks too high") for f in verdict["findings"])


def test_update_sizes_are_judged_over_a_long_enough_run():
    from launcher.health.monitor import Monitor

    watch = Monitor(nn.Linear(2, 2))
    watch.ratios = {"big": [0.2] * 9, "fine": [1e-3] * 9, "frozen": [1e-8] * 9}
    found, unjudged = watch.ratio_findings(200)
    assert [f.split(" (")[0] for f in found] == ["updates are large against the weights in big",
                                                 "updates are tiny against the weights in frozen"]
    assert unjudged == []
    found, unjudged = watch.ratio_findings(30)
    assert found == [] and unjudged[0].startswith("too short to judge the size of updates (30 steps;")
    watch.ratios["huge"] = [2.0] * 9  # updates larger than the weights: wrong at any length
    assert watch.ratio_findings(30)[0][0].startswith("updates are large against the weights in huge")


def test_the_verdict_reads_the_loss_curves():
    from launcher.health.monitor import verdict

    falling = [(s, 2.0 * 0.9 ** s) for s in range(1, 30)]
    assert verdict(falling, [(10, 1.0), (20, 0.8)], None) == ([], [])
    overfit, _ = verdict(falling, [(10, 0.5), (20, 0.7)], None)
    assert len(overfit) == 1
    assert overfit[0].startswith("overfitting: the validation loss rose from 0.5 (step 10) to 0.7")
    flat = [(10 * s, 2.3 - 0.001 * s) for s in range(1, 30)]  # 290 steps: long enough to judge
    found, unjudged = verdict(flat, [], None)
    assert len(found) == 1 and found[0].startswith("underfitting: the training loss barely fell (2.299 → 2.27")
    assert verdict(flat, [], None, initial=2.302)[0][0].startswith("underfitting: the training loss barely fell "
                                                                    "(2.302 → ")  # from the pre-flight's loss
    short = [(s, loss) for s, (_, loss) in enumerate(flat, start=1)]  # the same curve in 29 steps
    assert verdict(short, [], None) == ([], ["too short to judge underfitting (29 steps; 100 at least)"])
    jump = falling[:15] + [(s, 2.5) for s in range(16, 20)] + falling[19:]
    found, _ = verdict(jump, [], None)
    assert len(found) == 1 and found[0].startswith("the learning rate looks too high: the training loss jumped from "
                                                   "0.4")
    noisy = [(s, 2.3 + 0.4 * (-1) ** s) for s in range(1, 31)]
    found, unjudged = verdict(noisy, [], None, initial=2.3)
    assert found == [] and unjudged[0].startswith("too noisy to judge the trend: 2.3 → ")


def test_batch_noise_in_a_short_run_is_not_a_verdict():
    """A 30-step run logged at every step (--debug), its batch losses scattered ±40 % around a falling mean: no
    learning-rate or underfitting warning, however the noise falls."""
    import random

    from launcher.health.monitor import verdict

    for seed in range(20):
        rng = random.Random(seed)
        curve = [(s, (2.3 - 0.02 * s) * rng.uniform(0.6, 1.4)) for s in range(1, 31)]
        found, _ = verdict(curve, [], None, initial=2.31)
        assert found == [], (seed, found)


def test_overfit_mode_passes_a_learnable_recipe_and_fails_when_labels_are_noise(tmp_path):
    common = ("--cpu", "--overfit-batches", "2", "--wandb", "disabled", "--noise", "0.5")
    passed = ok(launch(TINY, *common, "--run-dir", tmp_path / "ok"))
    assert "overfit: passed: the training loss on 2 fixed batches went from " in passed.stdout
    assert "without augmentation, nothing to turn off" in passed.stdout
    # it ends at the first whole pass over the 2 batches below the goal, well inside its budget of 300 × 2 steps
    steps = int(re.search(r"went from [\d.]+ to [\d.]+ in (\d+) steps", passed.stdout)[1])
    assert steps < 600 and steps % 2 == 0 and f"done: {steps} steps" in passed.stdout
    losses = [r["train/loss"] for r in records(tmp_path / "ok") if "train/loss" in r]
    assert len(losses) == steps and sum(losses[-2:]) < 0.1 * sum(losses[:2]) <= sum(losses[-4:-2])
    failed = launch(TINY, *common, "--shuffle-labels", "--save-every", "100", "--run-dir", tmp_path / "noise")
    assert failed.returncode == 1
    assert "overfit: the training loss on 2 fixed batches went from" in failed.stderr + failed.stdout
    assert " in 600 steps " in failed.stderr
    # the check for memorised batches after each pass does not skip what else is due after a step
    assert sorted(p.name for p in (tmp_path / "noise" / "checkpoints").glob("step-*")) == [
        "step-00000400", "step-00000500", "step-00000600"]
    assert "not near zero. A model that cannot memorise a few batches has a bug" in failed.stderr + failed.stdout
    capped = launch(TINY, *common, "--max-steps", "4", "--run-dir", tmp_path / "capped")
    assert capped.returncode == 1 and "has a bug" not in capped.stderr
    assert ("not yet near zero within the --max-steps 4 it was given (the test's own budget is 600 steps, 300 per "
            "batch): run it again without --max-steps before looking for a bug") in capped.stderr, capped.stderr


@pytest.mark.parametrize("recipe", ["digits", "speakers", pytest.param("lm", marks=pytest.mark.slow)])
def test_the_shipped_recipes_pass_their_own_overfit_mode_with_their_defaults(tmp_path, recipe):
    """(recipes/cifar.py too, in 48 steps, 3.4 minutes on 2 CPU cores: README's figure, too slow for the suite; its
    defaults failed at 19 % of the start with the old 50-step schedule, and so did the language model's.)"""
    result = ok(launch(ROOT / "recipes" / f"{recipe}.py", "--cpu", "--overfit-batches", "1", "--wandb", "disabled",
                       "--run-dir", tmp_path / "run"))
    assert re.search(r"^overfit: passed: the training loss on 1 fixed batch went from [\d.]+ to [\d.]+ in \d+ steps ",
                     result.stdout, re.M), result.stdout


def test_find_lr_suggests_a_rate_below_the_minimum_and_draws_the_curve(tmp_path):
    run = tmp_path / "run"
    result = ok(launch(TINY, "--cpu", "--procs", "2", "--find-lr", "--wandb", "offline", "--run-dir", run))
    assert "find-lr: suggested learning rate " in result.stdout
    event = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"find_lr"' in line][0]
    lrs = event["lrs"]
    assert lrs[0] == pytest.approx(1e-7) and all(b > a for a, b in zip(lrs, lrs[1:], strict=False))
    assert 1e-7 < event["suggested_lr"] < event["min_loss_lr"] <= lrs[-1]
    assert len(lrs) < 100  # stopped at divergence
    png = (run / "lr_find.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert list((run / "wandb").glob("offline-run-*/files/media/images/lr_find_*.png"))  # and to W&B
    assert not (run / "checkpoints").exists()


def curve(falls: list[float], flat: int = 0, rises: int = 0) -> list[tuple[float, float]]:
    """(lr, loss) pairs of a sweep: a loss of 4 that stays for `flat` steps, then falls by each of `falls`, then
    doubles `rises` times."""
    losses = [4.0] * (flat + 1)
    for step in falls:
        losses.append(losses[-1] - step)
    losses += [losses[-1] * 2 ** (k + 1) for k in range(rises)]
    return list(zip(debugging.sweep(len(losses)), losses, strict=True))


@pytest.mark.parametrize("tried,said", [
    (curve([0.02] * 20, flat=30, rises=6), "suggested"),
    (curve([1.5, 0.5, 0.3, 0.2] + [0.01] * 40, rises=6), "within the sweep's first 10 steps, an edge where its "
                                                          "average has not settled"),
    (curve([0.01] * 30 + [0.3] * 5, flat=10), "near the sweep's top, and never turned: a higher rate may do better"),
], ids=["a-fall-inside", "a-fall-at-the-start", "a-fall-at-the-top"])
def test_find_lr_never_suggests_an_edge_of_its_sweep(tmp_path, tried, said):
    """A regression whose loss fell fastest in the sweep's first steps was told 1.6e-07, the sweep's start."""
    found = debugging.lr_finding(tried, tmp_path / "lr_find.png")
    lrs = [lr for lr, _ in tried]
    if said == "suggested":
        assert found["line"].startswith("find-lr: suggested learning rate ")
        assert 31 <= lrs.index(found["values"]["suggested_lr"]) <= 51  # where it falls
    else:
        assert found["line"].startswith("find-lr: no suggestion: the smoothed loss fell fastest at ") and said in \
            found["line"], found["line"]
        assert found["values"]["suggested_lr"] is None and found["values"]["edge_lr"] in lrs


VIEWS = ROOT / "tests" / "recipes" / "views.py"


def test_a_contrastive_loss_gets_no_expected_start_and_a_word_on_its_per_process_batch(capsys):
    """InfoNCE over in-batch negatives: its classes are the batch's samples, so ln C says nothing, and the loss
    depends on the samples each process holds."""
    code, out = check(capsys, recipe=VIEWS)
    assert code == 0 and warnings_of(out) == [], out
    assert ("check  loss     initial " in out and "(no expected value: cross_entropy over the samples of each batch "
            "(labels 0 … 63, each once: in-batch negatives, a contrastive loss)") in out
    assert ("check  batch    cross_entropy scores each sample against the 64 of its micro-batch: the loss, and what "
            "the model learns, change with the batch each process holds (64 here") in out
    code, out = check(capsys, "--procs", "2", recipe=VIEWS)
    assert "against the 32 of its micro-batch" in out


def test_random_views_drawn_inside_the_step_are_named_as_the_input_not_a_layer(capsys):
    code, out = check(capsys, "--random-views", recipe=VIEWS)
    found = warnings_of(out)
    assert code == 1 and len(found) == 1, out
    assert found[0].startswith("warning: the same batch evaluated twice reaches 0 (Linear) as other inputs: the "
                               "evaluation step draws something random before the model (augmentation inside "
                               "step()?)") and "dropout" not in found[0]


@pytest.mark.parametrize("flags,message", [
    (("--find-lr", "--overfit-batches", "2"), "--find-lr and --overfit-batches are two separate debugging runs"),
    (("--find-lr", "--engine", "deepspeed"), "--find-lr drives the optimizer's learning rate directly"),
    (("--overfit-batches", "2", "--early-stop", "3"), "--overfit-batches is a fresh debugging run without evaluation"),
    (("--overfit-batches", "-1"), "--overfit-batches must be at least 0, not -1"),
])
def test_debugging_modes_refuse_what_they_cannot_do(tmp_path, capsys, flags, message):
    assert message in refused(capsys, TINY, "--cpu", *flags, "--run-dir", tmp_path / "run")
    assert not (tmp_path / "run").exists()
