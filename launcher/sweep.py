"""Sweeps: `launch sweep RECIPE [flags] SPEC ...` runs one trial per set of values, each an ordinary run in
SWEEP_DIR/trial-I, one after another here, several at once where the machine has room, or as one Slurm job array.
SWEEP_DIR/sweep.json records the trials, so the same command continues a sweep: completed trials are kept, the
others resume from their checkpoints or start. `launch status SWEEP_DIR` ranks the trials (see `table`).

A SPEC is a flag whose value names several: a list (`--batch-size 256,512`), a range (`--dropout 0:0.5`) or a
log range (`--lr log:1e-4:1e-1`), drawn from at random (`--trials N`, from `--sweep-seed`), or with `--grid` the
product of lists. Any other flag is the same for every trial.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import cli, flags, jobs, rundir
from .errors import UsageError
from .leave import die_with
from .plan import SECRET
from .record import REDACTED
from .runfiles import update_summary, write_json
from .text import count, duration, first_line

RANGE = re.compile(r"(log:)?([^:]+):([^:]+)")
SIGNIFICANT = 3  # digits a drawn float keeps: a flag value and a table column a person reads
# flags a sweep sets itself (each trial's folder, name, resumption); the sweep's own --run-dir and --name are its own
OWN = ("--run-dir", "--name", "--resume", "--wandb-group")
# with --slurm every task of the array gets one allocation: these cannot differ between trials
ALLOCATION = ("--nodes", "--gpus", "--procs", "--workers", "--partition", "--time", "--account", "--qos",
              "--constraint", "--mem", "--cpus-per-task")
USAGE = ("launch sweep RECIPE [launcher or hyperparameter flags] (--trials N | --grid) SPEC ...\n"
         "  SPEC: --FLAG A,B,C (a list) | --FLAG LOW:HIGH (uniform) | --FLAG log:LOW:HIGH (log-uniform)")


@dataclass
class Spec:
    """One searched flag: a list of values, or a range (log-uniform with `log`; whole numbers with `integer`)."""
    flag: str
    text: str
    values: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    def draw(self, rng: random.Random):
        if self.values is not None:
            return rng.choice(self.values)
        if self.log:
            x = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            x = rng.uniform(self.low, self.high)
        if self.integer:
            return min(max(round(x), int(self.low)), int(self.high))
        return min(max(float(f"{x:.{SIGNIFICANT}g}"), self.low), self.high)


def spec_of(flag: str, value: str, action: argparse.Action) -> Spec | None:
    """The Spec a flag's value names, None for a single value, or UsageError for a bad one."""
    def convert(text: str):
        try:
            converted = action.type(text) if action.type else text
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            raise UsageError(f"{flag} {value}: {text!r} is not a value {flag} takes") from None
        if action.choices is not None and converted not in action.choices:
            raise UsageError(f"{flag} {value}: {text!r} is not one of {', '.join(map(str, action.choices))}")
        return converted

    if "," in value:
        values = [convert(part) for part in value.split(",")]
        if len(set(values)) < len(values):
            raise UsageError(f"{flag} {value}: a value is listed twice")
        return Spec(flag, value, values=values)
    match = RANGE.fullmatch(value)
    if not match:
        return None
    low, high = convert(match[2]), convert(match[3])
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (low, high)):
        if match[1]:
            raise UsageError(f"{flag} {value}: a range needs a flag that takes a number")
        return None  # a value with a colon in it (an address, say)
    if low >= high:
        raise UsageError(f"{flag} {value}: the range's ends are {'swapped' if low > high else 'equal'} "
                         f"(LOW:HIGH with LOW < HIGH)")
    if match[1] and low <= 0:
        raise UsageError(f"{flag} {value}: a log range must lie above zero")
    return Spec(flag, value, low=low, high=high, log=bool(match[1]),
                integer=isinstance(low, int) and isinstance(high, int))


@dataclass
class Sweep:
    recipe: str
    fixed: list[str]  # the flags every trial shares, as given
    shown: list[str]  # and as sweep.json records them: a secret's value masked
    specs: list[Spec]
    trials: list[dict]  # per trial: {flag: value}
    folder: Path
    name: str
    best: tuple[str, str]  # the recipe's (metric, "min" or "max")

    def argv(self, index: int) -> list[str]:
        """Trial `index`'s launch command, less the program."""
        values = [token for flag, value in self.trials[index].items() for token in (flag, str(value))]
        return [self.recipe, *self.fixed, *values, "--run-dir", str(self.trial_dir(index)),
                "--name", f"{self.name}-{index}", "--wandb-group", self.name]

    def trial_dir(self, index: int) -> Path:
        return self.folder / f"trial-{index}"

    def record(self) -> dict:
        """sweep.json, as JSON reads it back."""
        return json.loads(json.dumps({"recipe": self.recipe, "fixed": self.shown, "trials": self.trials,
                                      "specs": [dataclasses.asdict(s) for s in self.specs], "name": self.name,
                                      "best": self.best}))


