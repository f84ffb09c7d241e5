"""`launch sweep`: the trials of a search (search.py) run on this machine, several at once where it has room, or
submitted as one Slurm job array whose task I runs trial I; a rerun of the same command continues them."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..errors import UsageError
from ..processes.leave import die_with
from ..runs import directory as rundir
from ..runs.files import update_summary, write_json
from ..text import count, duration
from . import jobs, run
from .leaderboard import columns, status_text
from .search import Sweep, options, plan


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(options().format_help(), end="")
        return 0
    try:
        sweep, args = plan(argv)
        slots = None if "--slurm" in sweep.fixed else places(sweep, args.max_parallel)
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


def places(sweep: Sweep, parallel: int | None) -> list[dict]:
    """The environment of each trial that may run at once here: its own GPUs, or its own CPU cores."""
    plan0 = run.parse([*sweep.argv(0), "--resume", "auto"])[0]
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
    from ..processes import slurm
    from ..runs import record

    pending, completed = _pending(sweep)
    if not pending:
        print(f"launch: no trial of {sweep.folder} is left to submit ({completed} completed)")
        return 0
    (sweep.folder / "trials").mkdir(exist_ok=True)
    plans = {}
    for index in pending:
        argv = sweep.argv(index)
        plan, _, _, given = run.parse(argv)
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
