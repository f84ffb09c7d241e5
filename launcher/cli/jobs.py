"""launch status, logs and cancel: how runs stand, what they printed, and stopping one, from the run directory
alone. summary.json says how a run stands and in which Slurm job; the run directory's lock says whether its
launcher lives, and which process it is (runs/directory.py)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..errors import UsageError
from ..processes import slurm
from ..runs.directory import holder
from ..runs.files import read_summary, update_summary
from ..runs.record import REDACTED
from ..text import duration

ACTIVE = ("queued", "running", "preempted")  # the states a live launcher or Slurm's queue answers for
WAITING = ("PENDING", "REQUEUED", "REQUEUE_HOLD")  # Slurm's states of a job waiting to start (again)
SQUEUE_TIMEOUT = 30  # seconds squeue, scontrol or scancel may take to answer


def runs(paths: list[str]) -> list[Path]:
    """The run directories among PATHS: each one that holds a run, or else the runs inside it, at any depth."""
    found = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise UsageError(f"{path} is not a directory")
        inside = []
        for folder, subfolders, _ in os.walk(path):
            if is_run(Path(folder)):
                inside.append(Path(folder))
                subfolders.clear()  # a run's own folders (checkpoints, logs) hold no other run
            subfolders.sort()
        if not inside:
            raise UsageError(f"{path} holds no run (a run directory has a summary.json or a config.json)")
        found += inside
    return found


def is_run(path: Path) -> bool:
    return (path / "summary.json").exists() or (path / "config.json").exists()


def queue_state(job: str) -> tuple[str | None, float | None]:
    """Slurm's state of a job (PENDING, RUNNING, …) and when its current start began (None while it waits), or
    (None, None) when Slurm no longer lists it."""
    if not shutil.which("squeue"):
        return None, None
    result = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %S"], capture_output=True, text=True,
                            timeout=SQUEUE_TIMEOUT)
    fields = result.stdout.split() if result.returncode == 0 else []
    if not fields:
        return None, None
    try:
        began = time.mktime(time.strptime(fields[1], "%Y-%m-%dT%H:%M:%S")) if fields[0] != "PENDING" else None
    except (IndexError, ValueError):  # N/A, Unknown
        began = None
    return fields[0], began


def status(run_dir: Path) -> dict:
    """A run's row: its summary, the state made true to the moment (a run whose launcher is gone without a word
    is "lost"), and Slurm's state of its job."""
    summary = read_summary(run_dir)
    row = {"run": str(run_dir), **summary, "state": summary.get("state") or "unknown"}
    job = summary.get("slurm_job")
    if job and row["state"] in (*ACTIVE, "stopped"):
        row["queue"], began = queue_state(job)
        if row["state"] == "stopped" and row["queue"] in WAITING:  # Slurm requeued the job it stopped: preempted
            row["state"], row["reason"] = "preempted", f"stopped by Slurm and requeued (job {job}): {row['reason']}"
        elif row["state"] == "stopped" and row["queue"] and began and began > summary.get("updated", began):
            # a requeued job started again, and its launcher has not yet written: the stop was an earlier start's
            row["state"], row["reason"] = "queued", f"Slurm started job {job} again after: {row['reason']}"
    if row["state"] in ACTIVE and not holder(run_dir) and not row.get("queue"):
        row["reason"] = (f"Slurm no longer lists job {job}, and no launcher holds the run directory" if job else
                         "its launcher ended without a word (killed, or its machine went down)")
        row["state"] = "lost"
    if row["state"] == "running" and summary.get("updated") and summary.get("eta_s") is not None:
        row["eta_s"] = max(0.0, summary["eta_s"] - (time.time() - summary["updated"]))
        row["wall_s"] = round(time.time() - summary["started"], 1)
    return row


