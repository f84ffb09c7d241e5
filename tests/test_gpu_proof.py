"""benchmarks/gpu.py, the one script that proves the launcher on a GPU: its smoke mode runs every step on the CPU
here, so that the GPU run, lent for minutes, does not fail on a typo. The GPU itself cannot be tested here."""

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, clean_env

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

sys.path.insert(0, str(ROOT / "recipes"))
import cifar  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu")
    done = subprocess.run([sys.executable, ROOT / "benchmarks" / "gpu.py", "run", tmp / "out", "--smoke",
                           "--scratch", tmp / "scratch"], capture_output=True, text=True, timeout=600,
                          env=clean_env())
    return tmp, done


@pytest.mark.slow
def test_every_step_runs_in_smoke_mode_and_reports(smoke):
    tmp, done = smoke
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp / "out" / "results.json").read_text())
    steps = results["steps"]
    assert list(steps) == ["smoke", "cifar", "lm", "deepspeed-fp16", "overhead", "checkpoint", "flight-recorder"]
    assert {name: s["status"] for name, s in steps.items()} == {
        "smoke": "ok", "cifar": "ok", "lm": "ok", "deepspeed-fp16": "skipped", "overhead": "ok", "checkpoint": "ok",
        "flight-recorder": "skipped"}
    assert steps["flight-recorder"]["why"] == "the flight recorder needs 2 GPUs (NCCL runs one rank on each)"
    assert steps["deepspeed-fp16"]["why"] == "DeepSpeed's fp16 needs a GPU"
    assert set(steps["smoke"]["result"]) == {"gpu bf16", "gpu fp16", "debug bf16", "debug fp16"}
    assert all(r["steps"] == 20 for r in steps["smoke"]["result"].values())
    ours = steps["cifar"]["result"]["launcher"]
    assert [r["seed"] for r in ours["runs"]] == [0, 1] and all(0 <= r["test_acc"] <= 1 for r in ours["runs"])
    assert ours["mean_acc"] == pytest.approx(sum(r["test_acc"] for r in ours["runs"]) / 2)
    assert steps["cifar"]["result"]["airbench"] == {"skipped": "airbench needs CUDA (or --cpu)"}
    lm = steps["lm"]["result"]
    assert list(lm) == ["DDP, --compile", "DDP", "FSDP", "DeepSpeed ZeRO-2"]
    assert lm.pop("DDP, --compile") == {"skipped": "not compiled in smoke mode"}
    assert all(r["tokens_per_s"] > 0 and r["windows"] >= 2 for r in lm.values()), lm
    assert steps["overhead"]["result"]["ratios"] and all(r > 0 for r in steps["overhead"]["result"]["ratios"])
    md = (tmp / "out" / "results.md").read_text()
    assert [row.split(" | ")[0] for row in steps["checkpoint"]["result"]["table"]] == [
        "| gather", "| sync", "| async", "| load (sharded)"]
    for heading in ("## smoke: ok", "## cifar: ok", "## lm: ok", "## deepspeed-fp16: skipped", "## overhead: ok",
                    "## checkpoint: ok", "## flight-recorder: skipped"):
        assert heading in md
    assert "| DeepSpeed ZeRO-2 | " in md and "| mean ± sd | " in md
    assert (tmp / "out" / "runs" / "lm-fsdp.metrics.jsonl").exists()


@pytest.mark.slow
def test_airbench_reads_the_images_the_recipe_reads(smoke):
    """airbench's train.pt/test.pt (N×32×32×3 uint8) hold exactly the recipe's decoded images and labels."""
    tmp, _ = smoke
    decoded = cifar.decode(tmp / "scratch" / "fake-cifar")
    for split in ("train", "test"):
        theirs = torch.load(tmp / "scratch" / "airbench" / "cifar10" / f"{split}.pt", weights_only=True)
        assert theirs["images"].dtype == torch.uint8 and theirs["images"].shape[1:] == (32, 32, 3)
        assert torch.equal(theirs["images"].permute(0, 3, 1, 2), decoded[f"{split}_x"])
        assert torch.equal(theirs["labels"], decoded[f"{split}_y"])
        assert theirs["classes"] == list(cifar.CLASSES)


