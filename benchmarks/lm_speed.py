"""The language-model recipe's tokens/s under the launcher, side by side with a hand-written nanoGPT-style loop
on the same model, data and optimizer (benchmarks/handwritten.py), on one process and on two.

    python benchmarks/lm_speed.py [--reps 3] [--steps 60] [--procs 1 2] [name=value ...]   # hyperparameters, both
    python benchmarks/lm_speed.py --one-process [--reps 12] [--steps 10]   # both loops in one process
    python benchmarks/lm_speed.py --callgrind layers=1 dim=32 heads=2 context=16 batch_size=16   # about 45 min

The launcher runs with --no-health: in runs this short its sampled checks would fall on every other step,
where a real run samples one step in 25. The hand-written loop runs twice: as it is, and with glibc's malloc
set the way the launcher sets it in each worker (by glibc's environment variables), which separates what the
loop costs from what that setting saves. Every repetition is a fresh process, the order rotating; the first
WARMUP steps are left out. Nothing is asserted: the medians and their spread are printed as a table to paste
into docs/performance.md. With --callgrind, it counts both sides' instructions per step on one process and one thread
under valgrind instead: a figure this shared machine's drifting speed cannot blur (on a small model: valgrind
runs some fifty times slower). With --one-process, the launcher's trainer (built as `launch` builds it for one
process) and the hand-written loop train side by side in this one process on one thread, --steps steps each
in turn, and each side's CPU time per step is compared round by round: what the launcher's step itself
costs, on a machine whose speed drifts by ±10 % from one process to the next. (The Lightning peer of
benchmarks/overhead.py takes (x, y) batches and a loss function, not a step: it does not fit this recipe.)
"""

import argparse
import dataclasses
import platform
import sys
import tempfile
import time
from pathlib import Path

from overhead import (
    BIN,
    ROOT,
    alternate,
    callgrind_per_step,
    env,
    launcher_rate,
    median,
    ratio_cell,
    script_rate,
    shown,
    side_by_side,
    table,
)

LM = ROOT / "recipes" / "lm.py"
HAND = Path(__file__).resolve().parent / "handwritten.py"
EVERY, WARMUP = 10, 10
CALLGRIND_STEPS = (100, 300)
# the launcher's setting of glibc's malloc (launcher/processes/worker.py: steady_host_memory), as environment variables
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def launch_cmd(procs: int, steps: int, run_dir: Path, hp: dict) -> list:
    where = ["--procs", procs] if procs > 1 else []
    flags = [x for k, v in hp.items() for x in (f"--{k.replace('_', '-')}", v)]
    return [BIN / "launch", LM, "--cpu", *where, "--max-steps", steps, "--log-every", EVERY, "--no-health",
            "--wandb", "disabled", "--run-dir", run_dir, *flags]


def hand_cmd(procs: int, steps: int, hp: dict) -> list:
    start = [BIN / "torchrun", "--standalone", "--nproc-per-node", procs] if procs > 1 else [sys.executable]
    return [*start, HAND, LM, steps, EVERY, *(f"{k}={v}" for k, v in hp.items()), "--clip-grad", "1.0"]


def tokens_per_step(hp: dict) -> int:
    from launcher.recipe import contract as recipe

    defaults = recipe.load(LM).Hparams()
    resolved = dataclasses.replace(defaults, **{k: type(getattr(defaults, k))(v) for k, v in hp.items()})
    return resolved.batch_size * resolved.context