def table(rows: list[dict]) -> str:
    """The rows as aligned columns: run, state (and Slurm's), step of total, last loss, best metric, ETA, wall."""
    def best(row):
        b = row.get("best")
        return f"{b['metric']} {b['value']:.4g} @{b['step']}" if b else "-"

    cells = [("RUN", "STATE", "STEP", "LOSS", "BEST", "ETA", "WALL")]
    for row in rows:
        state = row["state"] + (f" ({row['queue']} job {row['slurm_job']})" if row.get("queue") else
                                f" (job {row['slurm_job']})" if row.get("slurm_job") else "")
        step = f"{row['step']}/{row['total_steps']}" if row.get("total_steps") else "-"
        loss = f"{row['train_loss']:.4f}" if row.get("train_loss") is not None else "-"
        eta = row.get("eta_s") if row["state"] == "running" else None
        cells.append((row["run"], state, step, loss, best(row), "-" if eta is None else duration(eta),
                      "-" if row.get("wall_s") is None else duration(row["wall_s"])))
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip() for cell in cells]
    reasons = [f"  {row['run']}: {row['reason']}" for row in rows if row.get("reason") and row["state"] != "stopped"]
    return "\n".join(lines + reasons)


def follow(run_dir: Path, live: bool) -> int:
    """Print the run's console.log; with `live`, go on printing what comes until the run has ended."""
    log = run_dir / "console.log"
    where = 0
    while True:
        ended = status(run_dir)["state"] not in ACTIVE  # read before the log: its last lines are in by then
        if log.exists():
            with open(log, "rb") as f:
                f.seek(where)
                chunk = f.read()
            where += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        if not live or ended:
            return 0
        time.sleep(0.5)


