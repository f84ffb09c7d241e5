"""argv → plan: the flags (declared in launcher/flags.py) and the recipe's hyperparameters parsed, and every check that
reads several of them, before any process starts: bad input is one line and exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import importlib.util
import json
import math
import netrc
import os
import secrets
import sys
import time
from pathlib import Path

from .. import flags
from ..engines import zero
from ..errors import RecipeError, UsageError
from ..flags import Flags
from ..plan import Plan
from ..processes import cluster, kubernetes, slurm, spawn
from ..processes.collector import settle
from ..processes.leave import leave
from ..recipe import contract as recipes
from ..runs import checkpoint, record, universal
from ..runs import directory as rundir
from ..runs.files import keep_console, start_summary, update_summary, write_record
from ..text import count
from . import foreign

# the launcher flags a training script takes: where it runs, what Accelerate reads from the environment, restarts,
# Slurm and its run directory; the others are the launcher's training loop's, which a script does not run
SCRIPT_FLAGS = {"gpus", "cpu", "procs", "nodes", "node_rank", "master_addr", "master_port", "rendezvous_timeout",
                "precision", "grad_accum", "compile", "max_restarts", "timeout", "resume", "run_dir", "name",
                *(name for name, f in flags.FIELDS.items()
                  if f.metadata.get("group") in (flags.SLURM, flags.KUBERNETES))}


def parse(argv: list[str]) -> tuple[Plan, object, object, Flags]:
    """(plan, recipe module, Hparams, flags) from argv, or UsageError. A training script gives no module nor
    Hparams: `launch [launcher flags] SCRIPT [its arguments]`."""
    argv = foreign.translate(argv)
    at = script_at(argv)
    if at is not None:
        plan, given = parse_script(argv[:at], argv[at], argv[at + 1:])
        return plan, None, None, given
    known, _ = flags.parser(add_help=False).parse_known_args(argv)
    if known.recipe is None:
        if "-h" in argv or "--help" in argv:
            flags.parser(add_help=True).print_help()
            sys.exit(0)
        raise UsageError(f"missing RECIPE (usage: {flags.USAGE}; see launch --help)")
    parser, module = recipe_parser(known.recipe)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UsageError(unknown_flag(unknown, parser))
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(module.Hparams)}
    try:
        hp = recipes.hparams(module.Hparams, values)
    except RecipeError as e:
        raise UsageError(str(e)) from None
    if getattr(module, "find_unused_parameters", False):
        args.find_unused_parameters = True
    given = Flags(**{name: getattr(args, name) for name in flags.FIELDS})  # checks each flag's bounds
    return make_plan(given, hp, Path(known.recipe).resolve()), module, hp, given


def script_at(argv: list[str]) -> int | None:
    """Where a training script stands in argv, if the file there is one rather than a recipe: the first word that
    is neither a launcher flag nor a flag's value. Every word after it is the script's own."""
    value = False
    for at, token in enumerate(argv):
        if value:
            value = False
        elif token.startswith("-"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            value = token.startswith("--") and "=" not in token and name in flags.FIELDS and flags.takes_value(name)
        else:
            return at if token.endswith(".py") and Path(token).is_file() and not recipes.is_recipe(token) else None
    return None


def parse_script(given: list[str], script: str, script_args: list[str]) -> tuple[Plan, Flags]:
    """The plan of a training script's run: the launcher starts its processes, with torchrun's environment and
    Accelerate's, and the script does the rest."""
    parser = flags.parser(add_help=False)
    args, unknown = parser.parse_known_args(given)
    if unknown:
        raise UsageError(unknown_flag(unknown, parser))
    args.recipe = script
    for flag in flags.FIELDS:
        if flag in SCRIPT_FLAGS or flag == "recipe" or getattr(args, flag) == flags.FIELDS[flag].default:
            continue
        if flags.FIELDS[flag].metadata["group"] == flags.ENGINE:
            raise UsageError(f"{flags.option(flag)} {getattr(args, flag)} with a script: its engine is its own "
                             "(DDP, FSDP or DeepSpeed in its code, or Accelerate's config); the launcher starts its "
                             "processes")
        raise UsageError(f"{flags.option(flag)} is for a recipe, which the launcher trains; {Path(script).name} is a "
                         "script, which trains itself")
    if args.script_signal != flags.FIELDS["script_signal"].default and not args.slurm:
        raise UsageError("--script-signal goes with --slurm: it is what the script gets at Slurm's time-limit warning")
    if args.resume not in (None, "auto"):
        raise UsageError(f"--resume {args.resume}: a script resumes from its own checkpoints; --resume auto reuses "
                         "its run directory")
    given_flags = Flags(**{name: getattr(args, name) for name in flags.FIELDS})  # checks each flag's bounds
    place = _place(given_flags)
    _check_environment(given_flags)
    _check_slurm(given_flags, place)
    _check_kubernetes(given_flags)
    device, nproc = _where(given_flags)
    run_dir, name, _, _ = rundir.choose(given_flags, Path(script).stem)
    same = {flag: getattr(given_flags, flag) for flag in SCRIPT_FLAGS if flag in Plan.__dataclass_fields__}
    plan = Plan(**{**same, "recipe": str(Path(script).resolve()), "hparams": {}, "run_dir": str(run_dir),
                   "name": name, "device": device, "nproc": nproc, "nnodes": given_flags.nodes,
                   "master_addr": given_flags.master_addr or "127.0.0.1", "resume": None, "wandb": "disabled",
                   "master_port": given_flags.master_port or (cluster.DEFAULT_PORT if given_flags.nodes > 1 else 0),
                   "placed_by": _placed_by(place, given_flags), "script_args": list(script_args)})
    return plan, given_flags


