"""One live run per run directory: node 0's launcher holds an exclusive lock on RUN_DIR/.lock for as long as
it lives, and writes who it is into the file. The kernel releases the lock when that process ends, however it
ends (its workers die with it), so a dead run never leaves it behind; a second launch, or a Slurm job
resubmitted while the first still runs, is refused and told which run holds the directory."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO

LOCK = ".lock"
UNNAMED = "a run that has not said who it is yet"  # between taking the lock and writing into it
_held: list[IO] = []  # open for the rest of this process's life: closing the file would release the lock


class InUse(Exception):
    """The run directory is held by a live run (or cannot be made ours): one line, exit 2."""


def holder(run_dir: Path) -> str | None:
    """Who holds the run directory now, or None when no live run does."""
    try:
        with open(run_dir / LOCK) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or UNNAMED
    except (FileNotFoundError, NotADirectoryError):
        pass
    return None


def make(run_dir: Path) -> None:
    """Create the run directory if need be, or say in one line why it cannot be."""
    blocking = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking:
        raise InUse(f"--run-dir {run_dir}: {blocking} is a file, not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InUse(f"--run-dir {run_dir} cannot be created: {e.strerror or e}") from None


def claim(run_dir: Path) -> None:
    """Create the run directory if need be and hold it until this process ends."""
    make(run_dir)
    try:
        f = open(run_dir / LOCK, "a+")
    except OSError as e:
        raise InUse(f"--run-dir {run_dir} cannot be written: {e.strerror or e}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip()
        f.close()
        raise InUse(busy(run_dir, who or UNNAMED)) from None
    job = os.environ.get("SLURM_JOB_ID")
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            f"{f', Slurm job {job}' if job else ''}\n")
    f.flush()
    _held.append(f)


def busy(run_dir: Path, who: str) -> str:
    return (f"run directory {run_dir} is in use by a live run ({who}): wait for it to end, stop it, or choose "
            "another --run-dir or --name")
