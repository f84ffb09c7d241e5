"""The same recipe under every engine, 2 CPU processes over gloo: the same losses, gradient norms, metrics
and weights as DDP, and checkpoints that resume exactly under the engine that wrote them."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import (
    ROOT,
    TINY,
    assert_same,
    cifar_source,
    eval_record,
    launch,
    ok,
    params,
    refused,
    tiny,
    train_records,
)
from launcher.engines import zero
from launcher.plan import Plan
from launcher.runs import export

COMMON = ("--max-steps", "12", "--noise", "0.1", "--log-every", "1", "--grad-accum", "2", "--clip-grad", "0.5",
          "--batch-size", "16")
ENGINES = {
    "zero1": ("--engine", "deepspeed", "--zero", "1"),
    "zero2": ("--engine", "deepspeed", "--zero", "2"),
    "zero3": ("--engine", "deepspeed", "--zero", "3"),
    "zero3-offload": ("--engine", "deepspeed", "--zero", "3", "--offload", "both"),
    "fsdp": ("--engine", "fsdp"),
    "fsdp-grad-op": ("--engine", "fsdp", "--sharding", "grad-op"),
    "fsdp-offload": ("--engine", "fsdp", "--offload", "both"),
}
NAMES = {"zero1": "DeepSpeed ZeRO-1", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3",
         "zero3-offload": "DeepSpeed ZeRO-3 offload both", "fsdp": "FSDP2 full", "fsdp-grad-op": "FSDP2 grad-op",
         "fsdp-offload": "FSDP2 full with CPU offload"}
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}  # float32 reductions in another order: last-bit differences


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    folder, _ = tiny(tmp_path_factory.mktemp("ddp"), "ddp", *COMMON, procs=2)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each engine's run of COMMON on 2 processes, saving at step 6 too: (folder, result), made once each; the
    run DDP's is compared with, and the uninterrupted run its resumed twin must end like."""
    made = {}

    def run(engine: str):
        if engine not in made:
            folder = tmp_path_factory.mktemp(engine)
            made[engine] = tiny(folder, "straight", *COMMON, "--save-every", "6", *ENGINES[engine], procs=2)
        return made[engine]
    return run


def checkpoint_weights(folder) -> dict:
    """The whole weights in the last checkpoint, whatever the engine (what `launch export` writes)."""
    return export.weights(folder / "run" / "checkpoints" / "step-00000012")


def in_process(folder, engine) -> dict:
    """The weights as each rank held them at exit, put together: FSDP shards along the first dimension;
    ZeRO-1/2 keep whole weights on every rank (which must agree); ZeRO-3 keeps them in its partitions."""
    held = [params(folder, rank) for rank in range(2)]
    if engine.startswith("fsdp"):
        return {k: torch.cat([h[k] for h in held]) for k in held[0]}
    if engine in ("zero1", "zero2"):
        assert_same(held[1], held[0])
        return held[0]
    return checkpoint_weights(folder)


@pytest.mark.parametrize("engine", ENGINES)
def test_an_engine_trains_like_ddp(ddp, trained, engine):
    folder, result = trained(engine)
    assert f" · {NAMES[engine]} · " in result.stdout.splitlines()[0]  # the engine asked for, named at the start
    losses, reference = train_records(folder / "run"), train_records(ddp / "run")
    assert losses.keys() == reference.keys() == set(range(1, 13))
    for step in losses:
        for key in ("train/loss", "grad_norm", "lr"):
            assert losses[step][key] == pytest.approx(reference[step][key], rel=1e-5), (step, key)
    for split in ("val", "test"):
        got, want = eval_record(folder / "run", split), eval_record(ddp / "run", split)
        assert got.keys() == want.keys()
        for key in got:
            assert got[key] == pytest.approx(want[key], rel=1e-5), (split, key)
    ddp_weights = params(ddp, 0)
    assert_same(params(ddp, 1), ddp_weights)
    for weights in (in_process(folder, engine), checkpoint_weights(folder)):  # as trained, and as saved
        assert weights.keys() == ddp_weights.keys()
        for k in weights:
            torch.testing.assert_close(weights[k], ddp_weights[k], **TOLERANCE)
    assert_same(in_process(folder, engine), checkpoint_weights(folder))
    exported = folder / "run" / "exports" / "run-step-00000012.safetensors"
    assert ok(launch("export", folder / "run")).stdout == f"launch: exported {exported}\n"
    assert_same(load_file(exported), checkpoint_weights(folder))