def options() -> flags.Parser:
    """The sweep's own options; every other flag is a trial's."""
    own = flags.Parser(prog="launch sweep", usage=USAGE, add_help=False, allow_abbrev=False,
                       description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    group = own.add_argument_group("sweep options")
    group.add_argument("--trials", type=int, metavar="N", help="random search: N trials, each value drawn at random")
    group.add_argument("--grid", action="store_true", help="every combination of the lists instead")
    group.add_argument("--sweep-seed", type=int, default=0, metavar="S", help="the seed of the draws (default 0)")
    group.add_argument("--max-parallel", type=int, metavar="M",
                       help="trials at once (default: here, as many as the GPUs hold, else 1; with --slurm, all)")
    group.add_argument("--run-dir", metavar="SWEEP_DIR", help="the sweep's folder, a run directory per trial inside "
                                                              "(default: runs/RECIPE-sweep-HASH of the command)")
    group.add_argument("--name", help="the sweep's name: its W&B group, and its trials' names NAME-I (default: "
                                      "the folder's name)")
    group.add_argument("--dry-run", action="store_true", help="print the trials and start nothing")
    return own


def plan(argv: list[str]) -> tuple[Sweep, argparse.Namespace]:
    """The sweep `launch sweep ARGV` asks for, every trial's command checked as `launch` checks one, or UsageError."""
    if not argv or argv[0].startswith("-"):
        raise UsageError(f"usage: {USAGE}")
    recipe, rest = argv[0], argv[1:]
    args, rest = options().parse_known_args(rest)
    if args.grid == (args.trials is not None):
        raise UsageError("give --trials N (random search) or --grid (every combination of the lists), one of them")
    if args.trials is not None and args.trials < 1 or args.max_parallel is not None and args.max_parallel < 1:
        raise UsageError("--trials and --max-parallel must be at least 1")
    parser, module = cli.recipe_parser(recipe)
    actions = {option: action for action in parser._actions for option in action.option_strings}
    fixed, specs, tokens = [], [], iter(rest)
    for token in tokens:
        flag, eq, value = token.partition("=")
        action = actions.get(flag)
        if action is None:
            raise UsageError(cli.unknown_flag([token], parser))
        if flag in OWN:
            raise UsageError(f"{flag}: a sweep sets it for each trial")
        if action.nargs == 0:  # a switch
            fixed.append(token)
            continue
        value = value if eq else next(tokens, None)
        if value is None:
            raise UsageError(f"{flag} needs a value")
        spec = spec_of(flag, value, action)
        if spec is None:
            fixed += [flag, value]
        elif any(s.flag == flag for s in specs):
            raise UsageError(f"{flag} is searched twice")
        else:
            specs.append(spec)
    if not specs:
        raise UsageError("nothing to search: give at least one SPEC (--FLAG A,B,C, --FLAG LOW:HIGH or --FLAG "
                         "log:LOW:HIGH)")
    if "--slurm" in fixed:
        shaped = next((s.flag for s in specs if s.flag in ALLOCATION), None)
        if shaped:
            raise UsageError(f"{shaped} cannot be searched with --slurm: every task of the job array has one "
                             "allocation")
    if args.grid:
        ranged = next((s for s in specs if s.values is None), None)
        if ranged:
            raise UsageError(f"{ranged.flag} {ranged.text}: --grid takes lists (A,B,C); a range is drawn from with "
                             "--trials N")
        trials = [{}]
        for spec in specs:
            trials = [{**t, spec.flag: v} for t in trials for v in spec.values]
    else:
        rng = random.Random(args.sweep_seed)
        trials = [{spec.flag: spec.draw(rng) for spec in specs} for _ in range(args.trials)]
    secret = {flags.option(f.name) for f in dataclasses.fields(module.Hparams) if SECRET.search(f.name)}
    if secret & {s.flag for s in specs}:
        raise UsageError(f"{min(secret & {s.flag for s in specs})} is a secret: a sweep searches none")
    given = secret & {token.split("=", 1)[0] for token in fixed}
    if given and "--slurm" in fixed:
        raise UsageError(f"{min(given)} is a secret, and each task of a Slurm job array reads its command from a "
                         "file, where no secret goes: let the recipe read it from the environment")
    recipe = str(Path(recipe).resolve())
    shown = flags.mask(fixed, secret, lambda flag: REDACTED)[0]  # what sweep.json records
    # the same command, the same folder: what makes rerunning it continue the sweep
    key = hashlib.sha1(json.dumps([recipe, shown, trials]).encode()).hexdigest()[:8]
    folder = Path(args.run_dir or Path("runs") / f"{Path(recipe).stem}-sweep-{key}")
    sweep = Sweep(recipe, fixed, shown, specs, trials, folder, args.name or folder.name,
                  tuple(getattr(module, "best", ("val/loss", "min"))))
    before = load(folder)
    if before and (before["recipe"], before["fixed"], before["trials"]) != (recipe, shown, sweep.record()["trials"]):
        raise UsageError(f"--run-dir {folder} holds another sweep (its recipe, flags or trials differ): choose "
                         "another --run-dir, or rerun that sweep's own command")
    for index in range(len(trials)):
        cli.parse([*sweep.argv(index), "--resume", "auto"])  # a bad value is this one line, before anything starts
    return sweep, args


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(options().format_help(), end="")
        return 0
    try:
        sweep, args = plan(argv)
        slots = None if "--slurm" in sweep.fixed else _slots(sweep, args.max_parallel)
        print(trials_table(sweep))
        if args.dry_run:
            return 0
        rundir.make(sweep.folder)
        write_json(sweep.folder / "sweep.json", sweep.record())
        if slots is None:
            return submit(sweep, args)
    except UsageError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
    return run_here(sweep, slots)


def trials_table(sweep: Sweep) -> str:
    heads = ["TRIAL", *(s.flag[2:] for s in sweep.specs)]
    rows = [[str(i), *(str(t[s.flag]) for s in sweep.specs)] for i, t in enumerate(sweep.trials)]
    return f"launch: sweep {sweep.name}: {count(len(rows), 'trial')} in {sweep.folder}\n" + columns([heads, *rows])


def columns(cells: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def _pending(sweep: Sweep) -> tuple[list[int], int]:
    """The trials still to run (a stopped or failed one resumes from its checkpoint), and how many completed
    before. One that is queued or running (an earlier submission's job, say) is left to finish."""
    pending, completed = [], 0
    for index in range(len(sweep.trials)):
        row = jobs.status(sweep.trial_dir(index)) if jobs.is_run(sweep.trial_dir(index)) else {"state": "new"}
        if row["state"] in jobs.ACTIVE:
            job = f" (job {row['slurm_job']})" if row.get("slurm_job") else ""
            print(f"launch: trial {index} is {row['state']}{job}: left to it")
        elif row["state"] == "completed":
            completed += 1
        else:
            pending.append(index)
    return pending, completed


def _slots(sweep: Sweep, parallel: int | None) -> list[dict]:
    """The environment of each trial that may run at once here: its own GPUs, or its own CPU cores."""
    plan0 = cli.parse([*sweep.argv(0), "--resume", "auto"])[0]
    if plan0.device == "cuda":
        import torch

        visible = torch.cuda.device_count()
        fit = max(1, visible // plan0.nproc)
        n = min(parallel or fit, fit)
        if parallel and parallel > fit:
            raise UsageError(f"--max-parallel {parallel}: {visible} GPUs give {fit} trials of {plan0.nproc} at once")
        devices = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(visible)))).split(",")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(devices[k * plan0.nproc:(k + 1) * plan0.nproc])} for k in range(n)]
    cores = sorted(os.sched_getaffinity(0))
    n = parallel or 1
    share = len(cores) // n
    if share < plan0.nproc:
        raise UsageError(f"--max-parallel {n} × {count(plan0.nproc, 'process')} per trial needs "
                         f"{n * plan0.nproc} CPU cores; this machine gives {len(cores)}")
    return [{"cores": cores[k * share:(k + 1) * share]} for k in range(n)]


