"""The reference for recipes/cifar.py: airbench94 (the speed record's own trainer, `pip install airbench`), on the
same images the recipe reads, so that the two accuracies and times compare.

    python benchmarks/airbench_ref.py --data ../shared/data/cifar10-jpeg.tar.gz --seeds 3 --json out.json

airbench reads CIFAR-10 from cifar10/train.pt and test.pt under its working directory (uint8 images, N×32×32×3),
downloading them through torchvision when they are missing: this script writes them from the recipe's own
decoding of --data first, in a folder of its own, so nothing is downloaded. airbench needs CUDA (it times with
CUDA events and trains in fp16); without it the script writes the data, says so and exits 0 with
{"skipped": ...}. Per seed: training seconds (airbench's whole train94 call after its warm-up run, the
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


def run(seeds: int) -> list[dict]:
    import airbench

    airbench.warmup94(verbose=False)
    test = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
    runs = []
    for seed in range(seeds):
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
    ap.add_argument("--cache-dir", type=Path, default=Path("~/.cache/launcher"),
                    help="where the recipe caches the decoded images (its default)")
    ap.add_argument("--work", type=Path, default=Path("airbench-work"), help="airbench's working folder")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    json_out = args.json and args.json.resolve()  # before the chdir into airbench's folder
    write_data(args.data, args.cache_dir, args.work / "cifar10")
    if not torch.cuda.is_available():
        result = {"skipped": "airbench needs CUDA"}
    else:
        os.chdir(args.work)
        runs = run(args.seeds)
        accs = [r["test_acc"] for r in runs]
        result = {"command": "airbench.train94() after airbench.warmup94(), torch.manual_seed(seed)", "runs": runs,
                  "seeds": len(runs), "mean_acc": statistics.mean(accs),
                  "std_acc": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                  "mean_train_s": statistics.mean(r["train_s"] for r in runs)}
    if json_out:
        json_out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
