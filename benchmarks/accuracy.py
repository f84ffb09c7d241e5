"""CIFAR-10 test accuracy of recipes/cifar.py over several seeds: mean, spread, epochs, time.

    CIFAR10_DIR=../shared/data python benchmarks/accuracy.py --seeds 2 --cpu --procs 2
    python benchmarks/accuracy.py --seeds 5 --gpus 1 --precision bf16 --json out.json
    python benchmarks/accuracy.py --seeds 2 --cpu --procs 2 --width 32      # any flag goes to every run

Every flag this script does not know goes to `launch recipes/cifar.py` as it is, after `--seed S --val-size 0
--wandb disabled` (all the training images train, as the published design's do; a later flag wins). Each
seed is a fresh run in its own folder under --run-dir (default: a temporary one). Per seed: test accuracy
(the recipe's own, with its test-time augmentation), optimizer steps and epochs, training seconds (the
step windows' times: start-up and evaluation left out) and wall seconds from the command's start to its
end (the first seed's includes decoding the images into the cache, which later seeds read). With --tta-table, also
the test accuracy of each run's final weights under every test-time augmentation the recipe has (none, mirror,
translate): what it is worth, without a training run of its own. Prints a table and, with --json, writes the
figures; benchmarks/gpu.py calls it on a GPU.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CIFAR = HERE.parent / "recipes" / "cifar.py"


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def training_seconds(rows: list[dict]) -> float:
    """The logged windows' step times × their steps: the optimizer steps' own time, data waits included."""
    total, last = 0.0, 0
    for r in rows:
        if "step_time" in r:
            total += r["step_time"] * (r["step"] - last)
            last = r["step"]
    return total


def one_seed(seed: int, run_dir: Path, flags: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "launcher", str(CIFAR), "--seed", str(seed), "--val-size", "0", "--wandb", "disabled",
           *flags, "--run-dir", str(run_dir)]
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.time() - start
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"seed {seed}: exit {done.returncode}: {' / '.join(tail)}")
    rows = records(run_dir)
    test = next(r for r in reversed(rows) if "test/acc" in r)
    trained = [r for r in rows if "step_time" in r]
    return {"seed": seed, "test_acc": test["test/acc"], "steps": trained[-1]["step"], "epochs": trained[-1]["epoch"],
            "train_s": round(training_seconds(rows), 2), "wall_s": round(wall, 2)}


def tta_accuracies(run_dir: Path) -> dict[str, float]:
    """Test accuracy of the run's last checkpoint's weights, evaluated here under each of the recipe's TTA modes."""
    sys.path.insert(0, str(CIFAR.parent))
    import cifar
    from launcher.runs import checkpoint

    last = checkpoint.step_dirs(run_dir)[0]
    hp = cifar.Hparams(**json.loads((last / "manifest.json").read_text())["hparams"])
    net = cifar.model(hp).eval()
    net.load_state_dict(checkpoint.load_state(last)["model"])
    x, y = cifar.splits(hp)["test"]
    found = {}
    with torch.no_grad():
        for mode in ("none", "mirror", "translate"):
            net.tta = mode
            hits = sum((net(xb).argmax(1) == yb).sum().item()
                       for xb, yb in zip(x.split(1000), y.split(1000), strict=True))
            found[mode] = hits / len(y)
    return found


def summary(runs: list[dict]) -> dict:
    accs = [r["test_acc"] for r in runs]
    spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return {"seeds": len(runs), "mean_acc": statistics.mean(accs), "std_acc": spread, "min_acc": min(accs),
            "max_acc": max(accs), "mean_train_s": statistics.mean(r["train_s"] for r in runs),
            "mean_wall_s": statistics.mean(r["wall_s"] for r in runs)}


def measure(seeds: int, flags: list[str], root: Path, timeout: float = 3600, first_seed: int = 0,
            tta: bool = False) -> dict:
    runs = []
    for seed in range(first_seed, first_seed + seeds):
        runs.append(r := one_seed(seed, root / f"seed-{seed}", flags, timeout))
        if tta:
            r["tta"] = tta_accuracies(root / f"seed-{seed}")
        each = "".join(f"  {mode} {acc:.4f}" for mode, acc in r.get("tta", {}).items())
        print(f"  seed {seed}: test/acc {r['test_acc']:.4f}  {r['steps']} steps  train {r['train_s']:.1f} s  "
              f"wall {r['wall_s']:.1f} s{each}", file=sys.stderr, flush=True)
    return {"command": f"launch recipes/cifar.py --seed S --val-size 0 --wandb disabled {' '.join(flags)}".strip(),
            "runs": runs, **summary(runs)}


def table(result: dict) -> str:
    rows = "\n".join(f"| {r['seed']} | {r['test_acc']:.4f} | {r['steps']} | {r['epochs']} | {r['train_s']:.1f} | "
                     f"{r['wall_s']:.1f} |" for r in result["runs"])
    return (f"`{result['command']}`\n\n| seed | test acc | steps | epochs | training s | wall s |\n"
            f"|---|---|---|---|---|---|\n{rows}\n"
            f"| mean ± sd | {result['mean_acc']:.4f} ± {result['std_acc']:.4f} | | | {result['mean_train_s']:.1f} | "
            f"{result['mean_wall_s']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--run-dir", type=Path, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--tta-table", action="store_true",
                    help="also each run's weights under every test-time augmentation")
    args, flags = ap.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.seeds, flags, args.run_dir or Path(tmp), first_seed=args.first_seed, tta=args.tta_table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