@pytest.mark.parametrize("engine", ["zero1", "zero2", "zero3", "zero3-offload", "fsdp", "fsdp-grad-op"])
def test_an_engine_resumes_exactly_from_its_own_checkpoint(tmp_path, trained, engine):
    common = (*COMMON, "--save-every", "6", *ENGINES[engine])
    straight, _ = trained(engine)
    stopped, result = tiny(tmp_path, "stopped", *common, "--crash-at", "8", procs=2, check=False)
    assert result.returncode == 1 and "planted crash" in result.stderr
    tiny(tmp_path, "stopped", *common, "--crash-at", "8", "--resume", "auto", procs=2)
    assert_same(in_process(stopped, engine), in_process(straight, engine))
    assert_same(checkpoint_weights(stopped), checkpoint_weights(straight))


# no augmentation noise: each rank draws its own, so that another world size would train on other inputs
CROSS = ("--max-steps", "12", "--log-every", "1", "--grad-accum", "2", "--clip-grad", "0.5", "--batch-size", "16",
         "--save-every", "6")


@pytest.mark.parametrize("before,after", [(("fsdp", 2), ("ddp", 1)), (("ddp", 1), ("fsdp", 2)),
                                          (("ddp", 2), ("fsdp", 2))], ids=["fsdp2-ddp1", "ddp1-fsdp2", "ddp2-fsdp2"])
def test_a_checkpoint_resumes_on_another_world_size_and_engine_as_the_run_would_have_gone_on(tmp_path, before, after):
    """DCP's shards, keyed by parameter name: the weights and optimizer state carry over, resharded, and the run
    ends as the uninterrupted one (to float32's reduction order: the processes sum in another grouping)."""
    (engine, procs), (then, procs_then) = before, after
    straight, _ = tiny(tmp_path, "straight", *CROSS, "--engine", engine, procs=procs, dump=False)
    source = straight / "run" / "checkpoints" / "step-00000006"
    resumed, result = tiny(tmp_path, "resumed", *CROSS, "--engine", then, "--resume", source, procs=procs_then,
                           dump=False)
    assert f"resumed from {source} at step 6" in result.stdout
    if engine != then:
        assert (f"launch: resuming under --engine {then} a checkpoint --engine {engine} wrote: its weights and "
                "optimizer state carry over, resharded") in result.stdout
    want, got = (export.weights(folder / "run" / "checkpoints" / "step-00000012") for folder in (straight, resumed))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)
    assert train_records(resumed / "run").keys() == set(range(7, 13))


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(("zero2", 2), ("fsdp", 2)), (("ddp", 1), ("zero2", 2)),
                                          (("fsdp", 2), ("zero3", 2))], ids=["zero2-fsdp", "ddp1-zero2", "fsdp-zero3"])
def test_deepspeed_and_the_other_engines_take_each_others_weights_progress_and_schedule(tmp_path, before, after):
    """Neither side reads the other's optimizer state: the resumed run says that it starts afresh, and goes on from
    the checkpoint's weights (its first loss is the uninterrupted run's), step and schedule (the same rates)."""
    (engine, procs), (then, procs_then) = before, after
    flags = {name: ENGINES.get(name, ("--engine", name)) for name in (engine, then)}
    straight, _ = tiny(tmp_path, "straight", *CROSS, *flags[engine], procs=procs, dump=False)
    source = straight / "run" / "checkpoints" / "step-00000006"
    resumed, result = tiny(tmp_path, "resumed", *CROSS, *flags[then], "--resume", source, procs=procs_then,
                           dump=False)
    assert f"resumed from {source} at step 6" in result.stdout
    written, now = (flags[x][flags[x].index("--engine") + 1] for x in (engine, then))
    assert (f"launch: warning: resuming under --engine {now} a checkpoint --engine {written} wrote: its weights, "
            "progress and schedule carry over; the optimizer state (momentum, Adam's moments) starts afresh") \
        in result.stderr, result.stderr
    want, got = train_records(straight / "run"), train_records(resumed / "run")
    assert got.keys() == set(range(7, 13))
    assert got[7]["train/loss"] == pytest.approx(want[7]["train/loss"], rel=1e-5)
    assert [got[s]["lr"] for s in got] == pytest.approx([want[s]["lr"] for s in got], rel=1e-6)