def recipe_parser(recipe: str) -> tuple[flags.Parser, object]:
    """The parser of the launcher's flags and the recipe's hyperparameters, and the recipe's module."""
    try:
        module = recipes.load(recipe)
        parser = flags.parser(add_help=True)
        recipes.add_flags(parser, module.Hparams, Path(recipe))
        _recipe_defaults(parser, module, Path(recipe))
    except RecipeError as e:
        raise UsageError(str(e)) from None
    return parser, module


def _recipe_defaults(parser: argparse.ArgumentParser, module, path: Path) -> None:
    """A recipe's `defaults`: the launcher flags' defaults it wants (clip_grad=1.0), checked like the flags."""
    defaults = getattr(module, "defaults", {})
    for name, value in defaults.items():
        if name not in flags.FIELDS or name == "recipe":
            raise RecipeError(f"recipe {path}: defaults names {name!r}, which is no launcher flag (its flags by "
                              "their Python names, e.g. clip_grad for --clip-grad)")
        if not flags.accepts(name, value):
            raise RecipeError(f"recipe {path}: defaults gives {name} {value!r}, which {flags.option(name)} does not "
                              "take")
    parser.set_defaults(**defaults)


def unknown_flag(unknown: list[str], parser: argparse.ArgumentParser) -> str:
    flag = next((u for u in unknown if u.startswith("-")), None)
    if flag is None:
        return f"unexpected argument {unknown[0]!r} (usage: {flags.USAGE})"
    flag = flag.split("=", 1)[0]
    if foreign.instead(flag):
        return foreign.instead(flag)
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    close = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else " (see launch RECIPE --help)"
    return f"unknown flag {flag}{hint}"