def run_here(sweep: Sweep, slots: list[dict]) -> int:
    """Run the pending trials on this machine, as many at once as there are slots; a stop signal stops every
    running trial as it stops a run (each saves a checkpoint), and rerunning the command continues."""
    pending, completed = _pending(sweep)
    if completed:
        print(f"launch: {completed} of {count(len(sweep.trials), 'trial')} completed before"
              + (f"; running the other {len(pending)}" if pending else ""), flush=True)
    logs = sweep.folder / "logs"
    logs.mkdir(exist_ok=True)
    running: dict[int, tuple[subprocess.Popen, dict, float]] = {}
    failed, stopping = [], []

    def stop(signum, frame):
        stopping.append(signum)
        for proc, _, _ in running.values():
            proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while pending or running:
            free = [slot for slot in slots if all(slot is not s for _, s, _ in running.values())]
            while pending and free and not stopping:
                index, slot = pending.pop(0), free.pop(0)
                running[index] = (_start(sweep, index, slot, logs), slot, time.monotonic())
                print(f"launch: trial {index} started: {_values(sweep.trials[index])}", flush=True)
            for index, (proc, _, began) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[index]
                row = jobs.status(sweep.trial_dir(index)) if jobs.is_run(sweep.trial_dir(index)) else {}
                if proc.returncode:
                    failed.append(index)
                print(f"launch: trial {index} {_outcome(row, proc.returncode, logs)} "
                      f"({duration(time.monotonic() - began)})", flush=True)
            if stopping and not running:
                break
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(status_text(sweep.folder), flush=True)
    if stopping:
        print(f"launch: sweep stopped by {signal.Signals(stopping[0]).name}; the same command continues it",
              file=sys.stderr)
        return 128 + stopping[0]
    if failed:
        print(f"launch: {count(len(failed), 'trial')} failed ({', '.join(map(str, failed))}): the same command "
              "runs them again, from their checkpoints", file=sys.stderr)
        return 1
    return 0


