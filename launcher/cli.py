"""argv → plan. Everything is validated here, before any process starts: bad input is one line and exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import json
import math
import netrc
import os
import secrets
import sys
from pathlib import Path

from . import checkpoint, debugging, record, rundir, slurm, spawn, zero
from . import recipe as recipes
from .errors import RecipeError, UsageError
from .plan import Plan
from .sinks import write_json
from .text import count

USAGE = "launch RECIPE [launcher flags] [recipe hyperparameter flags]"
DEBUG_STEPS = 30


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def base_parser(add_help: bool) -> Parser:
    p = Parser(prog="launch", usage=USAGE, add_help=add_help, allow_abbrev=False,
               description="Run a training recipe in one process or many, on Accelerate.")
    p.add_argument("recipe", nargs="?", metavar="RECIPE", help="path of the recipe file, e.g. recipes/cifar.py")
    g = p.add_argument_group("where it runs")
    g.add_argument("--debug", action="store_true",
                   help=f"one process in this process (a debugger works), first GPU or the CPU, {DEBUG_STEPS} steps, "
                        "one evaluation, anomaly detection on")
    g.add_argument("--gpus", type=int, metavar="N", help="N processes on this node, one GPU each")
    g.add_argument("--cpu", action="store_true", help="run on the CPU (gloo); with --procs N, N processes")
    g.add_argument("--procs", type=int, metavar="N", help="with --cpu: number of processes")
    g.add_argument("--nodes", type=int, default=1, metavar="N",
                   help="machines in the job; run launch on each with its --node-rank (default 1)")
    g.add_argument("--node-rank", type=int, default=0, metavar="I", help="this machine's place, 0 … N-1")
    g.add_argument("--master-addr", metavar="HOST", help="with --nodes: node 0's address, reachable from every node")
    g.add_argument("--master-port", type=int, metavar="PORT",
                   help="the rendezvous port on node 0 (default: 29500 with --nodes, else any free port)")
    g.add_argument("--rendezvous-timeout", type=int, default=60, metavar="SECONDS",
                   help="with --nodes: how long node 0 waits for every node to join (default 60); the others try to "
                        "reach it for half as long, once or twice")
    g.add_argument("--workers", type=int, metavar="N",
                   help="DataLoader workers per process for per-sample datasets (default: 0 on CPU, 4 on GPU)")
    g.add_argument("--device-data", action=argparse.BooleanOptionalAction, default=True,
                   help="keep a recipe's tensor data set whole on the device when it fits in a quarter of the free "
                        "memory and cut batches there by index, without a DataLoader (default); --no-device-data "
                        "sends every batch through a DataLoader instead")
    g = p.add_argument_group("engine", "how the model is distributed; the same recipe and result under each")
    g.add_argument("--engine", choices=["ddp", "fsdp", "deepspeed"], default="ddp",
                   help="ddp: a whole copy per process (default); fsdp: parameters, gradients and optimizer state "
                        "sharded over the processes (torch FSDP2); deepspeed: ZeRO")
    g.add_argument("--zero", type=int, choices=[1, 2, 3],
                   help="deepspeed: shard optimizer state (1), and gradients (2, default), and parameters (3)")
    g.add_argument("--deepspeed-config", metavar="FILE",
                   help="deepspeed: a JSON file of further settings, merged under the flags; a value that "
                        "contradicts a flag is an error")
    g.add_argument("--sharding", choices=["full", "grad-op"],
                   help="fsdp: full frees gathered parameters after each forward (least memory, default); grad-op "
                        "keeps them for the backward (less communication)")
    g.add_argument("--offload", choices=["none", "optimizer", "params", "both"],
                   help="what lives on the CPU: deepspeed the optimizer state and step, the parameters (--zero 3) or "
                        "both; fsdp both (parameters, gradients, optimizer step); default none")
    g = p.add_argument_group("training")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="default: fp32")
    g.add_argument("--grad-accum", type=int, default=1, metavar="K",
                   help="split each optimizer step into K micro-steps (the global batch stays the same); default 1")
    g.add_argument("--clip-grad", type=float, default=0.0, metavar="NORM",
                   help="clip the total gradient norm to NORM; 0 = off (the norm is logged either way)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (DDP and one process): a slower start for faster steps")
    g.add_argument("--find-unused-parameters", action="store_true",
                   help="DDP: let parameters go without a gradient in some steps (each step then searches the "
                        "graph for them); the recipe can say so too: find_unused_parameters = True")
    g.add_argument("--seed", type=int, default=0, help="default: 0")
    g.add_argument("--max-steps", type=int, metavar="N",
                   help="stop after N optimizer steps; the LR schedule spans these N steps")
    g.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="evaluate on the validation split every N optimizer steps (default 0: at epoch ends)")
    g.add_argument("--eval-epochs", type=int, default=1, metavar="E",
                   help="evaluate at the end of every E-th epoch; 0 = not at epoch ends (default 1)")
    g.add_argument("--early-stop", type=int, default=0, metavar="PATIENCE",
                   help="stop when the recipe's best metric has not improved for PATIENCE evaluations; 0 = never")
    g.add_argument("--check", action="store_true",
                   help="run only the pre-flight checks (inputs, labels, splits, model, initial loss) in this process "
                        "and exit: 0 when nothing looks wrong, 1 otherwise; nothing is written")
    g.add_argument("--health", action=argparse.BooleanOptionalAction, default=True,
                   help="the pre-flight checks before training and the sampled checks during it (default; a few "
                        "forward passes and a hash of every split on rank zero, then one step in 25)")
    g.add_argument("--overfit-batches", type=int, default=0, metavar="N",
                   help="train on N fixed batches without augmentation, weight decay, dropout or label smoothing "
                        f"until the loss is below a tenth of its start (at most {debugging.OVERFIT_STEPS}·N steps, or "
                        "--max-steps), else fail")
    g.add_argument("--find-lr", action="store_true",
                   help="a learning-rate range test instead of training: --max-steps (default 100) steps from 1e-7 "
                        "to 10, stopped at divergence; suggests a rate and draws RUN_DIR/lr_find.png")
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip optimizer steps whose gradient is not finite, and count them, instead of stopping")
    g = p.add_argument_group("checkpoints and faults")
    g.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="save a checkpoint every N optimizer steps (default 0: at the end, on SIGTERM/SIGINT, and "
                        "the best evaluation only)")
    g.add_argument("--keep", type=int, default=3, metavar="K", help="step checkpoints to keep; 0 = all (default 3)")
    g.add_argument("--resume", metavar="auto|PATH",
                   help="auto: continue from the run directory's newest complete checkpoint, or start fresh if it "
                        "has none; PATH: a checkpoint directory, or a run directory to take the newest one from")
    g.add_argument("--max-restarts", type=int, default=0, metavar="N",
                   help="after a worker crash, restart every process from the newest checkpoint, up to N times")
    g.add_argument("--timeout", type=float, default=600, metavar="SECONDS",
                   help="how long a collective waits for a silent rank before the job fails (default 600)")
    g = p.add_argument_group("Slurm", "submit the run as a batch job instead: one task per node runs launch")
    g.add_argument("--slurm", action="store_true",
                   help="render slurm/launch.sbatch into the run directory and sbatch it")
    g.add_argument("--dry-run", action="store_true", help="with --slurm: print the batch script, submit nothing")
    for flag, meta in (("--partition", "P"), ("--time", "T"), ("--account", "A"), ("--qos", "Q"),
                       ("--constraint", "C"), ("--mem", "M")):
        g.add_argument(flag, metavar=meta, help=f"sbatch {flag}")
    g.add_argument("--cpus-per-task", type=int, metavar="C",
                   help="sbatch --cpus-per-task (default with --cpu: --procs)")
    g.add_argument("--job-name", metavar="J", help="sbatch --job-name (default: the run name)")
    g.add_argument("--slurm-template", metavar="FILE",
                   help="your site's copy of slurm/launch.sbatch (modules, containers): see slurm/README.md")
    g.add_argument("--slurm-signal", default="USR2@120", metavar="SIG@SECONDS",
                   help="the signal Slurm sends before the time limit, to checkpoint and requeue (default USR2@120)")
    g.add_argument("--max-requeues", type=int, default=20, metavar="N",
                   help="requeue after a time limit at most N times (default 20); a start that saves no new "
                        "checkpoint is never requeued")
    g = p.add_argument_group("logging")
    g.add_argument("--run-dir", metavar="DIR", help="where config.json, metrics.jsonl, checkpoints, logs and W&B "
                                                    "files go (default: runs/NAME)")
    g.add_argument("--name", help="run name (default: RECIPE-DATE-TIME)")
    g.add_argument("--log-every", type=int, default=10, metavar="N",
                   help="record metrics every N optimizer steps (default 10)")
    g.add_argument("--wandb", choices=["online", "offline", "disabled"],
                   help="default: $WANDB_MODE, else online when an API key is configured, else offline "
                        "(disabled with --debug)")
    g.add_argument("--wandb-project", metavar="P", help="default: the recipe's name")
    g.add_argument("--wandb-entity", metavar="E")
    return p


def parse(argv: list[str]) -> tuple[Plan, object, object, argparse.Namespace]:
    """(plan, recipe module, Hparams, flags) from argv, or UsageError."""
    known, _ = base_parser(add_help=False).parse_known_args(argv)
    if known.recipe is None:
        if "-h" in argv or "--help" in argv:
            base_parser(add_help=True).print_help()
            sys.exit(0)
        raise UsageError(f"missing RECIPE (usage: {USAGE}; see launch --help)")
    try:
        module = recipes.load(known.recipe)
        parser = base_parser(add_help=True)
        recipes.add_flags(parser, module.Hparams, Path(known.recipe))
        _recipe_defaults(parser, module, Path(known.recipe))
    except RecipeError as e:
        raise UsageError(str(e)) from None
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UsageError(_unknown(unknown, parser))
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(module.Hparams)}
    try:
        hp = recipes.hparams(module.Hparams, values)
    except RecipeError as e:
        raise UsageError(str(e)) from None
    if getattr(module, "find_unused_parameters", False):
        args.find_unused_parameters = True
    return make_plan(args, hp, Path(known.recipe).resolve()), module, hp, args


def _recipe_defaults(parser: argparse.ArgumentParser, module, path: Path) -> None:
    """A recipe's `defaults`: the launcher flags' defaults it wants (clip_grad=1.0), checked like the flags."""
    defaults = getattr(module, "defaults", {})
    launcher = {a.dest: a for a in base_parser(add_help=False)._actions if a.option_strings}
    for name, value in defaults.items():
        action = launcher.get(name)
        if action is None:
            raise RecipeError(f"recipe {path}: defaults names {name!r}, which is no launcher flag (its "
                                      "flags by their argparse names, e.g. clip_grad for --clip-grad)")
        kind = action.type or (bool if action.nargs == 0 else str)
        fits = value in action.choices if action.choices is not None else \
            isinstance(value, kind) or (kind is float and isinstance(value, int))
        if not fits or isinstance(value, bool) and kind is not bool:
            raise RecipeError(f"recipe {path}: defaults gives {name} {value!r}, which "
                                      f"{action.option_strings[0]} does not take")
    parser.set_defaults(**defaults)


def _unknown(unknown: list[str], parser: argparse.ArgumentParser) -> str:
    flag = next((u for u in unknown if u.startswith("-")), None)
    if flag is None:
        return f"unexpected argument {unknown[0]!r} (usage: {USAGE})"
    flag = flag.split("=", 1)[0]
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    close = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else " (see launch RECIPE --help)"
    return f"unknown flag {flag}{hint}"


def _check_numbers(args: argparse.Namespace) -> None:
    bounds = ((args.gpus, 1, "--gpus"), (args.procs, 1, "--procs"), (args.grad_accum, 1, "--grad-accum"),
              (args.max_steps, 1, "--max-steps"), (args.log_every, 1, "--log-every"),
              (args.eval_every, 0, "--eval-every"), (args.eval_epochs, 0, "--eval-epochs"),
              (args.workers, 0, "--workers"), (args.seed, 0, "--seed"), (args.clip_grad, 0, "--clip-grad"),
              (args.save_every, 0, "--save-every"), (args.keep, 0, "--keep"), (args.early_stop, 0, "--early-stop"),
              (args.max_restarts, 0, "--max-restarts"), (args.nodes, 1, "--nodes"), (args.node_rank, 0, "--node-rank"),
              (args.master_port, 1, "--master-port"), (args.overfit_batches, 0, "--overfit-batches"),
              (args.rendezvous_timeout, 2, "--rendezvous-timeout"))
    for value, low, flag in bounds:
        if value is not None and not value >= low:
            raise UsageError(f"{flag} must be at least {low}, not {value}")
    for value, flag in ((args.clip_grad, "--clip-grad"), (args.timeout, "--timeout")):
        if not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, not {value}")
    peak = os.environ.get("LAUNCH_PEAK_TFLOPS")
    if peak is not None and not 0 < _float(peak) < math.inf:
        raise UsageError(f"LAUNCH_PEAK_TFLOPS={peak}: must be the device's peak TFLOP/s, a positive number")
    if args.timeout < 10:
        raise UsageError(f"--timeout {args.timeout:g}: a collective timeout under 10 s would fail healthy runs")
    if args.max_restarts > 100:
        raise UsageError(f"--max-restarts {args.max_restarts}: a job that crashed 100 times will not heal; at most 100")
    if args.master_port is not None and args.master_port > 65535:
        raise UsageError(f"--master-port {args.master_port} is not a port (1-65535)")
    cores = len(os.sched_getaffinity(0))
    if args.procs and args.procs > cores and not args.slurm:  # the job's nodes are another matter
        raise UsageError(f"--procs {args.procs}: this machine gives this command {count(cores, 'CPU core')}, and "
                         "each process needs one")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _check_slurm(args: argparse.Namespace) -> None:
    if args.slurm:
        for flag in ("node_rank", "master_addr", "master_port"):
            if getattr(args, flag) not in (None, 0):
                raise UsageError(f"--{flag.replace('_', '-')} is for jobs without a scheduler; with --slurm the job "
                                 "sets it")
        if args.debug or args.max_restarts:
            raise UsageError("--slurm runs a batch job: --debug runs in this process, and a job recovers by "
                             "requeueing instead of --max-restarts")
        if args.gpus is None and not args.cpu:
            raise UsageError("--slurm needs what each node runs: --gpus N, or --cpu [--procs N]")
        if args.cpus_per_task is not None and args.cpus_per_task < 1:
            raise UsageError(f"--cpus-per-task must be at least 1, not {args.cpus_per_task}")
        if args.max_requeues < 0:
            raise UsageError(f"--max-requeues must be at least 0, not {args.max_requeues}")
        try:
            slurm.parse_signal(args.slurm_signal)
            if args.time:
                slurm.check_time(args.time, args.slurm_signal)
        except slurm.SlurmError as e:
            raise UsageError(str(e)) from None
    elif args.dry_run:
        raise UsageError("--dry-run goes with --slurm")
    else:
        try:
            slurm.check_step(os.environ, args.nodes, args.node_rank)  # inside a Slurm job: what would hang
        except slurm.SlurmError as e:
            raise UsageError(str(e)) from None


def _check_engine(args: argparse.Namespace) -> dict | None:
    """The engine flags agree with each other; the --deepspeed-config file's contents."""
    engine, offload = args.engine, args.offload or "none"
    for flag, allowed in (("sharding", ("fsdp",)), ("zero", ("deepspeed",)), ("deepspeed_config", ("deepspeed",)),
                          ("offload", ("fsdp", "deepspeed"))):
        value = getattr(args, flag)
        if value not in (None, "none") and engine not in allowed:
            raise UsageError(f"--{flag.replace('_', '-')} {value} is for --engine {' or '.join(allowed)}, "
                             f"not {engine}")
    if engine == "fsdp" and offload in ("optimizer", "params"):
        raise UsageError(f"--offload {offload}: FSDP offloads parameters, gradients and the optimizer step together; "
                         "use --offload both")
    if engine == "deepspeed" and offload in ("params", "both") and (args.zero or 2) < 3:
        raise UsageError(f"--offload {offload} needs --zero 3: only stage 3 shards the parameters")
    if engine != "ddp" and args.compile:
        raise UsageError(f"--compile works with --engine ddp (and one process) for now, not {engine}")
    if engine == "deepspeed" and args.precision == "fp16":
        raise UsageError("--engine deepspeed with --precision fp16 is not supported: DeepSpeed's fp16 halves the "
                         "weights themselves and needs a GPU to verify; use bf16, or fp16 with --engine fsdp or ddp")
    if not args.deepspeed_config:
        return None
    try:
        user = json.loads(Path(args.deepspeed_config).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--deepspeed-config {args.deepspeed_config}: {getattr(e, 'strerror', None) or e}") from None
    except ValueError as e:
        raise UsageError(f"--deepspeed-config {args.deepspeed_config} is not JSON: {e}") from None
    if not isinstance(user, dict):
        raise UsageError(f"--deepspeed-config {args.deepspeed_config} must hold a JSON object")
    return user


def _check_modes(args: argparse.Namespace) -> None:
    """The debugging modes go alone."""
    if args.find_lr and args.overfit_batches:
        raise UsageError("--find-lr and --overfit-batches are two separate debugging runs: choose one")
    if (args.find_lr or args.overfit_batches) and (args.resume or args.early_stop):
        flag = "--find-lr" if args.find_lr else "--overfit-batches"
        raise UsageError(f"{flag} is a fresh debugging run without evaluation: drop --resume and --early-stop")
    if args.find_lr and args.engine == "deepspeed":
        raise UsageError("--find-lr drives the optimizer's learning rate directly: use --engine ddp or fsdp for it")


def _where(args: argparse.Namespace) -> tuple[str, int]:
    """(device, processes on this node)."""
    if args.cpu and args.gpus is not None:
        raise UsageError("--cpu and --gpus exclude each other (CPU processes: --cpu --procs N)")
    if args.procs is not None and not args.cpu:
        raise UsageError("--procs N needs --cpu (for GPU processes use --gpus N)")
    if args.debug and max(args.gpus or 1, args.procs or 1, args.nodes) > 1:
        raise UsageError("--debug runs one process; drop --gpus/--procs/--nodes or --debug")
    if args.node_rank >= args.nodes:
        raise UsageError(f"--node-rank {args.node_rank} must be below --nodes {args.nodes}")
    if args.nodes > 1 and not args.master_addr and not args.slurm:
        raise UsageError(f"--nodes {args.nodes} needs --master-addr: node 0's address, which every node can reach")
    if args.nodes > 1 and args.max_restarts:
        raise UsageError("--max-restarts works on one node; a multi-node job recovers with --resume auto "
                         "(Slurm requeues do that)")

    import torch  # already imported by the recipe; needed here only to count GPUs

    if args.slurm:  # the GPUs are the job's nodes', counted there
        device, nproc = ("cuda", args.gpus) if args.gpus is not None else ("cpu", args.procs or 1)
    elif args.gpus is not None:
        visible = torch.cuda.device_count()
        if args.gpus > visible:
            mask = os.environ.get("CUDA_VISIBLE_DEVICES")
            where = f" (CUDA_VISIBLE_DEVICES={mask})" if mask is not None else ""
            raise UsageError(f"--gpus {args.gpus}: {visible or 'no'} GPU{'s' if visible != 1 else ''} visible{where}; "
                             "use --cpu to run on the CPU")
        device, nproc = "cuda", args.gpus
    elif args.cpu:
        device, nproc = "cpu", args.procs or 1
    else:
        device, nproc = ("cuda" if torch.cuda.is_available() else "cpu"), 1
    if args.precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--precision bf16: {torch.cuda.get_device_name()} has no bf16; use fp16 or fp32")
    return device, nproc


def make_plan(args: argparse.Namespace, hp, recipe_path: Path) -> Plan:
    _check_numbers(args)
    _check_slurm(args)
    deepspeed_config = _check_engine(args)
    _check_modes(args)
    device, nproc = _where(args)
    world, accum, batch = nproc * args.nodes, args.grad_accum, hp.batch_size
    if batch < 1 or batch % (world * accum):
        raise UsageError(f"--batch-size {batch} must be a positive multiple of {world} process(es) × {accum} "
                         f"accumulation step(s) = {world * accum}: it is the global batch of one optimizer step")
    if hp.epochs < 1 and args.max_steps is None:
        raise UsageError(f"--epochs must be at least 1, not {hp.epochs}")
    run_dir, name, resume, manifest = rundir.choose(args, recipe_path.stem)
    previous = run_dir / "config.json"
    try:
        wandb_id = json.loads(previous.read_text())["plan"].get("wandb_id") if previous.exists() else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"{previous} is not a run record the launcher can read ({type(e).__name__}: {e}); choose "
                         "another --run-dir") from None
    plan = Plan(
        recipe=str(recipe_path), hparams=dataclasses.asdict(hp), run_dir=str(run_dir), name=name,
        device=device, nproc=nproc, nnodes=args.nodes, node_rank=args.node_rank,
        master_addr=args.master_addr or "127.0.0.1",
        master_port=args.master_port or (29500 if args.nodes > 1 else 0), engine=args.engine,
        sharding=args.sharding or "full", zero=(args.zero or 2) if args.engine == "deepspeed" else 0,
        offload=args.offload or "none", precision=args.precision,
        grad_accum=accum, clip_grad=args.clip_grad,
        seed=args.seed, max_steps=args.max_steps or (DEBUG_STEPS if args.debug else None),
        eval_every=0 if args.debug else args.eval_every, eval_epochs=0 if args.debug else args.eval_epochs,
        eval_limit=10 if args.debug else None,
        log_every=1 if args.debug or args.find_lr or args.overfit_batches else args.log_every,
        workers=args.workers if args.workers is not None else (4 if device == "cuda" and not args.debug else 0),
        device_data=args.device_data, compile=args.compile, find_unused_parameters=args.find_unused_parameters,
        health=args.health,
        save_every=args.save_every, keep=args.keep, resume=str(resume) if resume else None,
        max_restarts=args.max_restarts, skip_nonfinite=args.skip_nonfinite or args.find_lr,
        early_stop=args.early_stop, overfit_batches=args.overfit_batches, find_lr=args.find_lr,
        timeout=args.timeout, rendezvous_timeout=args.rendezvous_timeout, debug=args.debug,
        wandb=args.wandb or ("disabled" if args.debug else default_wandb_mode()),
        wandb_project=args.wandb_project or recipe_path.stem, wandb_entity=args.wandb_entity,
        wandb_id=wandb_id or secrets.token_hex(4),
    )
    if plan.engine == "deepspeed":
        try:
            plan = dataclasses.replace(plan, deepspeed_config=zero.config(plan, deepspeed_config or {}))
        except zero.ConfigError as e:
            raise UsageError(str(e)) from None
    if manifest:
        rundir.compare(plan, manifest)
    return plan


