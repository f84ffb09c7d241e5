"""Where every rank was when a collective timed out, and which one was silent.

A collective that waits --timeout seconds for a silent rank fails on the ranks that waited; the silent one
says nothing. So each process of a multi-process job runs a watchdog thread: when the training loop has not
moved for 0.9 × --timeout (before any collective can time out on it), it writes the Python stack of every
thread to RUN_DIR/logs/stacks/rank-R.txt, under a header with the step and the number of collectives the
rank had joined. A rank that waited then reads the headers (the run directory is shared by every node) and
names the rank that had joined fewest: the one the others waited for.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import sysconfig
import threading
import time
import traceback
from pathlib import Path

import torch

EARLY = 0.9  # the stacks are written this fraction of --timeout after the last sign of progress
HEADER = re.compile(r"rank (\d+) .*: during step (\d+), (\d+|\?) collectives joined; in (.*)$")
INSTALLED = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})


def folder(run_dir: str | Path) -> Path:
    return Path(run_dir) / "logs" / "stacks"


class Watchdog:
    """This rank's stacks, written once per stall; `beat` is the training loop's sign of progress."""

    def __init__(self, run_dir: str, rank: int, timeout: float, device: torch.device):
        self.path = folder(run_dir) / f"rank-{rank}.txt"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)  # an earlier run's
        self.rank, self.after, self.device = rank, EARLY * timeout, device
        self.step, self.last, self.written = 1, time.monotonic(), False
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, name="launcher-watchdog", daemon=True)
        self.thread.start()

    def beat(self, step: int | None) -> None:
        """Progress: in training `step` (counted from 1), or more of the same step's work."""
        if step is not None:
            self.step = step
        self.last, self.written = time.monotonic(), False

    def watch(self) -> None:
        while not self.done.wait(min(1.0, self.after / 10)):
            idle = time.monotonic() - self.last
            if idle >= self.after and not self.written:
                self.written = True
                try:
                    self.write(idle)
                except OSError:  # a full or read-only disk: the stacks are a help, never a new failure
                    pass

    def write(self, idle: float) -> None:
        frames = sys._current_frames()
        main = threading.main_thread().ident
        stack = traceback.extract_stack(frames[main]) if main in frames else []
        own = [f for f in stack if not f.filename.startswith(INSTALLED)] or stack
        where = f"{own[-1].name} ({Path(own[-1].filename).name}:{own[-1].lineno})" if own else "?"
        lines = [f"rank {self.rank} (pid {os.getpid()} on {socket.gethostname()}), no progress for {idle:.0f} s: "
                 f"during step {self.step}, {collectives(self.device)} collectives joined; in {where}\n"]
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in frames.items():
            if ident != threading.get_ident():
                name = "main thread" if ident == main else f"thread {names.get(ident, hex(ident))}"
                lines += [f"\n{name} (most recent call last):\n", *traceback.format_stack(frame)]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(lines))
        os.replace(tmp, self.path)  # whole or absent for the rank that reads it

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def collectives(device: torch.device) -> int | str:
    """How many collectives this rank has issued on the default process group ('?' where the backend won't say)."""
    try:
        group = torch.distributed.distributed_c10d._get_default_group()
        return group._get_backend(device)._get_sequence_number_for_group()
    except Exception:
        return "?"


_dog: Watchdog | None = None


def start(run_dir: str, rank: int, world: int, timeout: float, device: torch.device) -> None:
    global _dog
    if world > 1:
        _dog = Watchdog(run_dir, rank, timeout, device)


def beat(step: int | None = None) -> None:
    if _dog:
        _dog.beat(step)


_retimed = False  # whether the collectives wait --step-timeout now, not --timeout


def retime(plan) -> None:
    """The collectives wait --step-timeout from now (group.step_timeout): the stacks are written before that
    ends."""
    global _retimed
    _retimed = True
    if _dog:
        _dog.after = EARLY * plan.step_timeout


def limit(plan) -> tuple[float, str]:
    """How long a collective waits now, and the flag that says so."""
    return (plan.step_timeout, "--step-timeout") if _retimed else (plan.timeout, "--timeout")


def stalled() -> Path | None:
    """Where this rank wrote its stacks, when training has not moved since: a stall no signal can save from."""
    return _dog.path if _dog and _dog.written else None


reached: int | None = None  # the step training was in when the watchdog stopped: a failure's record says it


def stop() -> None:
    global _dog, reached
    if _dog:
        _dog.stop()
        reached, _dog = _dog.step, None


def silent(run_dir: str, world: int, timeout: float) -> str:
    """Which rank the others waited for, and where each rank's stack is: from the watchdogs' headers."""
    where, joined, missing = folder(run_dir), {}, []
    for rank in range(world):
        path = where / f"rank-{rank}.txt"
        try:
            fresh = time.time() - path.stat().st_mtime < 2 * timeout
            match = HEADER.search(path.read_text().splitlines()[0]) if fresh else None
        except (OSError, IndexError):
            match = None
        if match:
            joined[rank] = (int(match[3]) if match[3].isdigit() else None, int(match[2]), match[4])
        else:
            missing.append(rank)
    if not joined:
        return ""
    counts = {r: n for r, (n, _, _) in joined.items() if n is not None}
    parts = []
    if counts and len(set(counts.values())) > 1:
        fewest = min(counts.values())
        behind = [r for r, n in counts.items() if n == fewest]
        others = sorted({n for n in counts.values() if n != fewest})
        parts.append(" and ".join(f"rank {r} was silent, in {joined[r][2]} during step {joined[r][1]}" for r in behind)
                     + f": it had joined {fewest} collectives, the others {'/'.join(map(str, others))}")
    elif counts and not missing:
        parts.append(f"every rank had joined {next(iter(counts.values()))} collectives: they waited for one another")
    if missing:
        parts.append(f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} wrote no stack (stuck "
                     "without releasing Python's lock, or its node was lost)")
    return "; ".join([*parts, f"every rank's stack: {where}/rank-*.txt"])
