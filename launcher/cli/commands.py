"""`launch ARGV`: which command it is. A run (run.py, `launch resume` too), or one of the commands on runs and
sweeps, each in its own module, imported only when asked for."""

from __future__ import annotations

import sys
from pathlib import Path

from . import run


def main(argv: list[str] | None = None) -> None:
    given = run.with_files(sys.argv[1:] if argv is None else argv)
    command, rest = given[:1], given[1:]
    if command == ["export"]:
        from ..runs import export

        export.main(rest)
    elif command == ["sweep"] or command == ["status"] and any(Path(a, "sweep.json").exists() for a in rest):
        from . import leaderboard, sweep

        sys.exit(sweep.main(rest) if command == ["sweep"] else leaderboard.status_main(rest))
    elif command in (["status"], ["logs"], ["cancel"]):
        from . import jobs

        sys.exit(jobs.main(command[0], rest))
    else:
        run.main(argv)
