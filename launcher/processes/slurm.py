"""Slurm: render a batch script from slurm/launch.sbatch, submit it, and check a job step from inside.

Every value that reaches the script is quoted with shlex (sbatch reads #SBATCH lines with the same
rules), and none may hold a line break, which would end the comment an #SBATCH line is. The
environment is never written into the script: secrets stay in the environment sbatch passes on.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from .. import flags
from ..errors import UsageError
from ..flags import Flags
from ..plan import Plan
from ..runs import directory as rundir
from ..runs import record
from ..runs.files import update_summary, write_json
from ..text import count, first_line
from .cluster import Place

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "launch.sbatch"
# sbatch options: flag → #SBATCH option
OPTIONS = {"partition": "partition", "time": "time", "account": "account", "qos": "qos", "constraint": "constraint",
           "mem": "mem", "cpus_per_task": "cpus-per-task"}
# launcher flags the job sets itself, or that only the submission needs
SUBMISSION_ONLY = ("--slurm", "--dry-run", "--slurm-signal", "--slurm-template", "--max-requeues", "--script-signal",
                   "--job-name", "--nodes", "--node-rank", "--master-addr", "--master-port", "--run-dir", "--name",
                   "--resume", *(flags.option(o) for o in OPTIONS))


MIN_WORK = 300  # seconds of training a start must have before the time limit's warning signal
SBATCH_TIMEOUT = 60  # seconds sbatch may take to answer


class SlurmError(Exception):
    """Bad Slurm input or a refused submission: one line, exit 2."""


SIGNALS = {s.name[3:] for s in signal.Signals if s.name.startswith("SIG") and not s.name.startswith("SIG_")} - {
    "KILL", "STOP"}  # the signals a process can handle, by their names less SIG


def parse_signal(text: str) -> tuple[str, int]:
    """`USR2@120` → ("USR2", 120): the signal Slurm sends, and how many seconds before the time limit."""
    match = re.fullmatch(r"(?:SIG)?([A-Z0-9]+)@(\d+)", text.upper())
    if not match or match.group(1) not in SIGNALS:
        raise SlurmError(f"--slurm-signal {text}: expected SIGNAL@SECONDS, e.g. USR2@120")
    return match.group(1), int(match.group(2))


def parse_stop(text: str) -> str:
    """--script-signal `USR1` or `SIGUSR1` → "USR1"."""
    match = re.fullmatch(r"(?:SIG)?([A-Z0-9]+)", text.upper())
    if not match or match.group(1) not in SIGNALS:
        raise SlurmError(f"--script-signal {text}: expected a signal a script can handle, e.g. TERM or USR1")
    return match.group(1)


def parse_time(text: str) -> int | None:
    """sbatch --time in seconds (minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S), None when unlimited."""
    if text.strip().upper() in ("UNLIMITED", "INFINITE", "-1"):
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise SlurmError(f"--time {text}: expected minutes, M:S, H:M:S, D-H, D-H:M or D-H:M:S")
    days, *parts = match.groups()
    parts = [int(x) for x in parts if x is not None]
    if days is not None:  # D-H[:M[:S]]
        h, m, sec = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + sec
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def check_time(time_limit: str, signal_spec: str) -> None:
    """A time limit must leave each start minutes of training before Slurm's warning signal: else every start
    is stopped during start-up and requeued, forever."""
    seconds, (_, lead) = parse_time(time_limit), parse_signal(signal_spec)
    if seconds is not None and seconds < lead + MIN_WORK:
        raise SlurmError(f"--time {time_limit} leaves under {MIN_WORK // 60} minutes of training before Slurm's "
                         f"warning signal ({signal_spec}: {lead} s before the limit) stops and requeues the job: "
                         f"give a --time of at least {(lead + MIN_WORK + 59) // 60} minutes, or a shorter lead")


def node_command(argv: list[str], recipe: str, script_args: list[str] | None = None) -> list[str]:
    """The user's launch command as each node runs it: the recipe (or script) by its absolute path, without the
    flags that only the submission needs; a training script's own arguments as they are."""
    at = len(argv) - (len(script_args) + 1 if script_args is not None else 0)
    ours = [str(Path(token).resolve()) if token == recipe else token
            for token in flags.without(argv[:at], SUBMISSION_ONLY)]
    return ours + ([str(Path(recipe).resolve()), *script_args] if script_args is not None else [])