def _check_environment(args: Flags) -> None:
    """What the flags ask of this machine."""
    peak = os.environ.get("LAUNCH_PEAK_TFLOPS")
    if peak is not None and not 0 < _float(peak) < math.inf:
        raise UsageError(f"LAUNCH_PEAK_TFLOPS={peak}: must be the device's peak TFLOP/s, a positive number")
    cores = len(os.sched_getaffinity(0))
    if args.procs and args.procs > cores and not args.submits:  # the job's nodes are another matter
        raise UsageError(f"--procs {args.procs}: this machine gives this command {count(cores, 'CPU core')}, and "
                         "each process needs one")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard==2.21.0 (in a clone "
                         "of the launcher: pip install -e '.[tensorboard]')")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _check_slurm(args: Flags, place: cluster.Place | None) -> None:
    if args.slurm:
        if args.debug or args.max_restarts:
            raise UsageError("--slurm runs a batch job: --debug runs in this process, and a job recovers by "
                             "requeueing instead of --max-restarts")
        _check_submitted(args, "--slurm", "the job")
        try:
            slurm.parse_signal(args.slurm_signal)
            slurm.parse_stop(args.script_signal)
            if args.time:
                slurm.check_time(args.time, args.slurm_signal)
        except slurm.SlurmError as e:
            raise UsageError(str(e)) from None
    elif args.dry_run and not args.kubernetes:
        raise UsageError("--dry-run goes with --slurm or --kubernetes")
    elif place is not None and place.source == cluster.SLURM:
        try:
            slurm.check_step(os.environ, place, args.nodes, args.node_rank)  # inside a Slurm job: what would hang
        except slurm.SlurmError as e:
            raise UsageError(str(e)) from None


def _check_kubernetes(args: Flags) -> None:
    if not args.kubernetes:
        for name, f in flags.FIELDS.items():
            if f.metadata.get("group") == flags.KUBERNETES and getattr(args, name) != f.default:
                raise UsageError(f"{flags.option(name)} goes with --kubernetes")
        return
    if args.slurm:
        raise UsageError("--kubernetes and --slurm are two ways to submit the run: choose one")
    if not args.image:
        raise UsageError("--kubernetes needs --image IMAGE: the container image each pod runs, with the launcher and "
                         "the recipe in it (docker/Dockerfile)")
    if args.debug:
        raise UsageError("--kubernetes writes a TrainJob: --debug runs in this process")
    _check_submitted(args, "--kubernetes", "the TrainJob")


def _check_submitted(args: Flags, option: str, setter: str) -> None:
    """A job this launcher submits: its scheduler places the nodes, and the flags say what each node runs."""
    for flag in ("node_rank", "master_addr", "master_port"):
        if getattr(args, flag) not in (None, 0):
            raise UsageError(f"{flags.option(flag)} is for jobs without a scheduler; with {option} {setter} sets it")
    if args.gpus is None and not args.cpu:
        raise UsageError(f"{option} needs what each node runs: --gpus N, or --cpu [--procs N]")


def _check_engine(args: Flags) -> dict | None:
    """The engine flags agree with each other; the --deepspeed-config file's contents."""
    engine, offload = args.engine, args.offload or "none"
    for flag, allowed in (("sharding", ("fsdp",)), ("zero", ("deepspeed",)), ("deepspeed_config", ("deepspeed",)),
                          ("offload", ("fsdp", "deepspeed"))):
        value = getattr(args, flag)
        if value not in (None, "none") and engine not in allowed:
            raise UsageError(f"{flags.option(flag)} {value} is for --engine {' or '.join(allowed)}, "
                             f"not {engine}")
    if engine == "fsdp" and offload in ("optimizer", "params"):
        raise UsageError(f"--offload {offload}: FSDP offloads parameters, gradients and the optimizer step together; "
                         "use --offload both")
    if engine == "deepspeed" and offload in ("params", "both") and (args.zero or 2) < 3:
        raise UsageError(f"--offload {offload} needs --zero 3: only stage 3 shards the parameters")
    if engine != "ddp" and args.compile:
        raise UsageError(f"--compile works with --engine ddp (and one process) for now, not {engine}")
    if engine == "deepspeed" and args.precision == "fp16" and (args.cpu or os.environ.get(zero.UNVERIFIED_FP16) != "1"):
        raise UsageError("--engine deepspeed with --precision fp16 is not supported: DeepSpeed's fp16 halves the "
                         "weights themselves and needs a GPU to verify (benchmarks/gpu.py); use bf16, or fp16 with "
                         "--engine fsdp or ddp")
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


