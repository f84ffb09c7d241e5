"""The launcher's flags, each declared once: a field of `Flags` with its type, default, bounds, group and help.

The parser, the bounds checks, what a recipe's `defaults` may set, and the `Plan` fields named like a flag
are all derived from this one table; `cli/run.py` adds only the checks that read several flags at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import math
import typing
from dataclasses import dataclass, field
from typing import Literal

from .errors import UsageError

DEBUG_STEPS = 30  # --debug's run length
STEP_TIMEOUT = 300.0  # --step-timeout on GPUs; torchtitan gives training 100 s, its start 300 s
# --overfit-batches' budget of steps per batch, under the recipe's schedule stretched over it: the run ends as soon as
# the batches are memorised, so a long budget costs a healthy model nothing and keeps its learning rate near the peak
# while it memorises (squeezed into 50 steps, CIFAR's warm-up and decay left it at 19 % of its start)
OVERFIT_STEPS = 300
USAGE = "launch RECIPE [launcher flags] [recipe hyperparameter flags]"
COMMANDS = """commands on runs (each with its own --help):
  launch status [RUN_DIR ...]   how runs stand: state, step, loss, best metric, ETA (a folder of runs too)
  launch logs RUN_DIR [-f]      what a run printed (its console.log); -f follows it to the end
  launch cancel RUN_DIR         stop a run as SIGTERM does: it saves a checkpoint, and ends
  launch resume RUN_DIR [flags] continue a run with the command it was started with (and these flags)
  launch sweep RECIPE [flags] SPEC ...   search hyperparameters (--lr log:1e-4:1e-1): a run per trial
  launch export RUN_DIR|CHECKPOINT   a checkpoint's whole weights as safetensors"""
GROUPS = {  # the sections of --help, in order, with what each says of its flags
    "where it runs": None,
    "engine": "how the model is distributed; the same recipe and result under each",
    "training": None,
    "checkpoints and faults": None,
    "Slurm": "submit the run as a batch job instead: one task per node runs launch",
    "Kubernetes": "write the run as a Kubeflow Trainer TrainJob instead: one pod per node runs launch",
    "logging": None,
}


def flag(group: str, default=None, help: str | None = None, *, metavar: str | None = None, low=None, high=None,
         why: str = "") -> typing.Any:
    """One flag: `low`/`high` bound its value (a float must be finite too); `why` says what is wrong beyond them."""
    return field(default=default, metadata={"group": group, "help": help, "metavar": metavar, "low": low,
                                            "high": high, "why": why})


WHERE, ENGINE, TRAINING, FAULTS, SLURM, KUBERNETES, LOGGING = GROUPS


