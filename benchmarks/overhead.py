"""What the launcher costs: its loop against a hand-written loop, and its start-up against torchrun.

    python benchmarks/overhead.py [--reps 10] [--steps 2200] [--startup-reps 5]

1. Steps/s on a tiny MLP (benchmarks/mlp.py), one process, one thread: `launch
   benchmarks/mlp.py --cpu` against benchmarks/handwritten.py, each repetition a
   fresh process, in alternating order. Both read the loss every LOG_EVERY steps and
   time those windows the same way; the first WARMUP steps are left out. Reported: the
   median steps/s of each and the median of the per-pair ratios (goal ≥ 0.98).
2. Start-up: seconds from the command's start to the end of the first optimizer step,
   `launch benchmarks/mlp.py --cpu --procs 2` against `torchrun --nproc-per-node 2
   benchmarks/handwritten.py`, alternating.

Nothing is asserted: this machine's noise is ±10 % on a single run, so only the paired,
repeated figures mean anything. Paste the table into README's performance section.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
LOG_EVERY, WARMUP = 100, 200


def one_thread_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(cmd: list[str], env: dict) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stdout}\n{result.stderr}")
    return result.stdout


def launcher_cmd(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [str(BIN / "launch"), str(HERE / "mlp.py"), "--cpu", *extra, "--clip-grad", "1.0", "--max-steps",
            str(steps), "--wandb", "disabled", "--run-dir", str(run_dir)]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def launcher_steps_per_s(steps: int, tmp: Path, rep: int) -> float:
    run_dir = tmp / f"loop-{rep}"
    run(launcher_cmd(run_dir, steps, "--log-every", str(LOG_EVERY)), one_thread_env())
    windows = [r["step_time"] * LOG_EVERY for r in records(run_dir) if r["step"] > WARMUP]
    return len(windows) * LOG_EVERY / sum(windows)


def handwritten_steps_per_s(steps: int) -> float:
    out = json.loads(run([sys.executable, str(HERE / "handwritten.py"), str(steps), str(LOG_EVERY)],
                         one_thread_env()).splitlines()[-1])
    windows = out["windows"][WARMUP // LOG_EVERY:]
    return len(windows) * LOG_EVERY / sum(windows)


def launcher_startup(tmp: Path, rep: int) -> float:
    run_dir = tmp / f"start-{rep}"
    start = time.time()
    run(launcher_cmd(run_dir, 1, "--procs", "2", "--log-every", "1"), {**os.environ, "WANDB_MODE": "disabled"})
    return records(run_dir)[0]["time"] - start


def torchrun_startup() -> float:
    start = time.time()
    out = run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2",
               str(HERE / "handwritten.py"), "1", "1"], dict(os.environ))
    return json.loads(out.splitlines()[-1])["first_step"] - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=2200)
    ap.add_argument("--startup-reps", type=int, default=5)
    args = ap.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw, ours = [], []
        for rep in range(args.reps):
            for side in ("hand-written", "launcher")[:: 1 if rep % 2 == 0 else -1]:  # alternate who goes first
                if side == "launcher":
                    ours.append(launcher_steps_per_s(args.steps, tmp, rep))
                else:
                    raw.append(handwritten_steps_per_s(args.steps))
            print(f"  loop rep {rep + 1}: hand-written {raw[-1]:.0f} steps/s, launcher {ours[-1]:.0f} steps/s",
                  file=sys.stderr)
        torchrun, launch = [], []
        for rep in range(args.startup_reps):
            for side in ("torchrun", "launch")[:: 1 if rep % 2 == 0 else -1]:
                if side == "launch":
                    launch.append(launcher_startup(tmp, rep))
                else:
                    torchrun.append(torchrun_startup())
            print(f"  start-up rep {rep + 1}: torchrun {torchrun[-1]:.2f} s, launch {launch[-1]:.2f} s",
                  file=sys.stderr)

    ratios = [o / r for o, r in zip(ours, raw, strict=True)]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    print(f"per-step: MLP 64-128-10, batch 32, AdamW, clip 1.0, 1 thread, {args.steps - WARMUP} timed steps after "
          f"{WARMUP}, {args.reps} alternating fresh-process pairs")
    print(f"  launch benchmarks/mlp.py --cpu --clip-grad 1.0 --max-steps {args.steps} --log-every {LOG_EVERY}")
    print(f"  python benchmarks/handwritten.py {args.steps} {LOG_EVERY}")
    print(f"start-up: command start → end of the first optimizer step, 2 CPU processes, {args.startup_reps} "
          "alternating pairs")
    print("  launch benchmarks/mlp.py --cpu --procs 2 --clip-grad 1.0 --max-steps 1 --log-every 1")
    print("  torchrun --standalone --nproc-per-node 2 benchmarks/handwritten.py 1 1\n")
    print("| measure | launcher | reference | ratio |")
    print("|---|---|---|---|")
    print(f"| steps/s, tiny MLP (median) | {statistics.median(ours):.0f} | {statistics.median(raw):.0f} (hand-written) "
          f"| {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}) |")
    print(f"| start-up to first step, s (median) | {statistics.median(launch):.2f} | {statistics.median(torchrun):.2f} "
          f"(torchrun) | {statistics.median(launch) / statistics.median(torchrun):.2f} |")


if __name__ == "__main__":
    main()