def _check_modes(args: Flags) -> None:
    """The debugging modes go alone."""
    if args.find_lr and args.overfit_batches:
        raise UsageError("--find-lr and --overfit-batches are two separate debugging runs: choose one")
    if (args.find_lr or args.overfit_batches) and (args.resume or args.early_stop):
        flag = "--find-lr" if args.find_lr else "--overfit-batches"
        raise UsageError(f"{flag} is a fresh debugging run without evaluation: drop --resume and --early-stop")
    if args.find_lr and args.engine == "deepspeed":
        raise UsageError("--find-lr drives the optimizer's learning rate directly: use --engine ddp or fsdp for it")


def _where(args: Flags) -> tuple[str, int]:
    """(device, processes on this node)."""
    if args.cpu and args.gpus is not None:
        raise UsageError("--cpu and --gpus exclude each other (CPU processes: --cpu --procs N)")
    if args.procs is not None and not args.cpu:
        raise UsageError("--procs N needs --cpu (for GPU processes use --gpus N)")
    if args.debug and max(args.gpus or 1, args.procs or 1, args.nodes) > 1:
        raise UsageError("--debug runs one process; drop --gpus/--procs/--nodes or --debug")
    if args.node_rank >= args.nodes:
        raise UsageError(f"--node-rank {args.node_rank} must be below --nodes {args.nodes}")
    if args.nodes > 1 and not args.master_addr and not args.submits:
        raise UsageError(f"--nodes {args.nodes} needs --master-addr: node 0's address, which every node can reach")
    if args.nodes > 1 and args.max_restarts and not args.min_nodes:
        raise UsageError("--max-restarts works on one node, or with an elastic --nodes MIN:MAX; a multi-node job of "
                         "fixed size recovers with --resume auto (Slurm requeues do that)")

    import torch  # already imported by the recipe; needed here only to count GPUs

    if args.submits:  # the GPUs are the job's nodes', counted there
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


def _place(args: Flags) -> cluster.Place | None:
    """The node count, this node's rank, node 0's address and port, and the processes per node: the flags', and
    for what they leave out the environment's that started this process (processes/cluster.py: PET_*, a Slurm job
    step, SkyPilot), unless this launcher submits the job (--slurm, --kubernetes); what that environment said, if
    any."""
    place = None if args.submits else cluster.environment(os.environ)
    if place is not None:
        for name in ("nodes", "node_rank", "master_addr", "master_port"):
            if getattr(args, name) is None:
                setattr(args, name, getattr(place, name))
        if place.per_node and args.gpus is None and args.procs is None and not args.debug:
            import torch  # imported with the recipe already

            if isinstance(place.per_node, str):  # one per GPU, as torchrun counts them
                args.gpus = torch.cuda.device_count() if torch.cuda.is_available() and not args.cpu else None
            elif torch.cuda.is_available() and not args.cpu:
                args.gpus = place.per_node
            else:  # torchrun's N processes, on the CPU where there is no GPU
                args.cpu, args.procs = True, place.per_node
    args.nodes, args.node_rank = args.nodes or 1, args.node_rank or 0
    return place


def _check_elastic(args: Flags) -> None:
    """--nodes MIN:MAX. Its restarts happen inside the job, where nothing converts a DeepSpeed checkpoint to another
    world size and no scheduler is asked for nodes."""
    if args.min_nodes is not None and args.min_nodes > args.nodes:
        raise UsageError(f"--min-nodes {args.min_nodes} must be at most --nodes {args.nodes} (--nodes MIN:MAX)")
    if args.min_nodes == args.nodes:
        args.min_nodes = None  # a fixed size
    if args.min_nodes is None:
        return
    if args.engine == "deepspeed":
        raise UsageError("--nodes MIN:MAX restarts on the nodes that are left, where a DeepSpeed checkpoint cannot be "
                         "loaded on another world size without a conversion before the start: use --engine fsdp or "
                         "ddp, or a fixed --nodes N")
    if args.submits:
        raise UsageError(f"--nodes {args.min_nodes}:{args.nodes} is for nodes you start yourself, launch on each; "
                         "--slurm and --kubernetes submit a fixed number of nodes: give --nodes N")