@dataclass
class Flags:
    recipe: str | None = field(default=None, metadata={"help": "path of the recipe file, e.g. recipes/cifar.py"})

    debug: bool = flag(WHERE, False, f"one process in this process (a debugger works), first GPU or the CPU, "
                                     f"{DEBUG_STEPS} steps, one evaluation, anomaly detection on")
    gpus: int | None = flag(WHERE, None, "N processes on this node, one GPU each", metavar="N", low=1)
    cpu: bool = flag(WHERE, False, "run on the CPU (gloo); with --procs N, N processes")
    procs: int | None = flag(WHERE, None, "with --cpu: number of processes", metavar="N", low=1)
    nodes: int | None = flag(WHERE, None, "machines in the job; run launch on each with its --node-rank (default: "
                                          "what the environment says, README's table, else 1)", metavar="N", low=1)
    min_nodes: int | None = flag(WHERE, None, "with --nodes N: an elastic job that trains on when nodes leave, down "
                                              "to M of them, and takes them back when they return (also written "
                                              "--nodes M:N, as torchrun does)", metavar="M", low=1)
    node_rank: int | None = flag(WHERE, None, "this machine's place, 0 … N-1 (default: what the environment says, "
                                              "such as the node a Slurm job step runs it on, else 0)", metavar="I",
                                 low=0)
    master_addr: str | None = flag(WHERE, None, "with --nodes: node 0's address, reachable from every node",
                                   metavar="HOST")
    master_port: int | None = flag(WHERE, None, "the rendezvous port on node 0 (default: 29500 with --nodes, else any "
                                                "free port)", metavar="PORT", low=1, high=65535, why="it is not a port")
    rendezvous_timeout: int = flag(WHERE, 60, "with --nodes: how long node 0 waits for every node to join (default "
                                              "60); the others try to reach it for half as long, once or twice",
                                   metavar="SECONDS", low=2)
    workers: int | None = flag(WHERE, None, "DataLoader workers per process for per-sample datasets (default: 0 on "
                                            "CPU, 4 on GPU)", metavar="N", low=0)
    device_data: bool = flag(WHERE, True, "keep a recipe's tensor data set whole on the device when it fits in a "
                                          "quarter of the free memory and cut batches there by index, without a "
                                          "DataLoader (default); --no-device-data sends every batch through a "
                                          "DataLoader instead")

    engine: Literal["ddp", "fsdp", "deepspeed"] = flag(
        ENGINE, "ddp", "ddp: a whole copy per process (default); fsdp: parameters, gradients and optimizer state "
                       "sharded over the processes (torch FSDP2); deepspeed: ZeRO")
    zero: Literal[1, 2, 3] | None = flag(ENGINE, None, "deepspeed: shard optimizer state (1), and gradients (2, "
                                                       "default), and parameters (3)")
    deepspeed_config: str | None = flag(ENGINE, None, "deepspeed: a JSON file of further settings, merged under the "
                                                      "flags; a value that contradicts a flag is an error",
                                        metavar="FILE")
    sharding: Literal["full", "grad-op"] | None = flag(
        ENGINE, None, "fsdp: full frees gathered parameters after each forward (least memory, default); grad-op "
                      "keeps them for the backward (less communication)")
    offload: Literal["none", "optimizer", "params", "both"] | None = flag(
        ENGINE, None, "what lives on the CPU: deepspeed the optimizer state and step, the parameters (--zero 3) or "
                      "both; fsdp both (parameters, gradients, optimizer step); default none")

    precision: Literal["fp32", "bf16", "fp16"] = flag(TRAINING, "fp32", "default: fp32")
    grad_accum: int = flag(TRAINING, 1, "split each optimizer step into K micro-steps (the global batch stays the "
                                        "same); default 1", metavar="K", low=1)
    clip_grad: float = flag(TRAINING, 0.0, "clip the total gradient norm to NORM; 0 = off (the norm is logged either "
                                           "way)", metavar="NORM", low=0)
    compile: bool = flag(TRAINING, False, "torch.compile the model (DDP and one process): a slower start for faster "
                                          "steps")
    find_unused_parameters: bool = flag(
        TRAINING, False, "DDP: let parameters go without a gradient in some steps (each step then searches the graph "
                         "for them); the recipe can say so too: find_unused_parameters = True")
    seed: int = flag(TRAINING, 0, "default: 0", low=0)
    max_steps: int | None = flag(TRAINING, None, "stop after N optimizer steps; the LR schedule spans these N steps",
                                 metavar="N", low=1)
    eval_every: int = flag(TRAINING, 0, "evaluate on the validation split every N optimizer steps (default 0: at "
                                        "epoch ends)", metavar="N", low=0)
    eval_epochs: int = flag(TRAINING, 1, "evaluate at the end of every E-th epoch; 0 = not at epoch ends (default 1)",
                            metavar="E", low=0)
    early_stop: int = flag(TRAINING, 0, "stop when the recipe's best metric has not improved for PATIENCE "
                                        "evaluations; 0 = never", metavar="PATIENCE", low=0)
    test_weights: Literal["best", "last"] = flag(
        TRAINING, "best", "the weights the test split is evaluated with at the end: the best checkpoint's (the "
                          "recipe's best metric on the validation split; without one, the last) or the last step's")
    check: bool = flag(TRAINING, False, "run only the pre-flight checks (inputs, labels, splits, model, initial loss) "
                                        "in this process and exit: 0 when nothing looks wrong, 1 otherwise; nothing "
                                        "is written")
    health: bool = flag(TRAINING, True, "the pre-flight checks before training and the sampled checks during it "
                                        "(default; a few forward passes and a hash of every split on rank zero, then "
                                        "one step in 25)")
    overfit_batches: int = flag(
        TRAINING, 0, "train on N fixed batches without augmentation, weight decay, dropout or label smoothing until "
                     f"the loss is below a tenth of its start (at most {OVERFIT_STEPS}·N steps, or --max-steps), else "
                     "fail", metavar="N", low=0)
    find_lr: bool = flag(TRAINING, False, "a learning-rate range test instead of training: --max-steps (default 100) "
                                          "steps from 1e-7 to 10, stopped at divergence; suggests a rate and draws "
                                          "RUN_DIR/lr_find.png")
    skip_nonfinite: bool = flag(TRAINING, False, "skip optimizer steps whose gradient is not finite, and count them, "
                                                 "instead of stopping")

    save_every: int = flag(FAULTS, 0, "save a checkpoint every N optimizer steps (default 0: at the end, on "
                                      "SIGTERM/SIGINT, and the best evaluation only)", metavar="N", low=0)
    keep: int = flag(FAULTS, 3, "step checkpoints to keep; 0 = all (default 3)", metavar="K", low=0)
    async_save: bool = flag(FAULTS, True, "write checkpoints in the background while training goes on (DDP and "
                                          "FSDP; default): a checkpoint counts once it is complete, and the run "
                                          "waits for it before the next, at a stop and at the end; --no-async-save "
                                          "waits for each")
    resume: str | None = flag(FAULTS, None, "auto: continue from the run directory's newest complete checkpoint, or "
                                            "start fresh if it has none; PATH: a checkpoint directory, or a run "
                                            "directory to take the newest one from", metavar="auto|PATH")
    max_restarts: int = flag(FAULTS, 0, "after a worker crash, restart every process from the newest checkpoint, up "
                                        "to N times", metavar="N", low=0, high=100,
                             why="a job that crashed 100 times will not heal")
    timeout: float = flag(FAULTS, 600.0, "how long a collective waits for a silent rank before the job fails "
                                         "(default 600)", metavar="SECONDS", low=10,
                          why="a collective timeout under 10 s would fail healthy runs")
    step_timeout: float | None = flag(FAULTS, None, "the same after the first step, so that a hang is found sooner "
                                                    "(the first has --timeout: compiling, loading, first "
                                                    "allocations); default 300 on GPUs, --timeout on the CPU",
                                      metavar="SECONDS", low=10,
                                      why="a collective timeout under 10 s would fail healthy runs")

    slurm: bool = flag(SLURM, False, "render slurm/launch.sbatch into the run directory and sbatch it")
    dry_run: bool = flag(SLURM, False, "with --slurm or --kubernetes: print the batch script or the TrainJob as it "
                                       "would be, with the run directory it would use (named by the time unless "
                                       "--run-dir or --name), and write and submit nothing")
    partition: str | None = flag(SLURM, None, "sbatch --partition", metavar="P")
    time: str | None = flag(SLURM, None, "sbatch --time", metavar="T")
    account: str | None = flag(SLURM, None, "sbatch --account", metavar="A")
    qos: str | None = flag(SLURM, None, "sbatch --qos", metavar="Q")
    constraint: str | None = flag(SLURM, None, "sbatch --constraint", metavar="C")
    mem: str | None = flag(SLURM, None, "sbatch --mem", metavar="M")
    cpus_per_task: int | None = flag(SLURM, None, "sbatch --cpus-per-task (default with --cpu: --procs)",
                                     metavar="C", low=1)
    job_name: str | None = flag(SLURM, None, "sbatch --job-name (default: the run name)", metavar="J")
    slurm_template: str | None = flag(SLURM, None, "your site's copy of slurm/launch.sbatch (modules, containers): "
                                                   "see slurm/README.md", metavar="FILE")
    slurm_signal: str = flag(SLURM, "USR2@120", "the signal Slurm sends before the time limit, to checkpoint and "
                                                "requeue (default USR2@120)", metavar="SIG@SECONDS")
    max_requeues: int = flag(SLURM, 20, "requeue after a time limit at most N times (default 20); a start that saves "
                                        "no new checkpoint is never requeued", metavar="N", low=0)
    script_signal: str = flag(SLURM, "TERM", "a training script's: the signal its processes get at the time-limit "
                                             "warning, to save and stop (default TERM; USR1 for a script that saves "
                                             "on it)", metavar="SIG")

    kubernetes: bool = flag(KUBERNETES, False, "write a Kubeflow Trainer v2 TrainJob into the run directory and "
                                               "kubectl apply it (needs --image)")
    image: str | None = flag(KUBERNETES, None, "the container image every pod runs: the launcher with the recipe at "
                                               "the path given here (docker/Dockerfile)", metavar="IMAGE")
    namespace: str | None = flag(KUBERNETES, None, "the TrainJob's namespace (default: kubectl's)", metavar="NS")
    runtime: str = flag(KUBERNETES, "torch-distributed", "the ClusterTrainingRuntime it runs on (default "
                                                         "torch-distributed)", metavar="NAME")
    secret: str = flag(KUBERNETES, "launcher", "the Secret the pods read W&B's key from (wandb-api-key, optional) and "
                                               "each secret hyperparameter (by its flag's name) (default launcher)",
                       metavar="NAME")

    run_dir: str | None = flag(LOGGING, None, "where config.json, metrics.jsonl, checkpoints, logs and W&B files go "
                                              "(default: runs/NAME)", metavar="DIR")
    name: str | None = flag(LOGGING, None, "run name (default: RECIPE-DATE-TIME)")
    log_every: int = flag(LOGGING, 10, "record metrics every N optimizer steps (default 10)", metavar="N", low=1)
    wandb: Literal["online", "offline", "disabled"] | None = flag(
        LOGGING, None, "default: $WANDB_MODE, else online when an API key is configured, else offline (disabled with "
                       "--debug)")
    wandb_project: str | None = flag(LOGGING, None, "default: the recipe's name", metavar="P")
    wandb_entity: str | None = flag(LOGGING, None, metavar="E")
    wandb_group: str | None = flag(LOGGING, None, "W&B group of the run, to see related runs together (a sweep "
                                                  "names its trials' group after itself)", metavar="G")
    tensorboard: bool = flag(LOGGING, False, "also write TensorBoard event files to RUN_DIR/tensorboard, to look at "
                                             "with `tensorboard --logdir RUN_DIR` and no account (pip install "
                                             "tensorboard==2.21.0)")
    pictures: bool = flag(LOGGING, True, "draw the run's pictures into RUN_DIR/pictures at its end: loss curves, "
                                         "metrics, a classifier's confusion matrix (default)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None or isinstance(value, bool):
                continue
            name, why = option(f.name), f": {meta['why']}" if meta.get("why") else ""
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"{name} must be a finite number, not {value}")
            if meta.get("low") is not None and value < meta["low"]:
                raise UsageError(f"{name} must be at least {meta['low']}, not {value}{why}")
            if meta.get("high") is not None and value > meta["high"]:
                raise UsageError(f"{name} must be at most {meta['high']}, not {value}{why}")

    @property
    def submits(self) -> bool:
        """Whether this launcher hands the run to a scheduler (Slurm, Kubernetes) instead of running it here."""
        return self.slurm or self.kubernetes


