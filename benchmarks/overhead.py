"""What the launcher costs, side by side with the references in one run, as ratios.

    pip install -e '.[bench]'      # the Lightning peer (skipped, and said so, without it)
    CIFAR10_DIR=../shared/data python benchmarks/overhead.py [--reps 10] [--cifar-reps 4] [--startup-reps 5]

0. The per-step host overhead in µs: the launcher's trainer (built as `launch` builds it for one process) and the
   hand-written loop train the MLP below side by side in this one process, on one thread, rounds of --per-step-steps
   steps each in turn; the difference of their CPU time per step, with the default health checks and with
   --no-health. Goals: ≥ 0.98 and ≥ 0.99 of hand-written's steps/s.
1. Steps/s on a tiny MLP (benchmarks/mlp.py), one process, one thread, where overhead dominates:
   `launch benchmarks/mlp.py --cpu` against the hand-written loop (benchmarks/handwritten.py) and
   Lightning's Trainer (benchmarks/lightning_peer.py). Goal: launcher ≥ 0.98 of hand-written.
2. Steps/s on the CIFAR-10 network (recipes/cifar.py at --width 16, batch 256, the recipe's augmentation
   and optimizer), launcher against hand-written. Goal ≥ 0.99. The launcher's runs also give the share
   of step time spent waiting for data (goal < 2 %).
3. CIFAR-10 data paths in one fixed budget (one epoch at --width 16, batch 256): the launcher's device-data
   path against --no-device-data (a DataLoader with one worker): epoch seconds and test accuracy.
4. Start-up, command start to the end of the first optimizer step, 2 CPU processes: `launch` against
   `torchrun` and `accelerate launch` running the hand-written loop.

With --gpu, the launcher runs `--gpus 1` and the hand-written loop `--device cuda`, one process each, for rows 1
and 2 (Lightning and the start-up rows stay CPU measures): on a GPU a host–device sync the launcher added per
step would show there (benchmarks/gpu.py runs it so).

With --baseline DIR (another checkout of this repository, e.g. `git worktree add /tmp/base REV`), that
checkout's launcher runs the MLP of 1. as one more side, and the start-up of 4. (its wall time and the CPU
seconds of all the job's processes): what a change costs per step and per start, as ratios. With
--callgrind too, both launchers' instructions per step are counted under valgrind (the difference between
two run lengths, so that start-up cancels out): a figure that does not drift with the machine, where the
steps/s ratio needs many rounds to settle to a percent.

Every repetition is a fresh process and the order alternates, so that drift hits all sides alike; the
first WARMUP steps are left out of every steps/s figure. Nothing is asserted: this machine's noise is
±10 % on a single run, so only the paired, repeated medians mean anything. The script prints the
machine, versions, the exact commands and a table to paste into docs/performance.md.
"""

import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
# the `launch` script beside this Python; where pip put it elsewhere (a system Python), the same entry by -m
LAUNCH = [BIN / "launch"] if (BIN / "launch").exists() else [sys.executable, "-m", "launcher"]
MLP, CIFAR = HERE / "mlp.py", ROOT / "recipes" / "cifar.py"
LOG_EVERY, WARMUP = 100, 200  # MLP
CIFAR_LOG, CIFAR_WARMUP, CIFAR_STEPS = 10, 10, 70
CIFAR_HP = {"width": "16", "batch_size": "256", "val_size": "0"}
LOADER = ["--no-device-data", "--workers", "1"]
STARTUP = ("--procs", "2", "--max-steps", "1", "--log-every", "1")  # start-up: to the end of the first step
CALLGRIND_STEPS = (100, 600)  # two MLP run lengths; instructions per step from their difference
WHERE = {"cpu": ["--cpu"], "cuda": ["--gpus", "1"]}
DEVICE = "cpu"  # where rows 1 and 2 train: main() sets "cuda" for --gpu, before any command is built


def env(threads: int | None = None) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**e, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else e


def run(cmd: list, environ: dict) -> str:
    cmd = [str(c) for c in cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, env=environ, timeout=1200)
    if result.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stdout}\n{result.stderr}")
    return result.stdout