def _check_split(args: Flags, nproc: int, batch: int) -> None:
    """Every world an elastic job may train on takes the global batch in equal shares."""
    sizes = [n * nproc for n in range(args.min_nodes or args.nodes, args.nodes + 1)]
    odd = [world for world in sizes if batch % world]
    if odd:
        raise UsageError(f"--batch-size {batch} must split over every world --nodes {args.min_nodes}:{args.nodes} "
                         f"allows ({', '.join(map(str, sizes))} processes): {' and '.join(map(str, odd))} "
                         f"do{'es' if len(odd) == 1 else ''} not divide it")


def _placed_by(place: cluster.Place | None, args: Flags) -> str | None:
    return place.source if place is not None and args.nodes > 1 else None


def make_plan(args: Flags, hp, recipe_path: Path) -> Plan:
    if args.script_signal != flags.FIELDS["script_signal"].default:
        raise UsageError("--script-signal is for a training script; a recipe saves and stops on SIGTERM")
    place = _place(args)
    _check_elastic(args)
    _check_environment(args)
    _check_slurm(args, place)
    _check_kubernetes(args)
    deepspeed_config = _check_engine(args)
    _check_modes(args)
    device, nproc = _where(args)
    world, accum, batch = nproc * args.nodes, args.grad_accum, hp.batch_size
    if batch < 1 or batch % (world * accum):
        raise UsageError(f"--batch-size {batch} must be a positive multiple of {world} process(es) × {accum} "
                         f"accumulation step(s) = {world * accum}: it is the global batch of one optimizer step")
    _check_split(args, nproc, batch)
    if hp.epochs < 1 and args.max_steps is None:
        raise UsageError(f"--epochs must be at least 1, not {hp.epochs}")
    run_dir, name, resume, manifest = rundir.choose(args, recipe_path.stem)
    previous = run_dir / "config.json"
    try:
        wandb_id = json.loads(previous.read_text())["plan"].get("wandb_id") if previous.exists() else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"{previous} is not a run record the launcher can read ({type(e).__name__}: {e}); choose "
                         "another --run-dir") from None
    resolved = dict(  # the fields whose value is not simply the flag's of the same name
        recipe=str(recipe_path), hparams=dataclasses.asdict(hp), run_dir=str(run_dir), name=name,
        device=device, nproc=nproc, nnodes=args.nodes, master_addr=args.master_addr or "127.0.0.1",
        master_port=args.master_port or (cluster.DEFAULT_PORT if args.nodes > 1 else 0),
        placed_by=_placed_by(place, args), sharding=args.sharding or "full",
        zero=(args.zero or 2) if args.engine == "deepspeed" else 0, offload=args.offload or "none",
        deepspeed_config=None, max_steps=args.max_steps or (flags.DEBUG_STEPS if args.debug else None),
        eval_every=0 if args.debug else args.eval_every, eval_epochs=0 if args.debug else args.eval_epochs,
        eval_limit=10 if args.debug else None,
        log_every=1 if args.debug or args.find_lr or args.overfit_batches else args.log_every,
        workers=args.workers if args.workers is not None else (4 if device == "cuda" and not args.debug else 0),
        resume=str(resume) if resume else None, skip_nonfinite=args.skip_nonfinite or args.find_lr,
        wandb=args.wandb or ("disabled" if args.debug else default_wandb_mode()),
        wandb_project=args.wandb_project or recipe_path.stem, wandb_id=wandb_id or secrets.token_hex(4),
        step_timeout=args.step_timeout or (flags.STEP_TIMEOUT if device == "cuda" else args.timeout),
    )
    same = {f.name: getattr(args, f.name) for f in dataclasses.fields(Plan) if f.name in flags.FIELDS}
    plan = Plan(**{**same, **resolved})
    if plan.engine == "deepspeed":
        try:
            plan = dataclasses.replace(plan, deepspeed_config=zero.config(plan, deepspeed_config or {}))
        except zero.ConfigError as e:
            raise UsageError(str(e)) from None
    if manifest:
        rundir.compare(plan, manifest)
        if universal.needed(manifest, plan.engine, plan.world_size):  # node 0 converts it before spawning
            plan = dataclasses.replace(plan, convert_from=plan.resume,
                                       resume=str(universal.target(plan.run_dir, Path(plan.resume))))
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
    command = argv is None  # the `launch` command itself, rather than a caller in Python
    argv = with_files(sys.argv[1:] if command else argv)
    try:
        if argv[:1] == ["resume"] or _resumes_by_directory(argv):
            from . import jobs

            argv = jobs.resume_command(argv[1:] if argv[0] == "resume" else _by_directory(argv))
            if argv is None:
                return
        plan, module, hp, args = parse(argv)
        if args.slurm:
            sys.exit(slurm.submit_run(plan, args, argv))
        if args.kubernetes:
            sys.exit(kubernetes.submit_run(plan, args, argv))
        if hasattr(module, "prepare"):
            began = time.perf_counter()
            try:
                module.prepare(hp)  # once per node, before any process starts: downloads, caches
            except Exception as e:
                raise UsageError(f"{Path(plan.recipe).name}: preparing the data failed: "
                                 f"{recipes.describe_error(e, Path(plan.recipe))}") from None
            took = time.perf_counter() - began
            if took >= 1:  # a first run's download or decoding; a cached one says nothing
                print(f"launch: {Path(plan.recipe).name} prepared its data in {took:.1f} s", flush=True)
        if args.check:
            from ..health import preflight

            settle()
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
            universal.prepare(plan)
    except UsageError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        sys.exit(2)
    Path(plan.run_dir).mkdir(parents=True, exist_ok=True)
    if plan.node_rank == 0:  # and its record, its summary and its console's log
        write_record(plan.run_dir, record.record(plan, argv))
        start_summary(plan)
        keep_console(plan.run_dir)
    try:
        code = spawn.launch(plan, sock, record.banner(plan))
    except KeyboardInterrupt:  # a second Ctrl-C while the first one's stop was handled
        print("launch: interrupted", file=sys.stderr)
        if plan.node_rank == 0:
            update_summary(plan.run_dir, state="stopped", reason="interrupted")
        code = 130
    finally:
        rundir.release()
    if command and plan.nnodes == 1:  # node 0 of several hosts the store the other nodes' agents still close on
        leave(code)
    sys.exit(code)