def _start(sweep: Sweep, index: int, slot: dict, logs: Path) -> subprocess.Popen:
    """A trial's launcher, in a session of its own: a Ctrl-C reaches the sweep alone, which stops each trial once
    (a second signal would cut its checkpoint short); and stopped as SIGTERM stops a run if the sweep dies."""
    parent = os.getpid()

    def child():
        die_with(parent, signal.SIGTERM)
        if slot.get("cores"):
            os.sched_setaffinity(0, slot["cores"])

    env = {**os.environ, **{k: v for k, v in slot.items() if k != "cores"}}
    with open(logs / f"trial-{index}.out", "a") as out:  # the child has its own copy
        return subprocess.Popen([sys.executable, "-P", "-m", "launcher", *sweep.argv(index), "--resume", "auto"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, preexec_fn=child)


def _values(values: dict) -> str:
    return " ".join(f"{flag} {value}" for flag, value in values.items())


def _outcome(row: dict, code: int, logs: Path) -> str:
    if not row:
        return f"failed before it started (exit {code}): see {logs}"
    best = row.get("best")
    text = row["state"] + (f", best {best['metric']} {best['value']:.4g} at step {best['step']}" if best else "")
    return text + (f": {row['reason']}" if row.get("reason") and row["state"] != "completed" else "")


def submit(sweep: Sweep, args: argparse.Namespace) -> int:
    """--slurm: ONE job array whose task I runs trial I (those not completed), at most --max-parallel at once.
    Each task's command is in SWEEP_DIR/trials/I.args; each task requeues itself as a single job does."""
    from . import record, slurm

    pending, completed = _pending(sweep)
    if not pending:
        print(f"launch: no trial of {sweep.folder} is left to submit ({completed} completed)")
        return 0
    (sweep.folder / "trials").mkdir(exist_ok=True)
    plans = {}
    for index in pending:
        argv = sweep.argv(index)
        plan, _, _, given = cli.parse(argv)
        plans[index] = plan, given
        command = [*slurm.node_command(argv, given.recipe), "--run-dir", plan.run_dir, "--name", plan.name]
        (sweep.folder / "trials" / f"{index}.args").write_text("\n".join(command) + "\n")
        rundir.make(Path(plan.run_dir))
        write_json(Path(plan.run_dir) / "config.json", record.record(plan, argv))
    folder, task = shlex.quote(str(sweep.folder.resolve())), '"$SLURM_ARRAY_TASK_ID"'
    each = f"{folder}/trial-{task}"
    values = {
        "script": shlex.quote(str(sweep.folder.resolve() / "slurm.sbatch")),
        "job_name": shlex.quote(sweep.name),
        "log": shlex.quote(str(sweep.folder.resolve() / "trial-%a" / "slurm-%A_%a.out")),
        "run_dir": each, "checkpoints": f"{each}/checkpoints", "exit_codes": f"{each}/logs/exit-codes",
        "args": f"@{folder}/trials/{task}.args",
    }
    array = ",".join(map(str, pending)) + (f"%{args.max_parallel}" if args.max_parallel else "")
    try:
        script = slurm.render(*plans[pending[0]], [], sys.executable, Path.cwd(), array, values)
        job = slurm.submit(script, {})
    except slurm.SlurmError as e:
        raise UsageError(str(e)) from None
    (sweep.folder / "slurm.sbatch").write_text(script)
    for index in pending:
        update_summary(plans[index][0].run_dir, state="queued", reason=None, slurm_job=f"{job}_{index}")
    print(f"launch: submitted job array {job} ({count(len(pending), 'task')}"
          f"{f', {args.max_parallel} at once' if args.max_parallel else ''}): task I runs trial I\n"
          f"  status:  launch status {shlex.quote(str(sweep.folder))}\n"
          f"  cancel:  scancel {job}", flush=True)
    return 0


def load(folder: Path) -> dict | None:
    path = folder / "sweep.json"
    return json.loads(path.read_text()) if path.exists() else None


def rows(folder: Path) -> list[dict]:
    """Each trial's status row with its values, the best first by the recipe's metric; trials without one last."""
    record = load(folder)
    metric, mode = record["best"]
    out = []
    for index, values in enumerate(record["trials"]):
        where = folder / f"trial-{index}"
        row = jobs.status(where) if jobs.is_run(where) else {"run": str(where), "state": "pending"}
        out.append({"trial": index, "values": values, **row})

    def key(row):
        best = row.get("best")
        if not best or best["metric"] != metric:
            return (1, 0.0, row["trial"])
        return (0, best["value"] if mode == "min" else -best["value"], row["trial"])

    return sorted(out, key=key)


def edges(folder: Path, ranked: list[dict]) -> list[str]:
    """A warning for each searched number whose best trial took the smallest or largest value tried (of three or
    more): the optimum may lie beyond the range."""
    record = load(folder)
    scored = [r for r in ranked if r.get("best")]
    warnings = []
    if len(scored) < 3:
        return warnings
    for spec in record["specs"]:
        flag = spec["flag"]
        tried = sorted({r["values"][flag] for r in scored if isinstance(r["values"][flag], (int, float))})
        top = scored[0]["values"][flag]
        if len(tried) >= 3 and top in (tried[0], tried[-1]):
            side = "smallest" if top == tried[0] else "largest"
            warnings.append(f"warning: the best {scored[0]['best']['metric']} came with the {side} {flag} tried "
                            f"({top}): the best value may lie beyond the range; search further that way")
    return warnings


def status_main(argv: list[str]) -> int:
    """`launch status SWEEP_DIR [--json]`."""
    parser = argparse.ArgumentParser(prog="launch status", description="How a sweep stands: its trials, best first.")
    parser.add_argument("folder", type=Path, metavar="SWEEP_DIR")
    parser.add_argument("--json", action="store_true", help="one JSON object per trial, for scripts")
    args = parser.parse_args(argv)
    print("\n".join(json.dumps(row) for row in rows(args.folder)) if args.json else status_text(args.folder))
    return 0


def status_text(folder: Path) -> str:
    """`launch status SWEEP_DIR`: the trials as a table, best first, the edge warnings, and the pictures drawn."""
    record = load(folder)
    ranked = rows(folder)
    flags_ = [s["flag"] for s in record["specs"]]
    cells = [["TRIAL", "STATE", *(f[2:] for f in flags_), f"BEST {record['best'][0]} ({record['best'][1]})",
              "STEP"]]
    for row in ranked:
        best = row.get("best")
        cells.append([str(row["trial"]), row["state"], *(str(row["values"][f]) for f in flags_),
                      f"{best['value']:.4g} @{best['step']}" if best else "-",
                      f"{row['step']}/{row['total_steps']}" if row.get("total_steps") else "-"])
    lines = [f"sweep {record['name']}: {folder}", columns(cells), *edges(folder, ranked)]
    reasons = [f"  trial {r['trial']}: {first_line(r['reason'])}" for r in ranked
               if r.get("reason") and r["state"] not in ("completed", "stopped")]
    drawn = draw(folder, record, ranked)
    if drawn:
        lines.append(f"pictures: {', '.join(str(p) for p in drawn)}")
    return "\n".join(lines + reasons)


def draw(folder: Path, record: dict, ranked: list[dict]) -> list[Path]:
    """A picture per searched number: the best metric of each trial against its value (a log axis for a log
    range), in SWEEP_DIR/pictures."""
    scored = [r for r in ranked if r.get("best")]
    if not scored:
        return []
    from . import pictures

    written = []
    for spec in record["specs"]:
        points = [(r["values"][spec["flag"]], r["best"]["value"]) for r in scored]
        if all(isinstance(x, (int, float)) for x, _ in points):
            path = folder / "pictures" / f"{spec['flag'][2:]}.png"
            pictures.save(pictures.sweep(points, spec, record["best"], record["name"]), path)
            written.append(path)
    return written