FIELDS = {f.name: f for f in dataclasses.fields(Flags)}
TYPES = typing.get_type_hints(Flags)


def option(name: str) -> str:
    """clip_grad → --clip-grad"""
    return "--" + name.replace("_", "-")


def kind(name: str) -> tuple[type, tuple | None]:
    """(value type, choices or None) of a flag, from its annotation: int | None → int; Literal[1, 2] → int, (1, 2)."""
    typ = TYPES[name]
    if type(None) in typing.get_args(typ):
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    if typing.get_origin(typ) is Literal:
        choices = typing.get_args(typ)
        return type(choices[0]), choices
    return typ, None


def takes_value(name: str) -> bool:
    return kind(name)[0] is not bool


def secret_variable(option: str) -> str:
    """The environment variable a submitted job reads a secret option's value from: LAUNCH_SECRET_HUB_TOKEN."""
    return "LAUNCH_SECRET_" + option[2:].upper().replace("-", "_")


def mask(argv: list[str], options: set[str], placeholder) -> tuple[list[str], dict[str, str]]:
    """argv with the value of each of these options (`--hub-token X`, `--hub-token=X`) replaced by
    placeholder(option), and the values it held, by option. The flags have been parsed: each has its value."""
    masked, values = [], {}
    tokens = iter(argv)
    for token in tokens:
        flag, eq, value = token.partition("=")
        if flag not in options:
            masked.append(token)
            continue
        values[flag] = value if eq else next(tokens)
        masked += [flag, placeholder(flag)]
    return masked, values