class FromEnv(str):
    """An argument the job reads from an environment variable of this name: a secret is never written into
    the script, and sbatch passes the variable on with the rest of the environment."""


def hide_secrets(command: list[str], secret_flags: set[str]) -> tuple[list[str], dict[str, str]]:
    """`command` with the value of every secret flag (`--hub-token X`, `--hub-token=X`) replaced by a
    reference to a variable, and those variables. The flags have been parsed: each has its value."""
    hidden, values = flags.mask(command, secret_flags, lambda flag: FromEnv(flags.secret_variable(flag)))
    return hidden, {flags.secret_variable(flag): value for flag, value in values.items()}


def _quote(value: object, what: str) -> str:
    if isinstance(value, FromEnv):
        return f'"${{{value}:?is not set: export it before sbatch, the job reads a secret from it}}"'
    text = str(value)
    if any(c in text for c in "\n\r\0"):
        raise SlurmError(f"{what} contains a line break, which cannot go into a batch script")
    return shlex.quote(text)


def render(plan: Plan, args: Flags, command: list[str], python: str, cwd: Path, array: str | None = None,
           task: dict | None = None) -> str:
    """The batch script: `args.slurm_template` (default slurm/launch.sbatch) with its {{placeholders}} filled. A
    job `array` (sbatch's --array) has `task` replace the values that each of its tasks works out for itself."""
    template = Path(args.slurm_template or TEMPLATE)
    try:
        text = template.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SlurmError(f"--slurm-template {template}: {getattr(e, 'strerror', None) or e}") from None
    signal_name, seconds = parse_signal(args.slurm_signal)
    run_dir = Path(plan.run_dir)
    at = len(command) - (len(plan.script_args) + 1 if plan.script_args is not None else 0)
    ours, script = command[:at], command[at:]  # a training script and its arguments go last, as they are
    lines = [f"#SBATCH --{option}={_quote(getattr(args, flag), '--' + option)}"
             for flag, option in OPTIONS.items() if getattr(args, flag) is not None]
    if array:
        lines.append(f"#SBATCH --array={array}")
    if plan.device == "cuda":
        lines.append(f"#SBATCH --gpus-per-node={plan.nproc}")
    if args.cpus_per_task is None:  # a core for each process, and one for each of its DataLoader workers
        lines.append(f"#SBATCH --cpus-per-task={plan.nproc * (1 + plan.workers)}")
    values = {
        "script": _quote(run_dir / "slurm.sbatch", "--run-dir"),
        "job_name": _quote(args.job_name or plan.name, "--job-name"),
        "nodes": str(plan.nnodes),
        "chdir": _quote(cwd, "the working directory"),
        "log": _quote(run_dir / "slurm-%j.out", "--run-dir"),
        "signal": signal_name,
        "signal_seconds": str(seconds),
        "options": "\n".join(lines),
        # auto unless a checkpoint was named: the job finds the newest one when it starts, not now
        "resume": _quote(plan.resume if args.resume not in (None, "auto") else "auto", "--resume"),
        "python": _quote(python, "the Python path"),
        "run_dir": _quote(run_dir, "--run-dir"),
        "checkpoints": _quote(run_dir / "checkpoints", "--run-dir"),
        "exit_codes": _quote(run_dir / "logs" / "exit-codes", "--run-dir"),
        "max_requeues": str(args.max_requeues),
        # a training script's: the signal it stops on, and no checkpoints of the launcher's to judge progress by
        "stop_signal": parse_stop(args.script_signal),
        "script_run": "1" if plan.script_args is not None else "0",
        "args": " ".join(_quote(part, "an argument") for part in [*ours, "--run-dir", run_dir, "--name", plan.name,
                                                                     *script]),
        **(task or {}),
    }
    unknown = sorted(set(re.findall(r"\{\{(\w+)\}\}", text)) - set(values))
    if unknown:
        raise SlurmError(f"--slurm-template {template}: unknown placeholder {{{{{unknown[0]}}}}} (known: "
                         f"{', '.join(values)})")
    for number, line in enumerate(text.splitlines(), 1):
        quoted = re.search(r'"[^"]*\{\{(\w+)\}\}[^"]*"', line)
        if quoted and not line.lstrip().startswith("#"):  # in "...", a value's $( ) would run
            raise SlurmError(f"--slurm-template {template} line {number}: {{{{{quoted.group(1)}}}}} inside double "
                             "quotes; the launcher quotes every value for the shell itself: remove the quotes")
    script = re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], text)
    checked = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    if checked.returncode:
        raise SlurmError(f"--slurm-template {template}: the script it gives is not valid bash: "
                         f"{first_line(checked.stderr)}")
    return script


