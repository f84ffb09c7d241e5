"""Every training process: plan → Accelerator (process group, world-size guard) → recipe → trainer."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from ..engines import group
from ..errors import PLAIN, CheckpointError, RecipeError, Stopped, TrainingError
from ..plan import PARENT_ENV, Plan
from ..recipe import contract as recipe
from ..runs import checkpoint
from ..runs.files import keep_console
from ..text import first_line
from ..train.loop import Trainer
from . import hang
from .collector import settle
from .leave import die_with, leave

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters
# errors that follow from another rank's failure (failures.root_cause looks further)
LOST_PEER = re.compile(r"connection (closed|reset|refused)|broken pipe|by peer|remote process exited|timed out|"
                       r"a collective waited", re.I)
RESERVED, SPARE = 64 << 10, ".reserved"  # bytes set aside for the error report, and its file's suffix


def steady_host_memory() -> None:
    """Keep the blocks a step allocates and frees in the process's heap. glibc gives blocks from its mmap
    threshold up (128 KiB at first, raised as such blocks are freed) and a heap top beyond twice that back to
    the system on free, so every step's activations can come back as fresh pages to fault in and zero: on a
    CPU that cost a small transformer 5–10 % of its step, more or less by what the process happened to
    allocate before (benchmarks/lm_speed.py). Blocks up to 32 MiB, glibc's own ceiling for the threshold,
    then come from the heap, and the heap keeps up to 1 GiB free at its top: what a step frees, the next one
    takes again (as torch's caching allocator does on a GPU)."""
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def die_with_launcher() -> None:
    """The kernel kills this worker the moment the launcher that started it dies, however it died (kill -9,
    the OOM killer): each worker has a session of its own, so nothing else would reach it, and an orphan
    would train on unsupervised, writing into a run directory that a rerun may be using."""
    die_with(int(os.environ.get(PARENT_ENV, "0")), signal.SIGKILL)


def run(plan: Plan) -> dict:
    steady_host_memory()
    acc = group.accelerator(plan)  # joins the process group and checks the world size
    if acc.is_main_process:
        keep_console(plan.run_dir)  # beside launch's own, which this process's output does not pass through
    hang.start(plan.run_dir, acc.process_index, acc.num_processes, plan.timeout, acc.device)
    try:
        module = recipe.load(plan.recipe)
        hp = recipe.hparams(module.Hparams, plan.hparams)
        if plan.debug:
            torch.autograd.set_detect_anomaly(True)
        training = Trainer(plan, acc, module, hp)
        settle()
        return training.fit()
    finally:
        hang.stop()
        if torch.distributed.is_initialized():
            # DDP's reducer keeps gloo work objects that hold tensors; left to interpreter shutdown, their
            # destructors abort the process ("terminate called without an active exception"), so free them
            # now: Accelerate holds the prepared model until free_memory(), which also collects the garbage
            acc.free_memory()
            torch.distributed.destroy_process_group()


def reserve(path: str) -> None:
    """Set aside the blocks of the error report now: a disk that fills up later cannot refuse it."""
    with open(path + SPARE, "wb") as f:
        f.write(b" " * RESERVED)


def record(e: BaseException, path: str, callstack: str | None = None) -> None:
    """The failure in torch's error-file format, which the elastic agent hands to the launcher, plus the
    exact time (the launcher shows the earliest failure: the others usually follow from it). Written over
    the reserved blocks and renamed into place, the report is whole or absent, never a torn file."""
    now = time.time()
    data = {
        "message": {"message": f"{type(e).__name__}: {e}",
                    "extraInfo": {"py_callstack": (callstack or traceback.format_exc())[-RESERVED // 2:],
                                  "timestamp": str(int(now))}},
        "launcher": {"time": now, "plain": isinstance(e, PLAIN), "usage": isinstance(e, RecipeError),
                     "text": str(e), "peer": bool(LOST_PEER.search(str(e))), "step": hang.reached},
    }
    text = json.dumps(data).encode()
    with open(path + SPARE, "r+b" if os.path.exists(path + SPARE) else "wb") as f:
        f.write(text)
        f.truncate(len(text))
    os.replace(path + SPARE, path)


def explain(e: Exception, plan: Plan) -> Exception:
    """Torch's errors whose cause is known, in plain words: a collective that timed out means another rank went
    silent; DDP's unfinished reduction, parameters without a gradient; a full disk, wherever it was met."""
    if checkpoint.disk_full(e) and not isinstance(e, CheckpointError):
        written = next((c.filename for c in checkpoint.causes(e) if getattr(c, "filename", None)), plan.run_dir)
        return TrainingError(checkpoint.no_space(f"writing {written}", Path(written).parent, plan.run_dir))
    text = first_line(e)
    if re.search(r"timed out waiting|collective operation timeout", text, re.I):
        waited, flag = hang.limit(plan)
        return TrainingError(
            f"a collective waited {waited:g} s ({flag}) for a rank that stopped responding ({text}); "
            + (hang.silent(plan.run_dir, plan.world_size, waited)
               or f"the silent rank's output is under {plan.run_dir}/logs"))
    if "Expected to have finished reduction in the prior iteration" in text:  # DDP, a step after the first
        return RecipeError(
            "some parameters got no gradient in a step, which DDP cannot reduce: set find_unused_parameters = True "
            "in the recipe (or pass --find-unused-parameters) when parameters take part only in some steps")
    return e


def main() -> None:
    """Started by the elastic agent: the root cause goes to the error file, from which the launcher shows it
    once, instead of every rank printing its own traceback."""
    die_with_launcher()
    plan = Plan.from_env()
    if plan.elastic:  # this start's world, from the nodes that met
        plan = plan.resized(int(os.environ["WORLD_SIZE"]))
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        reserve(error_file)
    try:
        run(plan)
    except Stopped as stopped:
        sys.exit(128 + stopped.signum)
    except Exception as e:
        if not error_file:
            raise
        record(explain(e, plan), error_file)
        # skip interpreter shutdown: the traceback still holds the process group's objects, whose
        # destructors would abort the process and hide the exit code
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    finally:
        if error_file and os.path.exists(error_file + SPARE):
            os.remove(error_file + SPARE)
    leave(0)