@pytest.mark.slow
def test_a_deepspeed_checkpoint_resumes_on_another_number_of_processes_through_a_universal_one(tmp_path):
    """ZeRO-2 on 2 processes, resumed on 1: the launcher converts the partitions with DeepSpeed's ds_to_universal,
    DeepSpeed loads that with load_universal, and the run ends as the uninterrupted one (AdamW, dropout 0); an
    optimizer the conversion does not know (SGD's momentum) is refused before anything starts, saying why."""
    flags = (ROOT / "recipes" / "digits.py", "--cpu", *ENGINES["zero2"], "--hidden", "64", "--dropout", "0",
             "--max-steps", "8", "--save-every", "4", "--wandb", "disabled")
    ok(launch(*flags, "--procs", "2", "--run-dir", tmp_path / "straight"))
    source = tmp_path / "straight" / "checkpoints" / "step-00000004"
    resumed = ok(launch(*flags, "--run-dir", tmp_path / "resumed", "--resume", source))
    converted = tmp_path / "resumed" / "checkpoints" / "universal-step-00000004"
    assert (f"launch: converting {source} into {converted}, a universal checkpoint that DeepSpeed loads on any "
            "number of processes") in resumed.stdout
    assert f"resumed from {converted} at step 4" in resumed.stdout and "MPU" not in resumed.stderr
    want, got = (export.weights(tmp_path / run / "checkpoints" / "step-00000008") for run in ("straight", "resumed"))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)

    sgd, _ = tiny(tmp_path, "sgd", "--max-steps", "2", "--save-every", "2", *ENGINES["zero2"], procs=2, dump=False)
    source = sgd / "run" / "checkpoints" / "step-00000002"
    refused = launch(TINY, "--cpu", *ENGINES["zero2"], "--run-dir", tmp_path / "again", "--resume", source)
    assert refused.returncode == 2 and refused.stderr.splitlines()[-1] == (
        f"launch: error: --resume: {source}: DeepSpeed cannot make a universal checkpoint of it for another number "
        "of processes: its conversion carries Adam's moments alone, and this optimizer keeps none ('exp_avg' missing); "
        "resume it on 2 processes, or under --engine fsdp or ddp (its weights, progress and schedule carry over)"), \
        refused.stderr
    assert not (tmp_path / "again" / "checkpoints" / "universal-step-00000002").exists()


def test_fp16_under_fsdp_trains_like_ddp_fp16(tmp_path, ddp):
    """fp16 autocast with a loss scaler, on the CPU: FSDP's shard-aware scaler and DDP's skip the same
    overflowing step (a planted NaN in step 3) and halve the scale alike, so losses, norms and weights agree."""
    flags = (*COMMON, "--precision", "fp16", "--nan-at", "5")
    folders = {name: tiny(tmp_path, name, *flags, *extra, procs=2)[0]
               for name, extra in (("ddp", ()), ("fsdp", ENGINES["fsdp"]))}
    got, want = train_records(folders["fsdp"] / "run"), train_records(folders["ddp"] / "run")
    assert want.keys() == got.keys() == set(range(1, 13))
    for step in want:
        for key in ("train/loss", "grad_norm", "lr", "loss_scale"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, nan_ok=True), (step, key)
    assert [want[s]["loss_scale"] for s in (2, 3, 12)] == [2.0**16, 2.0**15, 2.0**15]
    assert math.isnan(want[3]["grad_norm"])
    fp32 = train_records(ddp / "run")[1]["train/loss"]
    assert want[1]["train/loss"] != fp32 and want[1]["train/loss"] == pytest.approx(fp32, rel=1e-2)  # fp16 ran
    weights = in_process(folders["fsdp"], "fsdp")
    for k, w in params(folders["ddp"], 0).items():
        torch.testing.assert_close(weights[k], w, **TOLERANCE)