def submit(script: str, secrets: dict[str, str]) -> str:
    """The job id sbatch gives the script (read from stdin: Slurm keeps its own copy), submitted with
    `secrets` added to the environment it passes on."""
    if not shutil.which("sbatch"):
        raise SlurmError("sbatch is not on PATH: submit from a Slurm login node, or use --dry-run for the script")
    # --test-only first: a request no node can satisfy (more nodes or CPUs than the partition has) would pend
    # forever; Slurm says so now instead
    for options in (["--test-only"], ["--parsable"]):
        try:
            result = subprocess.run(["sbatch", *options], input=script, capture_output=True, text=True,
                                    timeout=SBATCH_TIMEOUT, env={**os.environ, **secrets})
        except subprocess.TimeoutExpired:
            raise SlurmError(f"sbatch did not answer within {SBATCH_TIMEOUT} s (is slurmctld reachable? `sinfo` "
                             "tells); nothing was submitted") from None
        if result.returncode != 0:
            reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
            raise SlurmError(f"sbatch refused the job: {reason.removeprefix('sbatch: error: ')}")
    return result.stdout.strip().split(";")[0]


def check_step(env: dict, place: Place, nodes: int, node_rank: int) -> None:
    """Inside a Slurm job step (`place`, read by processes/cluster.py): what would hang is an error instead. One
    launcher per node starts that node's processes; several per node would each start a full set. Flags given
    against the step's own numbers are refused."""
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE", "1")
    first = int(re.match(r"\d+", per_node).group())
    if first != 1:
        raise SlurmError(f"this Slurm step runs {first} tasks per node ({per_node}); run one launcher per node "
                         "(srun --ntasks-per-node=1): it starts the node's processes itself")
    if place.nodes != nodes:
        raise SlurmError(f"--nodes {nodes}, but this Slurm step spans {place.nodes} node(s)")
    if place.node_rank != node_rank:
        raise SlurmError(f"--node-rank {node_rank}, but Slurm runs this task on node {place.node_rank}")


def submit_run(plan: Plan, args: Flags, argv: list[str]) -> int:
    """--slurm: the batch script for this run; printed with --dry-run, else written and submitted."""
    try:
        secret = plan.secret_options()
        command, secrets = hide_secrets(node_command(argv, args.recipe, plan.script_args), secret)
        script = render(plan, args, command, sys.executable, Path.cwd())
        if args.dry_run:
            print(script, end="")
            return 0
        run_dir = Path(plan.run_dir)
        created = [p for p in (*reversed(run_dir.parents), run_dir) if not p.exists()]
        rundir.make(run_dir)
        if not (run_dir / "config.json").exists():  # marks the directory taken until the job writes its own
            created.append(run_dir / "config.json")
            write_json(run_dir / "config.json", record.record(plan))
        try:
            job = submit(script, secrets)
        except SlurmError:
            for path in reversed(created):  # a refused job leaves nothing that would block the next try
                path.rmdir() if path.is_dir() else path.unlink()
            raise
        (run_dir / "slurm.sbatch").write_text(script)  # what was submitted, to submit again by hand
        update_summary(str(run_dir), state="queued", reason=None, slurm_job=job)  # until the job's launcher starts
    except SlurmError as e:
        raise UsageError(str(e)) from None
    where = count(plan.nproc, "GPU" if plan.device == "cuda" else "CPU process")
    print(f"launch: submitted job {job}: {count(plan.nnodes, 'node')} × {where}, "
          f"run dir {run_dir}\n"
          f"  script:  {shlex.quote(str(run_dir / 'slurm.sbatch'))}\n"
          f"  follow:  tail -f {shlex.quote(str(run_dir / f'slurm-{job}.out'))}\n"
          f"  status:  squeue -j {job}\n"
          f"  cancel:  scancel {job}", flush=True)
    return 0
