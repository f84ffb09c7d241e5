"""Where torch's agent puts each worker's output: RUN_DIR/logs/rank-R.out and rank-R.err, R the global rank, in one
flat folder whatever the node; a restart's (--max-restarts) beside them as rank-R.restart-N.out, and an earlier
start's (a resume) kept as rank-R.out.1 (its own earlier one as .2, …). Local rank 0 of each node prints to its
launcher's console instead. torch's own layout buries them under logs/RUNID_RANDOM/attempt_N/LOCAL_RANK/, a folder
per node, start and rank."""

from __future__ import annotations

import os
from pathlib import Path

from torch.distributed.elastic.multiprocessing import LogsDest, LogsSpecs

from ..plan import ATTEMPT_ENV, attempt


def files(run_dir: str, rank: int, restart: int = 0) -> tuple[Path, Path, Path]:
    """(stdout, stderr, the exception torch's error handler records) of a rank's start or restart."""
    name = f"rank-{rank}{f'.restart-{restart}' if restart else ''}"
    logs = Path(run_dir) / "logs"
    return logs / f"{name}.out", logs / f"{name}.err", logs / "errors" / f"{name}.json"


def keep(path: Path) -> str:
    """`path`, free to be written: an earlier start's file there moves to PATH.1, its PATH.1 to PATH.2, …"""
    if path.exists():
        n = 1
        while path.with_name(f"{path.name}.{n}").exists():
            n += 1
        for k in range(n, 0, -1):
            os.replace(path.with_name(f"{path.name}.{k - 1}") if k > 1 else path, path.with_name(f"{path.name}.{k}"))
    return str(path)


class RankLogs(LogsSpecs):
    def __init__(self, run_dir: str):
        super().__init__(log_dir=str(Path(run_dir) / "logs"))
        self.run_dir = run_dir

    @property
    def root_log_dir(self) -> str:
        return self._root_log_dir

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        stdouts, stderrs, errors = {}, {}, {}
        for local_rank, env in envs.items():
            rank, restart = int(env["RANK"]), attempt(os.environ if ATTEMPT_ENV in os.environ else env)
            out, err, error = files(self.run_dir, rank, restart)
            if local_rank == 0:  # the console's
                stdouts[local_rank] = stderrs[local_rank] = ""
            else:
                stdouts[local_rank], stderrs[local_rank] = keep(out), keep(err)
            error.parent.mkdir(parents=True, exist_ok=True)
            error.unlink(missing_ok=True)  # an earlier start's, which must not be taken for this one's
            errors[local_rank] = env["TORCHELASTIC_ERROR_FILE"] = str(error)
        return LogsDest(stdouts, stderrs, {}, {}, errors)