def cancel(run_dir: Path, wait: float) -> int:
    """Stop a run as SIGTERM does: every rank saves a checkpoint at the same step and the run ends. A local run's
    launcher gets the signal (on this machine); a Slurm job's launchers get it through Slurm, and a job still
    queued is cancelled. Waits for a local run to end and prints how it ended."""
    row = status(run_dir)
    job = row.get("slurm_job")
    if row["state"] not in ACTIVE:
        raise UsageError(f"{run_dir} is not running: it is {row['state']}")
    if job and row.get("queue"):
        pending = row["queue"] in WAITING  # held or pending: nothing runs that a signal could reach
        command = ["scancel", job] if pending else ["scancel", "--signal=TERM", job]
        result = subprocess.run(command, capture_output=True, text=True, timeout=SQUEUE_TIMEOUT)
        if result.returncode:
            raise UsageError(f"scancel refused job {job}: {result.stderr.strip()}")
        if pending:  # no launcher will say how it ended
            update_summary(str(run_dir), state="stopped", reason=f"cancelled while queued (Slurm job {job})")
        print(f"launch: {'cancelled queued job' if pending else 'sent SIGTERM to job'} {job}"
              + ("" if pending else ": its ranks save a checkpoint and stop; `launch status` tells when"))
        return 0
    live = holder(run_dir)
    found = re.match(r"pid (\d+) on (\S+)", live or "")
    if not found:
        raise UsageError(f"{run_dir} has no live launcher to stop (its lock: {live or 'free'})")
    pid, host = int(found[1]), found[2]
    if host != socket.gethostname():
        raise UsageError(f"{run_dir} runs on {host}: cancel it there (pid {pid})")
    os.kill(pid, signal.SIGTERM)
    print(f"launch: sent SIGTERM to the launcher of {run_dir} (pid {pid}); waiting for its checkpoint", flush=True)
    deadline = time.monotonic() + wait
    while holder(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    ended = status(run_dir)  # a stop's reason says so, and where its checkpoint is
    print(f"launch: {ended['reason'] if ended['state'] == 'stopped' else ended['state']}"
          + (f": {ended['reason']}" if ended.get("reason") and ended["state"] != "stopped" else ""))
    return 0 if ended["state"] not in ACTIVE else 1


def resume_command(argv: list[str]) -> list[str] | None:
    """`launch resume RUN_DIR [flags]`: the command that continues the run, as it was started (config.json
    records it) with the flags given here added (the last of a flag counts); None when there is nothing to
    start here: the run had finished, or it is a Slurm run, submitted again as it was."""
    usage = "usage: launch resume RUN_DIR [launcher or hyperparameter flags]"
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{usage}\n\nContinue a run with the command it was started with, --resume auto, and the flags given.")
        return None
    if not argv or argv[0].startswith("-"):
        raise UsageError(usage)
    run_dir, extra = Path(argv[0]), argv[1:]
    if not (run_dir / "config.json").exists():
        raise UsageError(f"{run_dir} is not a run directory (it has no config.json)")
    row = status(run_dir)
    if row["state"] in ACTIVE:
        raise UsageError(f"{run_dir} is {row['state']}: let it end, or stop it with launch cancel {run_dir}")
    if row["state"] == "completed" and not extra:
        print(f"launch: {run_dir} finished its {row.get('total_steps')} steps: nothing to resume (give flags, such as "
              "more --epochs, to train on)")
        return None
    if row.get("slurm_job"):
        if extra:
            raise UsageError(f"{run_dir} is a Slurm run: it resumes as it was submitted ({run_dir / 'slurm.sbatch'}); "
                             "submit anew with launch --slurm ... --resume auto to change its flags")
        job = slurm.submit((run_dir / "slurm.sbatch").read_text(), {})
        update_summary(str(run_dir), state="queued", reason=None, slurm_job=job)
        print(f"launch: submitted job {job}, which continues {run_dir} from its newest checkpoint")
        return None
    config = json.loads((run_dir / "config.json").read_text())
    recorded = config.get("command")
    if recorded is None:
        raise UsageError(f"{run_dir} was started by a launcher that did not record its command: continue it with "
                         f"that command and --resume auto --run-dir {run_dir}")
    given = {token.split("=", 1)[0] for token in extra}
    masked = [flag for flag, value in zip(recorded, recorded[1:], strict=False) if value == REDACTED]
    missing = [flag for flag in masked if flag not in given]
    if missing:
        raise UsageError(f"{run_dir} was started with {', '.join(missing)}, whose value is not recorded (a secret): "
                         "give it again")
    script_args = config["plan"].get("script_args")
    at = len(recorded) - (len(script_args) + 1 if script_args is not None else 0)  # a script's part stays last
    return [*recorded[:at], *extra, "--run-dir", str(run_dir), "--resume", "auto", *recorded[at:]]


def main(command: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"launch {command}")
    if command == "status":
        parser.description = "How runs stand: one row per run directory (a folder of runs gives a row per run)."
        parser.add_argument("paths", nargs="*", default=["runs"], metavar="RUN_DIR")
        parser.add_argument("--json", action="store_true", help="one JSON object per run, for scripts")
    elif command == "logs":
        parser.description = "What a run printed: its console.log (launch's and rank 0's output)."
        parser.add_argument("run_dir", metavar="RUN_DIR")
        parser.add_argument("-f", "--follow", action="store_true", help="go on printing until the run ends")
    else:
        parser.description = "Stop a run as SIGTERM does: it saves a checkpoint that --resume auto continues."
        parser.add_argument("run_dir", metavar="RUN_DIR")
        parser.add_argument("--wait", type=float, default=180, help="seconds to wait for a local run to end")
    args = parser.parse_args(argv)
    try:
        if command == "status":
            rows = [status(run) for run in runs(args.paths)]
            print("\n".join(json.dumps(row) for row in rows) if args.json else table(rows))
            return 0
        if not is_run(Path(args.run_dir)):
            raise UsageError(f"{args.run_dir} is not a run directory")
        return follow(Path(args.run_dir), args.follow) if command == "logs" else cancel(Path(args.run_dir), args.wait)
    except UsageError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the end of `logs -f`
        return 130
    except BrokenPipeError:  # `launch status | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and Python's flush at exit has nowhere to fail
        return 1