def without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """argv less these launcher options and their values (`--run-dir X` and `--run-dir=X` alike)."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        flag = token.split("=", 1)[0]
        if flag in options:
            skip = "=" not in token and takes_value(flag[2:].replace("-", "_"))
            continue
        kept.append(token)
    return kept


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def version() -> str:
    try:
        return importlib.metadata.version("launcher")
    except importlib.metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "(not installed)"


def parser(add_help: bool) -> Parser:
    """argparse's parser of every flag, in GROUPS' sections of --help."""
    p = Parser(prog="launch", usage=f"{USAGE}\n       launch [launcher flags] SCRIPT [its arguments]",
               add_help=add_help, allow_abbrev=False, epilog=COMMANDS,
               description="Run a training recipe in one process or many, on Accelerate; or a training script "
                           "(torchrun's or Accelerate's) as it is, everything after SCRIPT its own.",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", metavar="RECIPE", help=FIELDS["recipe"].metadata["help"])
    p.add_argument("--version", action="version", version=f"launch {version()}")
    groups = {title: p.add_argument_group(title, description) for title, description in GROUPS.items()}
    for name, f in FIELDS.items():
        if name == "recipe":
            continue
        typ, choices = kind(name)
        options = {"default": f.default, "help": f.metadata["help"]}
        if typ is bool:  # a switch; one that is on by default can be turned off: --no-health
            options["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        else:
            options.update(type=typ, choices=choices, metavar=f.metadata["metavar"])
        groups[f.metadata["group"]].add_argument(option(name), **options)
    return p


def accepts(name: str, value) -> bool:
    """Whether flag `name` takes this value as its default (a recipe's `defaults` gives it)."""
    typ, choices = kind(name)
    if choices is not None:
        return value in choices
    if isinstance(value, bool):
        return typ is bool
    return isinstance(value, typ) or (typ is float and isinstance(value, int))