def default_wandb_mode() -> str:
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("online", "offline", "disabled"):
        return mode
    if mode == "dryrun":
        return "offline"
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or os.path.expanduser("~/.netrc"))
        return "online" if rc.authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        from . import export

        export.main(argv[1:])
        return
    try:
        plan, module, hp, args = parse(argv)
        if args.slurm:
            options = {o: a.nargs != 0 for a in base_parser(add_help=False)._actions for o in a.option_strings}
            sys.exit(slurm.submit_run(plan, args, argv, options))
        if hasattr(module, "prepare"):
            try:
                module.prepare(hp)  # once per node, before any process starts: downloads, caches
            except Exception as e:
                raise UsageError(f"{Path(plan.recipe).name}: preparing the data failed: "
                                 f"{recipes.describe_error(e, Path(plan.recipe))}") from None
        if args.check:
            from . import preflight

            try:
                sys.exit(preflight.check_only(plan, module, hp))
            except RecipeError as e:
                raise UsageError(str(e)) from None
        try:
            sock = spawn.rendezvous_socket(plan)
        except OSError as e:
            raise UsageError(f"cannot host the rendezvous on {plan.master_addr}:{plan.master_port} "
                             f"({e.strerror or e}): {_port_advice(e)}") from None
        if plan.node_rank == 0:  # node 0 owns the run directory: its lock, for as long as this process lives
            rundir.claim(Path(plan.run_dir))  # the last check: the directory is made only when all else holds
            checkpoint.clean(plan.run_dir)
    except UsageError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        sys.exit(2)
    Path(plan.run_dir).mkdir(parents=True, exist_ok=True)
    if plan.node_rank == 0:  # and its record
        write_json(Path(plan.run_dir) / "config.json", record.record(plan))
    try:
        code = spawn.launch(plan, sock, record.banner(plan))
    except KeyboardInterrupt:
        print("launch: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


def _port_advice(e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return "the port is in use (another job?); choose another --master-port"
    if e.errno == errno.EADDRNOTAVAIL:
        return "that is not an address of this machine; run node 0 on --master-addr"
    return "check --master-addr and --master-port"
