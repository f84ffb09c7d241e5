"""The run directory's records, which the launcher and rank zero both write: files replaced atomically,
config.json (the run's record, published once a start trains), summary.json (how the run stands), and the
console's copy in console.log, with what a terminal that hung up needs."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

from ..plan import Plan


def write_text(path: Path, text: str) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


PENDING = ".config.next.json"  # a start's record until it has begun training: see write_record


def write_record(run_dir: str, record: dict) -> None:
    """The run's record (config.json). A start that continues a run keeps it apart, beside the record of the start
    it continues, until it has begun training (publish_record): a start that fails never replaces the command
    `launch resume` repeats."""
    path = Path(run_dir) / "config.json"
    write_json(path.with_name(PENDING) if path.exists() else path, record)


def publish_record(run_dir: str, **more) -> dict:
    """This start's record becomes the run's, with `more` added (what the data revealed); the record."""
    path = Path(run_dir) / "config.json"
    pending = path.with_name(PENDING)
    config = {**json.loads((pending if pending.exists() else path).read_text()), **more}
    write_json(path, config)
    pending.unlink(missing_ok=True)
    return config


SUMMARY_ORDER = ("state", "reason", "step", "total_steps", "best", "metrics", "train_loss", "samples_per_s", "eta_s",
                 "wall_s", "warnings", "verdict", "started", "updated", "pid", "host", "slurm_job")


def read_summary(run_dir: str) -> dict:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def start_summary(plan: Plan) -> None:
    """Node 0's launcher as a run starts: a new summary, or a resumed run's with this start's facts."""
    earlier = read_summary(plan.run_dir) if plan.resume else {}
    write_json(Path(plan.run_dir) / "summary.json", {
        **earlier, "state": "running", "reason": None, "eta_s": None, "started": time.time(), "wall_s": 0.0,
        "pid": os.getpid(), "host": socket.gethostname(), "slurm_job": slurm_job()})


def slurm_job() -> str | None:
    """The Slurm job this process runs in, as squeue and scancel name it: an array's task as JOB_TASK."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def update_summary(run_dir: str, **fields) -> None:
    """Merge fields into the run's summary.json: how the run stands, for a person or a script, in one small file.
    Rank zero keeps it current while it trains; the launcher of node 0, which alone knows how the job ended,
    writes the last word (the state, and the reason in one line for any but "completed")."""
    summary = {**read_summary(run_dir), **fields, "updated": time.time()}
    if summary.get("started"):
        summary["wall_s"] = round(summary["updated"] - summary["started"], 1)
    ordered = sorted(summary, key=lambda k: SUMMARY_ORDER.index(k) if k in SUMMARY_ORDER else len(SUMMARY_ORDER))
    try:
        write_json(Path(run_dir) / "summary.json", {k: summary[k] for k in ordered})
    except OSError:  # a full disk, a run directory gone: a record never changes how a run ends, nor hides why
        pass


class ConsoleLog:
    """A standard stream that also appends each line it finishes to the run's console.log, as a terminal ends up
    showing it: a line redrawn with carriage returns (the progress bar) as its last drawing, a bar erased
    before a line (tqdm's write) as nothing. Launch and rank zero each keep one, appending to the same file."""

    def __init__(self, stream, log: Path):
        self.stream, self.pending = stream, ""
        self.fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, text: str) -> int:
        self.pending += text
        if "\n" in self.pending:
            *lines, self.pending = self.pending.split("\n")
            logged = "".join(line.rstrip("\r").rsplit("\r", 1)[-1].rstrip() + "\n" for line in lines)
            try:
                if self.fd is not None:
                    os.write(self.fd, logged.encode())
            except OSError:  # a full disk: the console goes on without its log, and the run with it
                self.fd = None
        cut = self.pending.rstrip("\r").rfind("\r")  # a bar that redraws without end keeps its last drawing alone
        if cut >= 0:
            self.pending = self.pending[cut + 1:]
        return self.stream.write(text)  # last: a terminal that hung up raises here, after the log has the line

    def __getattr__(self, name):  # isatty (tqdm draws on terminals alone), fileno, flush, encoding: the stream's
        return getattr(self.stream, name)


def keep_console(run_dir: str) -> None:
    """From here on this process's output also goes to RUN_DIR/console.log (once per process)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, ConsoleLog):
            setattr(sys, name, ConsoleLog(stream, Path(run_dir) / "console.log"))


def detach_terminal() -> None:
    """After a hangup (a closed terminal, dropped ssh) every write to the terminal fails (EIO): what was meant
    for it goes nowhere instead, so that a print cannot kill a run on its way to the checkpoint. The terminal
    is a character device (no longer a tty once hung up); /dev/null, one too, is replaced by itself."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        if stat.S_ISCHR(os.fstat(fd).st_mode):
            os.dup2(null, fd)
    os.close(null)


def warn(text: str) -> None:
    print(f"launch: warning: {text}", file=sys.stderr, flush=True)


def terminal_lost(e: OSError) -> None:
    """A console write failed: when the terminal hung up (the launcher's SIGHUP reaches this process a moment
    later), detach from it and go on; any other failure stands."""
    if e.errno != errno.EIO:
        raise e
    detach_terminal()