def with_files(argv: list[str]) -> list[str]:
    """argv with each `@FILE` replaced by the arguments FILE holds, one per line (a sweep's Slurm array task reads
    its trial's so); a token that names no file stays as it is."""
    expanded = []
    for token in argv:
        path = Path(token[1:]) if token.startswith("@") else None
        expanded += path.read_text().splitlines() if path and path.is_file() else [token]
    return expanded


def _resumes_by_directory(argv: list[str]) -> bool:
    """`launch --resume auto --run-dir RUN [flags]`, without a recipe: the same as `launch resume RUN [flags]`."""
    if any(a.endswith(".py") for a in argv):  # a recipe or a script, whose own arguments no parser here may read
        return False
    known, _ = flags.parser(add_help=False).parse_known_args(argv)
    return known.resume == "auto" and known.run_dir is not None


def _by_directory(argv: list[str]) -> list[str]:
    known, _ = flags.parser(add_help=False).parse_known_args(argv)
    return [known.run_dir, *flags.without(argv, ("--resume", "--run-dir"))]


def _port_advice(e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return "the port is in use (another job?); choose another --master-port"
    if e.errno == errno.EADDRNOTAVAIL:
        return "that is not an address of this machine; run node 0 on --master-addr"
    return "check --master-addr and --master-port"