AIRBENCH_ON_CPU = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import airbench_ref
airbench_ref.cpu_substitutes()
import airbench
torch.manual_seed(0)
labels = torch.arange(2048) % 10  # each class its own brightness: learnable in a few steps
images = (labels * 25).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 32, 32, 3).contiguous()
for split, n in (("train", 2048), ("test", 500)):
    torch.save({"images": images[:n], "labels": labels[:n], "classes": list("0123456789")}, f"cifar10/{split}.pt")
tiny = lambda: airbench.make_net94(widths={"block1": 8, "block2": 16, "block3": 16})
loader = airbench.CifarLoader("cifar10", train=True, batch_size=128, aug={"flip": True, "translate": 2}, altflip=True)
model = airbench.train94(loader, epochs=3, make_net=tiny, verbose=False)
test = airbench.CifarLoader("cifar10", train=False, batch_size=500)
print(next(model.parameters()).dtype, next(model.parameters()).device, airbench.evaluate(model, test, tta_level=2))
"""


def test_airbench_runs_on_the_cpu_in_fp32(tmp_path):
    """airbench's own trainer, written for CUDA, trains on the CPU with the reference script's substitutes: its
    weights in fp32 on the CPU, and it learns (in a fresh process: the substitutes change torch for good)."""
    (tmp_path / "cifar10").mkdir()
    done = subprocess.run([sys.executable, "-c", AIRBENCH_ON_CPU, ROOT / "benchmarks"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=clean_env())
    assert done.returncode == 0, done.stderr
    dtype, device, acc = done.stdout.split()
    assert (dtype, device) == ("torch.float32", "cpu") and float(acc) > 0.5, done.stdout


def fp16_rows(scales, norms, losses):
    return [{"step": i + 1, "loss_scale": s, "grad_norm": n, "train/loss": loss}
            for i, (s, n, loss) in enumerate(zip(scales, norms, losses, strict=True))]


DDP = fp16_rows([65536.0, 32768.0, 32768.0], [math.inf, 2.0, 1.5], [5.5, 5.4, 5.3])


@pytest.mark.parametrize("ds,verdict", [
    (fp16_rows([65536.0, 32768.0, 32768.0], [math.inf, 2.001, 1.5], [5.5, 5.4, 5.301]), None),
    (fp16_rows([65536.0, 65536.0, 32768.0], [math.inf, 2.0, 1.5], [5.5, 5.4, 5.3]),
     "step 2: loss_scale 32768 under DDP, 65536 under DeepSpeed"),
    (fp16_rows([65536.0, 32768.0, 32768.0], [1.9, 2.0, 1.5], [5.5, 5.4, 5.3]),
     "step 1: grad_norm inf under DDP, 1.9 under DeepSpeed"),
    (fp16_rows([65536.0, 32768.0, 32768.0], [math.inf, 2.0, 1.6], [5.5, 5.4, 5.3]),
     "step 3: grad_norm 1.5 under DDP, 1.6 under DeepSpeed"),
    (fp16_rows([65536.0, 32768.0], [math.inf, 2.0], [5.5, 5.4]), "3 logged steps under DDP, 2 under DeepSpeed"),
])
def test_deepspeed_fp16_is_verified_only_when_every_step_matches_ddp(ds, verdict):
    result = gpu.compare_fp16(DDP, ds)
    if verdict is None:
        assert result == {"verified": True, "steps": 3, "loss_scales": [32768.0, 65536.0], "skipped_steps": 1,
                          "final_loss": [5.3, 5.301]}
    else:
        assert result == {"verified": False, "why": verdict}
