"""A failed job in the launcher's words: which rank's failure caused the others, and what to say of it."""

from __future__ import annotations

import re
import signal
from pathlib import Path

from ..plan import Plan, attempt
from ..text import first_line
from .ranklogs import files

# what torch raises where code calls CUDA and there is none: a CPU build, no driver, no device
CUDA_MISSING = re.compile(r"_cuda_setDevice|_cuda_init|Torch not compiled with CUDA enabled|Found no NVIDIA driver|"
                          r"No CUDA GPUs are available|doesn't have NCCL built in|ProcessGroupNCCL is only supported "
                          r"with GPUs")
# the agent SIGKILLs a rank 30 s after it SIGTERMed it: a SIGKILL sooner after the first failure came from outside
OUTSIDE_KILL = 10


def told(error, plan: Plan) -> tuple[str, str | None, int]:
    """torch's ChildFailedError as (the console's text, the summary's shorter reason or None, the exit code): 2
    where the recipe broke its contract, as a usage error does before anything starts."""
    rank, failure = root_cause(error.failures)
    text = describe(rank, failure, plan)
    # a traceback: the summary's one line is the exception's
    reason = f"rank {rank} failed: {first_line(failure.message['message'])}" if "\n" in text else None
    return text, reason, 2 if failure.error_file_data.get("launcher", {}).get("usage") else 1


def root_cause(failures: dict) -> tuple:
    """(rank, failure) that caused the others. The agent lists failures in the order it found them, then stops
    the other ranks itself: SIGTERM, and SIGKILL after a grace period of 30 s. So a rank that died of SIGTERM is
    a consequence, as is one killed long after the first failure, and so is a rank whose own error says that a
    peer went away (a closed connection, a timed-out collective). Among the rest, the earliest: by the time the
    worker recorded, where it wrote a record, else when the agent found it; then in the agent's order."""
    def time_of(failure) -> float:
        return failure.error_file_data.get("launcher", {}).get("time", failure.timestamp)

    first = min(time_of(f) for f in failures.values())

    def key(item):
        position, (rank, failure) = item
        agent = failure.exitcode == -signal.SIGTERM or (failure.exitcode == -signal.SIGKILL
                                                        and time_of(failure) > first + OUTSIDE_KILL)
        peer = failure.error_file_data.get("launcher", {}).get("peer", False)
        return agent, peer, time_of(failure), position

    return min(enumerate(failures.items()), key=key)[1]


def describe(rank: int, failure, plan: Plan) -> str:
    ours = failure.error_file_data.get("launcher")
    if ours and ours.get("usage"):  # the recipe breaks the contract: the same on every rank
        return f"error: {ours['text']}"
    if ours and ours["plain"]:
        return f"error: rank {rank}: {ours['text']}"
    if ours and ours.get("peer"):  # every failure here follows another's: on another node, which tells the cause
        return (f"rank {rank} lost another rank ({first_line(ours['text'])}); the cause is in that "
                "rank's output")
    message = failure.message
    if isinstance(message, dict):
        text = message.get("extraInfo", {}).get("py_callstack") or message["message"]
        return f"rank {rank} failed: {text}" + _no_gpu(text, plan)
    how = (f"was killed by {failure.signal_name()} (out of memory, or killed from outside?)" if failure.exitcode < 0
           else f"exited with code {failure.exitcode} without a traceback")
    if failure.local_rank == 0:  # its node's launcher printed its output
        return f"rank {rank} {how}; its output is above"
    # the job fails once every restart has been used; an elastic job's starts are counted by all its nodes
    out, err, _ = files(plan.run_dir, rank, attempt() if plan.elastic else plan.max_restarts)
    return f"rank {rank} {how}; its output is in {err} and {out.name}"


def _no_gpu(text: str, plan: Plan) -> str:
    """A rank of a CPU run that called CUDA: the code needs a GPU, which this machine does not have."""
    import torch

    if plan.device != "cpu" or not CUDA_MISSING.search(text) or torch.cuda.is_available():
        return ""
    what = Path(plan.recipe).name
    return (f"\n{what} needs a GPU (it calls CUDA or NCCL) and this machine has none (torch {torch.__version__}, "
            f"{'built without CUDA' if torch.version.cuda is None else 'no GPU visible'}): run it on a GPU machine, "
            "or let it choose: torch.device('cuda' if torch.cuda.is_available() else 'cpu'), and the gloo backend "
            "without CUDA")
