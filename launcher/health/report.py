"""The pre-flight report: a line per check, the warnings, the numbers; a check that cannot run on this recipe says
so in its line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import RecipeError
from ..text import first_line


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)  # one per check
    warnings: list[str] = field(default_factory=list)  # what looks wrong, and what to do
    values: dict = field(default_factory=dict)  # the numbers, for metrics.jsonl and W&B


@dataclass
class Call:
    """A torch loss function the step called: its name, arguments by name, and result."""

    name: str
    args: dict
    value: torch.Tensor


def checked(report: Report, what: str, check: Callable[[], None]) -> None:
    """Run one check; one that cannot read this recipe's data or model says so and lets the run go on. A
    recipe that breaks the contract (RecipeError) still stops it."""
    try:
        check()
    except RecipeError:
        raise
    except Exception as e:
        reason = first_line(e)
        report.lines.append(f"{what:<8} not checked ({type(e).__name__}: {reason})")


def console_lines(report: Report) -> list[str]:
    """The console's lines: one per check, and last the warnings (on lines of their own) or that there are none."""
    warnings = "\n".join(f"warning: {w}" for w in report.warnings) or "check  pre-flight: no warning"
    return [f"check  {line}" for line in report.lines] + [warnings]