def instructions(hp: dict, tmp: Path) -> None:
    def launcher(steps: int, run_dir: Path) -> list:  # one process runs inside `launch`: valgrind sees it all
        return [sys.executable, "-m", "launcher", *launch_cmd(1, steps, run_dir, hp)[1:]]

    def hand(steps: int, run_dir: Path) -> list:
        return hand_cmd(1, steps, hp)

    (tmp / "launcher").mkdir()
    (tmp / "hand").mkdir()
    ours = callgrind_per_step(launcher, env(), tmp / "launcher", CALLGRIND_STEPS)
    theirs = callgrind_per_step(hand, env(), tmp / "hand", CALLGRIND_STEPS)
    print(f"\ninstructions per step, the difference between {CALLGRIND_STEPS[1]} and {CALLGRIND_STEPS[0]} steps; "
          f"{time.strftime('%Y-%m-%d')}; commands:")
    table([f"valgrind --tool=callgrind {shown(c(CALLGRIND_STEPS[0], Path('RUN')))}" for c in (launcher, hand)],
          [f"| instructions per step, 1 process, 1 thread | {ours:,.0f} | {theirs:,.0f} (hand-written) | "
           f"{ours / theirs:.4f} |"])


def one_process(rounds: int, steps: int, hp: dict, tmp: Path) -> None:
    import torch

    total = (rounds + 1) * steps  # the first round warms up
    command = launch_cmd(1, total, tmp / "run", hp)
    seconds = side_by_side(command[1:], rounds, steps, tmp)
    tokens = tokens_per_step(hp)
    ours_rate, theirs_rate = ([tokens / s for s in seconds[k]] for k in ("launcher", "hand-written"))
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d')}; {rounds} rounds of {steps} steps per side, after one round to warm up; "
          f"{tokens:,} tokens per step; the launcher's side: {shown(launch_cmd(1, total, Path('RUN'), hp))}")
    table([], [f"| tokens per CPU second, one process, one thread, both loops in it | {median(ours_rate):,.0f} | "
               f"{median(theirs_rate):,.0f} (hand-written) | {ratio_cell(ours_rate, theirs_rate)} |"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--callgrind", action="store_true", help="instructions per step instead of tokens/s")
    ap.add_argument("--one-process", action="store_true", help="both loops in turn in this process, on one thread")
    ap.add_argument("--procs", type=int, choices=(1, 2), nargs="+", default=[1, 2], help="process counts to time")
    ap.add_argument("overrides", nargs="*", metavar="name=value")
    args = ap.parse_args()
    hp = dict(pair.split("=", 1) for pair in args.overrides)
    import torch

    tokens = tokens_per_step(hp)
    rows, commands = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.callgrind:
            return instructions(hp, tmp)
        if args.one_process:
            return one_process(args.reps, args.steps, hp, tmp)
        for procs in args.procs:
            print(f"{procs} process{'es' if procs > 1 else ''}: steps/s", file=sys.stderr)
            sides = alternate(args.reps, {
                "hand-written": lambda rep, p=procs: script_rate(hand_cmd(p, args.steps, hp), EVERY, WARMUP, env()),
                "hand-written, malloc": lambda rep, p=procs: script_rate(hand_cmd(p, args.steps, hp), EVERY, WARMUP,
                                                                         {**env(), **MALLOC}),
                "launcher": lambda rep, p=procs: launcher_rate(
                    launch_cmd(p, args.steps, tmp / f"lm-{p}-{rep}", hp), tmp / f"lm-{p}-{rep}", EVERY, WARMUP,
                    env())[0]})
            ours, theirs, tuned = sides["launcher"], sides["hand-written"], sides["hand-written, malloc"]
            rows.append(f"| tokens/s, {procs} CPU process{'es' if procs > 1 else ''} | {median(ours) * tokens:,.0f} | "
                        f"{median(theirs) * tokens:,.0f} (hand-written) | {ratio_cell(ours, theirs)} |")
            rows.append(f"| the same | {median(ours) * tokens:,.0f} | {median(tuned) * tokens:,.0f} (hand-written, "
                        f"glibc malloc set as the launcher sets it) | {ratio_cell(ours, tuned)} |")
            commands += [shown(launch_cmd(procs, args.steps, Path("RUN"), hp)), shown(hand_cmd(procs, args.steps, hp))]
    print(f"\nmachine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, torch "
          f"{torch.__version__}; {time.strftime('%Y-%m-%d')}; {args.reps} rounds of {args.steps} steps, the first "
          f"{WARMUP} left out; {tokens:,} tokens per step; commands:")
    table(commands, rows)


if __name__ == "__main__":
    main()