@pytest.mark.parametrize("engine", ["zero2", "fsdp"])
def test_one_process_runs_the_engine_too(tmp_path, engine):
    """In a single process (inside launch itself) the engine's code path still runs, in a group of one."""
    folder, result = tiny(tmp_path, "one", "--max-steps", "4", *ENGINES[engine])
    assert f" · {NAMES[engine]} · " in result.stdout and "done: 4 steps" in result.stdout


@pytest.mark.parametrize("flags,config,message", [
    (("--sharding", "grad-op"), None, "--sharding grad-op is for --engine fsdp, not ddp"),
    (("--offload", "both"), None, "--offload both is for --engine fsdp or deepspeed, not ddp"),
    (("--zero", "3"), None, "--zero 3 is for --engine deepspeed, not ddp"),
    (("--engine", "fsdp", "--offload", "optimizer"), None, "FSDP offloads parameters, gradients and the optimizer"),
    (("--engine", "deepspeed", "--offload", "params"), None, "--offload params needs --zero 3"),
    (("--engine", "deepspeed", "--precision", "fp16"), None, "--engine deepspeed with --precision fp16 is not "
     "supported"),
    (("--engine", "fsdp", "--compile"), None, "--compile works with --engine ddp (and one process) for now, not fsdp"),
    (("--engine", "zero"), None, "argument --engine: invalid choice: 'zero'"),
    (("--engine", "deepspeed", "--grad-accum", "2"), {"gradient_accumulation_steps": 4},
     "--deepspeed-config: gradient_accumulation_steps 4 contradicts --grad-accum 2"),
    (("--engine", "deepspeed",), {"gradient_clipping": 1.0},
     "--deepspeed-config: gradient_clipping 1.0 contradicts --clip-grad 0.0"),
    (("--engine", "deepspeed", "--batch-size", "32"), {"train_batch_size": 64},
     "--deepspeed-config: train_batch_size 64 contradicts --batch-size 32"),
    (("--engine", "deepspeed", "--batch-size", "32"), {"train_micro_batch_size_per_gpu": 8},
     "--deepspeed-config: train_micro_batch_size_per_gpu 8 contradicts --batch-size 32 (32 per process and "
     "micro-step here)"),
    (("--engine", "deepspeed", "--precision", "bf16"), {"fp16": {"enabled": True}},
     "--deepspeed-config: fp16.enabled true contradicts --precision bf16"),
    (("--engine", "deepspeed", "--zero", "2"), {"zero_optimization": {"stage": 3}},
     "--deepspeed-config: zero_optimization.stage 3 contradicts --zero 2"),
    (("--engine", "deepspeed",), {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
     "--deepspeed-config: zero_optimization.offload_optimizer.device cpu contradicts --offload none"),
    (("--engine", "deepspeed",), {"optimizer": {"type": "Adam"}},
     "--deepspeed-config: its optimizer block contradicts the recipe's optimizer()"),
    (("--engine", "deepspeed",), "{not json", "is not JSON"),
])
def test_engine_settings_that_contradict_each_other_exit_2(tmp_path, capsys, flags, config, message):
    if config is not None:
        (tmp_path / "ds.json").write_text(config if isinstance(config, str) else json.dumps(config))
        flags = (*flags, "--deepspeed-config", tmp_path / "ds.json")
    assert message in refused(capsys, TINY, "--cpu", *flags, "--run-dir", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_deepspeed_fp16_stays_refused_on_the_cpu_even_when_asked_for_unverified(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(zero.UNVERIFIED_FP16, "1")
    assert "needs a GPU to verify (benchmarks/gpu.py)" in refused(
        capsys, TINY, "--cpu", "--engine", "deepspeed", "--precision", "fp16", "--run-dir", tmp_path / "run")


def test_deepspeed_fp16_scales_the_loss_as_torchs_grad_scaler_does():
    """What benchmarks/gpu.py compares on a GPU, DeepSpeed's fp16 against DDP's: the same dynamic loss scale."""
    plan = Plan(recipe="r.py", hparams={"batch_size": 32}, run_dir="run", name="r", engine="deepspeed", zero=2,
                precision="fp16", device="cuda")
    fp16 = zero.config(plan, {"fp16": {"enabled": True, "loss_scale_window": 100}})["fp16"]
    scaler = torch.amp.GradScaler("cpu")
    assert 2 ** fp16["initial_scale_power"] == scaler.get_scale()
    assert fp16["loss_scale_window"] == scaler.get_growth_interval()
    assert (fp16["hysteresis"], fp16["loss_scale"], fp16["enabled"]) == (1, 0, True)  # halve on each overflow
    assert (scaler.get_backoff_factor(), scaler.get_growth_factor()) == (0.5, 2.0)  # DeepSpeed's fixed factors
    assert "fp16" not in zero.config(Plan(**{**plan.__dict__, "precision": "bf16"}), {})


NONFINITE = ("--max-steps", "8", "--nan-at", "5", "--skip-nonfinite")


@pytest.fixture(scope="module")
def ddp_skipping(tmp_path_factory):
    folder, _ = tiny(tmp_path_factory.mktemp("ddp-skipping"), "ddp", *NONFINITE, procs=2)
    return folder


@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp"])
def test_a_nonfinite_step_is_skipped_like_under_ddp(tmp_path, ddp_skipping, engine):
    """DeepSpeed drops such a step itself; the launcher still counts it and advances the schedule."""
    ddp = ddp_skipping
    folder, result = tiny(tmp_path, engine, *NONFINITE, *ENGINES[engine], procs=2)
    assert "step 5: non-finite gradient" in result.stdout and "(1 step skipped: non-finite)" in result.stdout
    for split in ("val", "test"):
        got, want = eval_record(folder / "run", split), eval_record(ddp / "run", split)
        for key in got:
            assert got[key] == pytest.approx(want[key], rel=1e-5), (split, key)


def test_export_takes_the_newest_checkpoint_or_a_named_one_and_refuses_anything_else(tmp_path, ddp):
    out = tmp_path / "weights.safetensors"
    assert ok(launch("export", ddp / "run", "--out", out)).stdout == f"launch: exported {out}\n"
    assert_same(load_file(out), params(ddp, 0))
    best = ddp / "run" / "checkpoints" / "best"
    ok(launch("export", best, "--out", out))
    torch_save = tmp_path / "best.pt"  # torch's own reading of the shards, to compare with
    dcp_to_torch_save(best / "sharded", torch_save)
    assert_same(load_file(out), torch.load(torch_save, weights_only=True)["model"])
    result = launch("export", tmp_path)
    assert result.returncode == 2 and result.stderr == (f"launch: error: {tmp_path} is neither a checkpoint nor a "
                                                        "run directory with a complete checkpoint\n")


@pytest.mark.slow
@pytest.mark.skipif(cifar_source() is None, reason="CIFAR10_DIR does not point at CIFAR-10 (.ci/run sets it to "
                                                   "../shared/data, which holds cifar10-jpeg.tar.gz)")
def test_the_cifar_recipe_runs_under_every_engine_alike(tmp_path, cifar_cache):
    """The flagship recipe (frozen whitening and batch-norm gains, channels-last inputs) is the same recipe under
    DDP, FSDP and ZeRO-3: the same metrics after 4 steps on 2 processes."""
    # without the pre-flight's search of 60,000 images and the test split's six passes each: the engines are
    # the subject here, and those would cost a quarter of a minute a run
    common = ("--cpu", "--procs", "2", "--width", "4", "--batch-size", "64", "--val-size", "256", "--max-steps", "4",
              "--eval-every", "4", "--wandb", "disabled", "--cache-dir", cifar_cache, "--no-health", "--tta", "none")
    results = {}
    for name, flags in (("ddp", ()), ("fsdp", ENGINES["fsdp"]), ("zero3", ENGINES["zero3"])):
        ok(launch(ROOT / "recipes" / "cifar.py", *common, *flags, "--run-dir", tmp_path / name, timeout=600))
        results[name] = eval_record(tmp_path / name, "val")
    for name in ("fsdp", "zero3"):
        for key, value in results["ddp"].items():
            assert results[name][key] == pytest.approx(value, rel=1e-4), (name, key)
