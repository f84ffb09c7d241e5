"""The reference for recipes/cifar.py: airbench94 (the speed record's own trainer, `pip install airbench`), on the
same images the recipe reads, so that the two accuracies and times compare.

    python benchmarks/airbench_ref.py --data ../shared/data/cifar10-jpeg.tar.gz --seeds 3 --json out.json

airbench reads CIFAR-10 from cifar10/train.pt and test.pt under its working directory (uint8 images, N×32×32×3),
downloading them through torchvision when they are missing: this script writes them from the recipe's own
decoding of --data first, in a folder of its own, so nothing is downloaded. airbench is written for CUDA (it
times with CUDA events and trains in fp16); without CUDA the script writes the data, says so and exits 0 with
{"skipped": ...}, unless --cpu asks for airbench's own code to run on the CPU (`cpu_substitutes`: fp32 for
fp16, CUDA's events and device moves made the CPU's, torchvision's Normalize, the one part of torchvision
that airbench uses once its data is there): the target the recipe is held to on these images, measured here.

    python benchmarks/airbench_ref.py --data ../shared/data/cifar10-jpeg.tar.gz --cpu --seeds 1 --first-seed 1
 Per seed: training seconds (airbench's whole train94 call after its warm-up run, the
GPU synchronised at both ends: the whitening fit, every epoch and the weight averaging) and the test accuracy
with airbench's own test-time augmentation (mirror and translate, tta_level 2), as its record counts it.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def write_data(source: Path, cache: Path, folder: Path) -> None:
    """airbench's cifar10/{train,test}.pt from the recipe's decoding of `source` (its cache, when it is there)."""
    sys.path.insert(0, str(ROOT / "recipes"))
    import cifar

    hp = cifar.Hparams(data_dir=str(source), cache_dir=str(cache), download=False)
    arrays = torch.load(cifar.cached(hp), weights_only=True)
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        images = arrays[f"{split}_x"].permute(0, 2, 3, 1).contiguous()  # airbench keeps images channels-last
        torch.save({"images": images, "labels": arrays[f"{split}_y"], "classes": list(cifar.CLASSES)},
                   folder / f"{split}.pt")


def cpu_substitutes() -> None:
    """Let airbench's CUDA-only code run unchanged on the CPU, in fp32. torchvision cannot be installed beside this
    CPU torch, and airbench imports it for transforms.Normalize alone once cifar10/*.pt exist: a module with that
    one function stands in. Its data loader's default device (0, the first GPU) becomes the CPU."""
    import types

    class Event:  # torch.cuda.Event(enable_timing=True) on the host clock
        def __init__(self, enable_timing=False):
            self.at = 0.0

        def record(self):
            self.at = time.perf_counter()

        def elapsed_time(self, end):
            return 1e3 * (end.at - self.at)

    def normalize(mean, std):
        return lambda x: (x - mean.view(-1, 1, 1).to(x)) / std.view(-1, 1, 1).to(x)

    torch.cuda.Event, torch.cuda.synchronize = Event, lambda *_: None
    torch.Tensor.half = lambda self, *_, **__: self.float()
    torch.nn.Module.half = lambda self: self.float()
    torch.nn.Module.cuda = lambda self, *_, **__: self
    vision = types.ModuleType("torchvision")
    vision.transforms = types.SimpleNamespace(Normalize=normalize)
    sys.modules["torchvision"] = sys.modules["torchvision.transforms"] = vision
    import airbench

    del sys.modules["torchvision"], sys.modules["torchvision.transforms"]  # airbench's alone: others see none
    *others, _gpu = airbench.CifarLoader.__init__.__defaults__
    airbench.CifarLoader.__init__.__defaults__ = (*others, "cpu")


def run(seeds: range, warm_up: bool) -> list[dict]:
    import airbench

    if warm_up:
        airbench.warmup94(verbose=False)
    test = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
    runs = []
    for seed in seeds:
        torch.manual_seed(seed)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model = airbench.train94(verbose=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        runs.append({"seed": seed, "test_acc": airbench.evaluate(model, test, tta_level=2),
                     "train_s": round(seconds, 3)})
        print(f"  airbench94 seed {seed}: test/acc {runs[-1]['test_acc']:.4f}  train {seconds:.2f} s",
              file=sys.stderr, flush=True)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="CIFAR-10 as recipes/cifar.py reads it")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--cpu", action="store_true", help="run airbench's code on the CPU (in fp32) where no GPU is")
    ap.add_argument("--cache-dir", type=Path, default=Path("~/.cache/launcher"),
                    help="where the recipe caches the decoded images (its default)")
    ap.add_argument("--work", type=Path, default=Path("airbench-work"), help="airbench's working folder")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    json_out = args.json and args.json.resolve()  # before the chdir into airbench's folder
    write_data(args.data, args.cache_dir, args.work / "cifar10")
    on_cpu = args.cpu and not torch.cuda.is_available()
    if not torch.cuda.is_available() and not on_cpu:
        result = {"skipped": "airbench needs CUDA (or --cpu)"}
    else:
        if on_cpu:
            cpu_substitutes()
        os.chdir(args.work)
        runs = run(range(args.first_seed, args.first_seed + args.seeds), warm_up=not on_cpu)
        accs = [r["test_acc"] for r in runs]
        how = "on the CPU in fp32" if on_cpu else "after airbench.warmup94()"
        result = {"command": f"airbench.train94() {how}, torch.manual_seed(seed)", "runs": runs,
                  "seeds": len(runs), "mean_acc": statistics.mean(accs),
                  "std_acc": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                  "mean_train_s": statistics.mean(r["train_s"] for r in runs)}
    if json_out:
        json_out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
