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
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .. import flags
from ..errors import UsageError
from ..plan import SECRET
from ..runs.record import REDACTED
from . import run
from .leaderboard import load

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
    parser, module = run.recipe_parser(recipe)
    actions = {option: action for action in parser._actions for option in action.option_strings}
    fixed, specs, tokens = [], [], iter(rest)
    for token in tokens:
        flag, eq, value = token.partition("=")
        action = actions.get(flag)
        if action is None:
            raise UsageError(run.unknown_flag([token], parser))
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
        run.parse([*sweep.argv(index), "--resume", "auto"])  # a bad value is this one line, before anything starts
    return sweep, args