def shown(cmd: list) -> str:
    return " ".join(str(c).replace(str(ROOT) + "/", "").replace(str(BIN) + "/", "") for c in cmd)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rate(windows: list[float], every: int, warmup: int) -> float:
    windows = windows[warmup // every:]
    return len(windows) * every / sum(windows)


def flags(hp: dict) -> list[str]:
    return [x for k, v in hp.items() for x in (f"--{k.replace('_', '-')}", v)]


# ------------------------------------------------------------------ the commands


def launch_cmd(recipe: Path, run_dir: Path, *extra) -> list:
    return [*LAUNCH, recipe, *WHERE[DEVICE], *extra, "--wandb", "disabled", "--run-dir", run_dir]


def mlp_launch(steps: int, run_dir: Path) -> list:
    return launch_cmd(MLP, run_dir, "--clip-grad", "1.0", "--max-steps", steps, "--log-every", LOG_EVERY)


def mlp_module(steps: int, run_dir: Path) -> list:
    """The MLP under `python -m launcher`: the launcher found first on PYTHONPATH (see checkout_env)."""
    return [sys.executable, "-m", "launcher", *mlp_launch(steps, run_dir)[len(LAUNCH):]]


def startup_module(run_dir: Path) -> list:
    """The start-up run under `python -m launcher`, as mlp_module."""
    return [sys.executable, "-m", "launcher", *launch_cmd(MLP, run_dir, *STARTUP)[len(LAUNCH):]]


def checkout_env(environ: dict, checkout: Path) -> dict:
    return {**environ, "PYTHONPATH": f"{checkout}{os.pathsep}{environ.get('PYTHONPATH', '')}"}


def callgrind_per_step(command, environ: dict, tmp: Path, lengths: tuple[int, int] = CALLGRIND_STEPS) -> float:
    """Instructions per optimizer step of `command(steps, run_dir)`, counted by callgrind on one thread: the
    difference between two run lengths, so that start-up and the final evaluation cancel out."""
    counts = []
    for steps in lengths:
        out = tmp / f"callgrind-{steps}.out"
        run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command(steps, tmp / f"run-{steps}")],
            {**environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"})
        counts.append(int(re.search(r"^totals: (\d+)", out.read_text(), re.M).group(1)))
    return (counts[1] - counts[0]) / (lengths[1] - lengths[0])


def instructions_per_step(checkout: Path, tmp: Path) -> float:
    """Instructions of one MLP optimizer step under the launcher of `checkout`."""
    return callgrind_per_step(mlp_module, checkout_env(env(), checkout), Path(tempfile.mkdtemp(dir=tmp)))


def mlp_hand(steps: int) -> list:
    return [sys.executable, HERE / "handwritten.py", MLP, steps, LOG_EVERY, "--clip-grad", "1.0", "--device", DEVICE]


def mlp_lightning(steps: int) -> list:
    return [sys.executable, HERE / "lightning_peer.py", MLP, steps, LOG_EVERY, "--clip-grad", "1.0"]


def cifar_launch(run_dir: Path, cache: Path, *extra) -> list:
    return launch_cmd(CIFAR, run_dir, *flags(CIFAR_HP), "--cache-dir", cache, *extra)


def cifar_hand(cache: Path) -> list:
    hp = {**CIFAR_HP, "cache_dir": str(cache)}
    pairs = [f"{k}={v}" for k, v in hp.items()]
    return [sys.executable, HERE / "handwritten.py", CIFAR, CIFAR_STEPS, CIFAR_LOG, "--device", DEVICE, *pairs]


# ------------------------------------------------------------------ the measures


def launcher_rate(cmd: list, run_dir: Path, every: int, warmup: int, environ: dict) -> tuple[float, float]:
    """(steps/s, share of the timed steps spent waiting for data)."""
    run(cmd, environ)
    timed = [r for r in records(run_dir) if "step_time" in r and r["step"] > warmup]
    seconds = sum(r["step_time"] * every for r in timed)
    return len(timed) * every / seconds, sum(r["data_wait"] * r["step_time"] * every for r in timed) / seconds


def script_rate(cmd: list, every: int, warmup: int, environ: dict) -> float:
    return rate(json.loads(run(cmd, environ).splitlines()[-1])["windows"], every, warmup)


def alternate(reps: int, sides: dict) -> dict[str, list]:
    """Each side's results over `reps` rounds, the order of the sides rotating every round."""
    out = {name: [] for name in sides}
    names = list(sides)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            out[name].append(sides[name](rep))
        latest = {n: out[n][-1][0] if isinstance(out[n][-1], tuple) else out[n][-1] for n in names}
        print(f"  round {rep + 1}: " + ", ".join(f"{n} {v:.4g}" for n, v in latest.items()), file=sys.stderr)
    return out


def epoch_run(tmp: Path, cache: Path, name: str, extra: list) -> tuple[float, float]:
    """(seconds of training in the epoch, test accuracy) for one launcher run of one epoch."""
    run_dir = tmp / name
    run(cifar_launch(run_dir, cache, "--epochs", "1", "--log-every", "5", *extra), env())
    rs = records(run_dir)
    seconds = sum(r["step_time"] * 5 for r in rs if "step_time" in r)
    return seconds, next(r["test/acc"] for r in rs if "test/acc" in r)


def launch_startup(cmd: list, run_dir: Path, environ: dict) -> tuple[float, float]:
    """(seconds from the command's start to the end of the first step, CPU seconds of the whole job: the
    launcher's and its workers', which it waits for)."""
    before, start = os.times(), time.time()
    run(cmd, environ)
    after = os.times()
    return records(run_dir)[0]["time"] - start, after.children_user + after.children_system - (
        before.children_user + before.children_system)


def startup_references() -> dict[str, list]:
    script = [HERE / "handwritten.py", MLP, 1, 1]
    return {"torchrun": [BIN / "torchrun", "--standalone", "--nproc-per-node", "2", *script],
            "accelerate launch": [BIN / "accelerate", "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                                  "--mixed_precision", "no", "--dynamo_backend", "no", *script]}


def script_startup(cmd: list) -> float:
    start = time.time()
    return json.loads(run(cmd, env()).splitlines()[-1])["first_step"] - start


def side_by_side(command: list, rounds: int, steps: int, tmp: Path) -> dict[str, list[float]]:
    """CPU seconds per step of each side, round by round: the launcher's trainer, built from `command` (a `launch`
    command line, less its program) as `launch` builds it for one process, and the hand-written loop on the same
    recipe, hyperparameters and clip, both in this process on one thread, --steps steps each in turn after a
    round to warm up. What the launcher's step itself costs, on a machine whose speed drifts by ±10 % from one
    process to the next."""
    import torch

    from handwritten import Loop
    from launcher.cli import run as cli
    from launcher.engines import group
    from launcher.processes import worker
    from launcher.processes.collector import settle
    from launcher.runs import files as runfiles
    from launcher.runs import record
    from launcher.train.loop import Trainer

    torch.set_num_threads(1)
    total = (rounds + 1) * steps
    plan, recipe, hp, _ = cli.parse([str(c) for c in command])
    Path(plan.run_dir).mkdir(parents=True)
    runfiles.write_json(Path(plan.run_dir) / "config.json", record.record(plan))
    worker.steady_host_memory()
    ours = Trainer(plan, group.accelerator(plan), recipe, hp)
    if ours.length.steps_per_epoch < total:
        sys.exit(f"{total} steps do not fit in one epoch of {ours.length.steps_per_epoch}")
    batches = ours.epoch_batches(0, 0, total)
    hand = Loop(recipe, hp, total, 1, plan.clip_grad)
    order = iter(torch.randperm(len(hand.train)).split(hp.batch_size))
    settle()  # as a worker does before it trains: what start-up made is frozen out of the collector's way

    def launcher() -> None:
        ours.train_step(batches)
        ours.after_step()

    def handwritten() -> None:
        hand.step(next(order))

    sides = {"launcher": launcher, "hand-written": handwritten}
    seconds = {name: [] for name in sides}
    for rnd in range(rounds + 1):
        for name, fn in list(sides.items())[::-1 if rnd % 2 else 1]:
            start = time.process_time()
            for _ in range(steps):
                fn()
            if rnd:
                seconds[name].append((time.process_time() - start) / steps)
        if rnd:
            print(f"  round {rnd}: " + ", ".join(f"{k} {v[-1] * 1e6:.1f} µs" for k, v in seconds.items()),
                  file=sys.stderr)
    return seconds


def per_step_rows(rounds: int, steps: int, tmp: Path) -> tuple[list[str], list[str]]:
    """(commands, rows) of the per-step host overhead on the MLP, with the default health checks and without."""
    commands, rows = [], []
    for health in ([], ["--no-health"]):
        total = (rounds + 1) * steps
        command = [MLP, "--cpu", "--clip-grad", "1.0", "--max-steps", total, "--log-every", LOG_EVERY,
                   "--samples", 32 * total, "--wandb", "disabled", "--run-dir", tmp / f"steps{'-'.join(health)}",
                   *health]
        print(f"MLP per-step CPU time, both loops in one process{', ' + health[0] if health else ''}",
              file=sys.stderr)
        seconds = side_by_side(command, rounds, steps, tmp)
        ours, theirs = seconds["launcher"], seconds["hand-written"]
        extra = [1e6 * (o - t) for o, t in zip(ours, theirs, strict=True)]
        commands.append(f"launch {shown(command)} (built in this process), beside benchmarks/handwritten.py's Loop")
        rows.append(f"| per-step host overhead, MLP, one thread, both loops in one process"
                    f"{', ' + health[0] if health else ', default health checks'}, µs per step | "
                    f"{1e6 * median(ours):.1f} − {1e6 * median(theirs):.1f} = {median(extra):.1f} "
                    f"(min {min(extra):.1f}, max {max(extra):.1f}) | hand-written | {ratio_cell(theirs, ours)} "
                    "(steps/s) |")
    return commands, rows


def median(xs: list) -> float:
    return statistics.median(xs)


def table(commands: list[str], rows: list[str]) -> None:
    """The exact commands, then the rows under a table header: what docs/performance.md pastes."""
    for c in commands:
        print(f"  {c}")
    print("\n| measure | launcher | reference | ratio |\n|---|---|---|---|")
    print("\n".join(rows))


def ratio_cell(ours: list, theirs: list) -> str:
    ratios = [o / t for o, t in zip(ours, theirs, strict=True)]
    return f"{median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10, help="MLP rounds")
    ap.add_argument("--steps", type=int, default=2200, help="MLP steps per run")
    ap.add_argument("--cifar-reps", type=int, default=4)
    ap.add_argument("--epoch-reps", type=int, default=1)
    ap.add_argument("--startup-reps", type=int, default=5, help="0: no start-up rows")
    ap.add_argument("--per-step-reps", type=int, default=8,
                    help="rounds of the per-step host overhead, both loops in this process (0: none)")
    ap.add_argument("--per-step-steps", type=int, default=400, help="steps per side and round of that measure")
    ap.add_argument("--baseline", type=Path, metavar="DIR",
                    help="another checkout of this repository, whose launcher also runs the MLP (a third side)")
    ap.add_argument("--callgrind", action="store_true",
                    help="with --baseline: also count both launchers' instructions per MLP step under valgrind "
                         "(about 10 minutes)")
    ap.add_argument("--gpu", action="store_true", help="rows 1 and 2 on one GPU (the others are left out)")
    ap.add_argument("--cache-dir", type=Path, help="the CIFAR-10 recipe's decoded images (default: decoded anew)")
    args = ap.parse_args()

    import torch

    global DEVICE
    DEVICE = "cuda" if args.gpu else "cpu"
    lightning = importlib.util.find_spec("lightning") is not None and not args.gpu
    cifar_dir = os.environ.get("CIFAR10_DIR")
    rows, commands = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.per_step_reps and not args.gpu:
            commands, rows = per_step_rows(args.per_step_reps, args.per_step_steps, tmp)
        one = env(threads=1)
        sides = {"hand-written": lambda rep: script_rate(mlp_hand(args.steps), LOG_EVERY, WARMUP, one),
                 "launcher": lambda rep: launcher_rate(mlp_launch(args.steps, tmp / f"mlp-{rep}"), tmp / f"mlp-{rep}",
                                                       LOG_EVERY, WARMUP, one)[0]}
        if lightning:
            sides["Lightning"] = lambda rep: script_rate(mlp_lightning(args.steps), LOG_EVERY, WARMUP, one)
        if args.baseline:
            before = checkout_env(one, args.baseline.resolve())
            sides["baseline"] = lambda rep: launcher_rate(mlp_module(args.steps, tmp / f"base-{rep}"),
                                                          tmp / f"base-{rep}", LOG_EVERY, WARMUP, before)[0]
        print("MLP steps/s", file=sys.stderr)
        mlp = alternate(args.reps, sides)
        commands += [shown(mlp_launch(args.steps, Path("RUN"))), shown(mlp_hand(args.steps)),
                     shown(mlp_lightning(args.steps))]
        hand = median(mlp["hand-written"])
        rows.append(f"| steps/s, MLP 64-128-10, batch 32, {'1 GPU' if args.gpu else '1 thread'} | "
                    f"{median(mlp['launcher']):.0f} | {hand:.0f} "
                    f"(hand-written) | {ratio_cell(mlp['launcher'], mlp['hand-written'])} |")
        if lightning:
            rows.append(f"| steps/s, same, the peer | {median(mlp['launcher']):.0f} | {median(mlp['Lightning']):.0f} "
                        f"(Lightning Trainer) | {ratio_cell(mlp['launcher'], mlp['Lightning'])} |")
        elif not args.gpu:
            rows.append("| steps/s, same, the peer | – | not installed: pip install -e '.[bench]' | – |")
        if args.baseline:
            commands.append(f"PYTHONPATH={args.baseline} {shown(mlp_module(args.steps, Path('RUN')))}")
            rows.append(f"| steps/s, same, the launcher of {args.baseline} | {median(mlp['launcher']):.0f} | "
                        f"{median(mlp['baseline']):.0f} (baseline) | {ratio_cell(mlp['launcher'], mlp['baseline'])} |")
        if args.baseline and args.callgrind:
            print("MLP instructions per step (callgrind)", file=sys.stderr)
            ours, theirs = (instructions_per_step(c, tmp) for c in (ROOT, args.baseline.resolve()))
            commands.append(f"valgrind --tool=callgrind {shown(mlp_module(CALLGRIND_STEPS[0], Path('RUN')))} and "
                            f"--max-steps {CALLGRIND_STEPS[1]}, PYTHONHASHSEED=0, each checkout first on PYTHONPATH")
            rows.append(f"| instructions per step, same MLP, callgrind | {ours:,.0f} | {theirs:,.0f} (baseline) | "
                        f"{ours / theirs:.4f} |")

        cache = args.cache_dir or tmp / "cache"
        if cifar_dir and args.cifar_reps:
            print("CIFAR-10 network steps/s", file=sys.stderr)
            extra = ("--max-steps", CIFAR_STEPS, "--log-every", CIFAR_LOG)
            cifar = alternate(args.cifar_reps, {
                "hand-written": lambda rep: script_rate(cifar_hand(cache), CIFAR_LOG, CIFAR_WARMUP, env()),
                "launcher": lambda rep: launcher_rate(cifar_launch(tmp / f"cifar-{rep}", cache, *extra),
                                                      tmp / f"cifar-{rep}", CIFAR_LOG, CIFAR_WARMUP, env())})
            ours = [r for r, _ in cifar["launcher"]]
            commands += [shown(cifar_launch(Path("RUN"), Path("CACHE"), *extra)), shown(cifar_hand(Path("CACHE")))]
            hand = cifar["hand-written"]
            rows.append(f"| steps/s, CIFAR-10 network, width 16, batch 256 | {median(ours):.2f} | {median(hand):.2f} "
                        f"(hand-written) | {ratio_cell(ours, hand)} |")
            waits = [100 * w for _, w in cifar["launcher"]]
            rows.append(f"| share of step time waiting for data, same runs | {median(waits):.2f} % (max "
                        f"{max(waits):.2f} %) | goal < 2 % | – |")
        if cifar_dir and args.epoch_reps:
            print("CIFAR-10 data paths, one epoch", file=sys.stderr)
            paths = alternate(args.epoch_reps, {
                "device data": lambda rep: epoch_run(tmp, cache, f"fast-{rep}", []),
                "DataLoader": lambda rep: epoch_run(tmp, cache, f"loader-{rep}", LOADER)})
            commands += [shown(cifar_launch(Path("RUN"), Path("CACHE"), "--epochs", "1", "--log-every", "5")),
                         f"  the same with {' '.join(LOADER)}"]
            fast, slow = ([s for s, _ in paths[k]] for k in ("device data", "DataLoader"))
            acc_fast, acc_slow = ([a for _, a in paths[k]] for k in ("device data", "DataLoader"))
            rows.append(f"| one CIFAR-10 epoch, s (test accuracy) | {median(fast):.1f} ({median(acc_fast):.3f}), "
                        f"device data | {median(slow):.1f} ({median(acc_slow):.3f}), DataLoader | "
                        f"{median(slow) / median(fast):.2f}× faster |")
        if not cifar_dir:
            rows.append("| CIFAR-10 rows | – | skipped: set CIFAR10_DIR (../shared/data) | – |")

        if args.startup_reps and not args.gpu:
            print("start-up", file=sys.stderr)
            references = startup_references()
            sides = {"launch": lambda rep: launch_startup(launch_cmd(MLP, tmp / f"start-{rep}", *STARTUP),
                                                          tmp / f"start-{rep}", env()),
                     **{name: (lambda rep, cmd=cmd: script_startup(cmd)) for name, cmd in references.items()}}
            if args.baseline:  # `python -m launcher` of each checkout: the same entry for both
                for name, environ in (("launch -m", env()), ("baseline -m", checkout_env(env(), args.baseline))):
                    sides[name] = lambda rep, name=name, environ=environ: launch_startup(
                        startup_module(tmp / name / str(rep)), tmp / name / str(rep), environ)
            starts = alternate(args.startup_reps, sides)
            commands += [shown(launch_cmd(MLP, Path("RUN"), *STARTUP)), *(shown(cmd) for cmd in references.values())]
            ours = median([t for t, _ in starts["launch"]])
            for name in references:
                theirs = median(starts[name])
                rows.append(f"| start-up to the end of the first step, 2 CPU processes, s | {ours:.2f} | "
                            f"{theirs:.2f} (`{name}`) | {ours / theirs:.2f} |")
            if args.baseline:
                commands.append(f"PYTHONPATH={args.baseline} {shown(startup_module(Path('RUN')))}")
                now, then = starts["launch -m"], starts["baseline -m"]
                for i, what in ((0, "start-up, same, s"), (1, "CPU seconds of that job, all its processes")):
                    ours, theirs = [r[i] for r in now], [r[i] for r in then]
                    rows.append(f"| {what}, `python -m launcher` | {median(ours):.2f} | {median(theirs):.2f} "
                                f"(baseline) | {ratio_cell(ours, theirs)} |")

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, torch {torch.__version__}"
          f"{', lightning ' + __import__('lightning').__version__ if lightning else ''}; {time.strftime('%Y-%m-%d')}")
    print(f"rounds: MLP {args.reps}, CIFAR {args.cifar_reps}, epochs {args.epoch_reps}, start-up {args.startup_reps}; "
          "commands:")
    table(commands, rows)


if __name__ == "__main__":
    main()
