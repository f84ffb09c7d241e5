"""NCCL's flight recorder on GPU runs, set as torchtitan sets it: every rank keeps its last collectives in a ring
buffer, and when one times out NCCL's watchdog dumps every rank's into the run's logs and ends the process; then
`torchfrtrace` reads the dumps together and names the collective, and the rank, that never came. A variable the
user set is theirs (either name of one setting counts); on the CPU nothing is set."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..plan import Plan

BUFFER = 20000  # collectives kept per rank (torchtitan's trace_buf_size)
PREFIX = "rank_"  # a dump is PREFIX + the global rank, as torchfrtrace reads them with -p
DUMP = ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")  # the current name, then the older one


def folder(run_dir: str | Path) -> Path:
    return Path(run_dir) / "logs" / "flight-recorder"


def environment(plan: Plan, environ: Mapping[str, str]) -> dict:
    """The flight recorder's variables for the workers of `plan`, less those set in `environ`."""
    if plan.device != "cuda":
        return {}
    settings = [(("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"), str(BUFFER)),
                (("TORCH_NCCL_DUMP_ON_TIMEOUT",), "1"),
                (("TORCH_NCCL_ASYNC_ERROR_HANDLING",), "3"),  # end the process at once, its communicators as they are
                (DUMP, str(folder(plan.run_dir) / PREFIX))]
    return {name: value for names, value in settings if not any(n in environ for n in names) for name in names}


def _dump(environ: Mapping[str, str]) -> str | None:
    """Where the dumps go (a path prefix), under either name."""
    return next((environ[name] for name in DUMP if environ.get(name)), None)


def prepare(environ: Mapping[str, str]) -> None:
    """The folder the dumps go to, which NCCL does not make."""
    path = _dump(environ)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def dumped(environ: Mapping[str, str], since: float, world: int) -> str:
    """For a failed job's message: where the flight recorder dumped since `since` (a time), and how to read it;
    empty where it did not."""
    path = _dump(environ)
    if not path:
        return ""
    where, prefix = Path(path).parent, Path(path).name
    try:
        ranks = sorted(int(p.name[len(prefix):]) for p in where.glob(f"{prefix}*")
                       if p.name[len(prefix):].isdigit() and p.stat().st_mtime >= since)
    except OSError:
        return ""
    if not ranks:
        return ""
    partial = " --allow-incomplete-ranks" if len(ranks) < world else ""  # torchfrtrace wants every rank's else
    return (f"; a collective timed out and NCCL's flight recorder dumped the last collectives of rank"
            f"{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} to {where}: `torchfrtrace {where} -p "
            f"{prefix}{partial}` names the collective, and the ranks, that never completed it")
