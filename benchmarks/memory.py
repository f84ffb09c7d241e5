"""Memory per process under each engine, side by side: DDP, ZeRO-1/2/3 (and offload), FSDP.

    python benchmarks/memory.py [--procs 2] [--steps 6] [--width 2048]

Each engine trains benchmarks/wide.py (Ψ ≈ 16.8 M parameters, AdamW, fp32) for a few steps on
`--procs` CPU processes; every process reports its resident memory before the model is built, the
highest resident memory in a training forward from the third step on ("steady": weights, gradients
and optimizer state all exist), and its peak. The table gives steady minus baseline per process,
its ratio to DDP's, and the model-state bytes the ZeRO paper's accounting expects for fp32 training
with Adam (4 bytes of weights, 4 of gradients, 8 of optimizer state per parameter = 16·Ψ, split over
N processes as each stage shards them). On a machine without a GPU, offloading moves state from
"device" to host memory, which is the same memory: its figure shows the cost of the copies, not a
saving.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
MB = 2**20

ENGINES = {  # name: (flags, expected model-state bytes per process as a multiple of Ψ, for N processes)
    "ddp": ((), lambda n: 16),
    "zero1": (("--engine", "deepspeed", "--zero", "1"), lambda n: 4 + 4 + 8 / n),
    "zero2": (("--engine", "deepspeed", "--zero", "2"), lambda n: 4 + 12 / n),
    "zero3": (("--engine", "deepspeed", "--zero", "3"), lambda n: 16 / n),
    "zero3-offload": (("--engine", "deepspeed", "--zero", "3", "--offload", "both"), lambda n: 16 / n),
    "fsdp": (("--engine", "fsdp"), lambda n: 16 / n),
}


def measure(name: str, flags: tuple, args, tmp: Path) -> tuple[list[dict], list[str]]:
    report = tmp / name
    report.mkdir()
    cmd = [str(BIN / "launch"), str(HERE / "wide.py"), "--cpu", "--procs", str(args.procs), *flags,
           "--max-steps", str(args.steps), "--width", str(args.width), "--wandb", "disabled",
           "--run-dir", str(tmp / f"run-{name}"), "--report", str(report)]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stdout}\n{result.stderr}")
    return [json.loads((report / f"report-{r}.json").read_text()) for r in range(args.procs)], cmd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--width", type=int, default=2048)
    args = parser.parse_args()
    import torch

    rows, commands = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (flags, expected) in ENGINES.items():
            reports, cmd = measure(name, flags, args, Path(tmp))
            commands.append(" ".join(cmd))
            params = reports[0]["params"]
            steady = sum(r["steady"] - r["baseline"] for r in reports) / len(reports)
            peak = sum(r["peak"] - r["baseline"] for r in reports) / len(reports)
            rows.append((name, steady, peak, expected(args.procs) * params, params))
    ddp = rows[0][1]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} · Python "
          f"{platform.python_version()} · torch {torch.__version__} · {args.procs} processes, Ψ = {rows[0][4]:,} "
          f"parameters, AdamW, fp32, {args.steps} steps\n")
    print("| engine | steady MB per process | vs DDP | expected model state MB (16·Ψ accounting) | peak MB |")
    print("|---|---|---|---|---|")
    for name, steady, peak, expected, _ in rows:
        print(f"| {name} | {steady / MB:.0f} | {steady / ddp:.2f} | {expected / MB:.0f} | {peak / MB:.0f} |")
    print("\ncommands:\n" + "\n".join(commands))


if __name__ == "__main__":
    main()
