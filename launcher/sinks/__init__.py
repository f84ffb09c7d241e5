"""Rank zero's outputs, fanned out: every record goes to each sink of a list, one file each: the console
(console.py), metrics.jsonl (jsonl.py), summary.json (summary.py), W&B (wandb_run.py) and TensorBoard (board.py).
A new backend is one more `Sink`.

Only global rank 0 ever builds a Sinks; every other rank has a Silent. Nothing here is on the per-step path
except `advance`, which tqdm keeps to a time check between redraws.
"""

from __future__ import annotations

from pathlib import Path

from ..plan import Plan
from ..runs.files import publish_record, warn
from ..text import first_line
from .base import Sink
from .board import Board
from .console import Console
from .jsonl import MetricsFile
from .summary import Summary
from .wandb_run import WandbRun


class Silent:
    """The sinks of every rank but zero: the same calls, nothing written, so that the loop needs no rank guards."""

    def advance(self) -> None:
        pass

    def print(self, text: str) -> None:
        pass

    def progress(self, iterable, what: str, total: int):
        return iterable

    def log(self, step: int, values: dict, line: str | None = None, eta: float | None = None) -> None:
        pass

    def results(self, step: int, values: dict, line: str | None) -> None:
        pass

    def best(self, metric: str, value: float, step: int) -> None:
        pass

    def event(self, step: int, name: str, values: dict, line: str | None) -> None:
        pass

    def text(self, step: int, name: str, text: str) -> None:
        pass

    def classes(self, step: int, names: list[str], matrix: list[list[int]], weights_step: int) -> None:
        pass

    def image(self, step: int, name: str, path: Path) -> None:
        pass

    def close(self, step: int, ok: bool, last: str | None = None) -> None:
        pass


class Sinks:
    """Rank zero's: each call goes to every sink; a `line` also to the console."""

    def __init__(self, plan: Plan, data: dict, total_steps: int, start_step: int = 0):
        self.plan = plan
        config = publish_record(plan.run_dir, data=data)  # training begins: this start's record is the run's
        self.console = Console(total_steps, start_step)
        self.advance = self.console.advance  # a step taken: the bar moves, where one is drawn
        self.summary = Summary(plan.run_dir, total_steps, start_step)
        self.metrics = MetricsFile(plan.run_dir, start_step)
        self.sinks: list[Sink] = [self.metrics, self.summary, self.console]
        wandb = WandbRun.start(plan, config, self.print)
        if wandb:
            self.sinks.append(wandb)
        if plan.tensorboard:
            self.sinks.append(Board(plan.run_dir, start_step))

    def print(self, text: str) -> None:
        self.console.print(text)

    def progress(self, iterable, what: str, total: int):
        """`iterable` with a bar of its own under the training's, on a terminal alone; erased when it ends."""
        return self.console.progress(iterable, what, total)

    def log(self, step: int, values: dict, line: str | None = None, eta: float | None = None) -> None:
        """One record at one optimizer step, to every sink; `line` also goes to the console (and the summary is
        written, with the training's `eta`: at the console's pace, not every step's)."""
        for sink in self.sinks:
            sink.log(step, values)
        if "train/loss" in values:
            self.summary.trained(step, values, eta, write=bool(line))
        if line:
            self.print(line)

    def results(self, step: int, values: dict, line: str | None) -> None:
        """An evaluation's results: a record, and in the summary the latest value of each metric."""
        self.log(step, values, line)
        self.summary.results(values)

    def best(self, metric: str, value: float, step: int) -> None:
        """The recipe's best metric improved (written with the next summary)."""
        self.summary.best(metric, value, step)

    def event(self, step: int, name: str, values: dict, line: str | None) -> None:
        """Something that happened once (early stopping, the verdict): a record, a console line, the summaries."""
        for sink in self.sinks:
            sink.event(step, name, values)
        if line:
            self.print(line)

    def text(self, step: int, name: str, text: str) -> None:
        """A text the recipe produced (a language model's sample)."""
        for sink in self.sinks:
            sink.text(step, name, text)

    def classes(self, step: int, names: list[str], matrix: list[list[int]], weights_step: int) -> None:
        """The test split's confusion matrix and each class's precision, recall and F1."""
        from ..runs import pictures  # matplotlib: at the end, not in every process's start-up

        record = {"names": names, "matrix": matrix, "weights_step": weights_step, **pictures.per_class(matrix)}
        for sink in self.sinks:
            sink.classes(step, record)

    def image(self, step: int, name: str, path: Path) -> None:
        for sink in self.sinks:
            sink.image(step, name, path)

    def draw(self, step: int) -> None:
        """The run's pictures, from every record it wrote (an earlier start's too), into RUN_DIR/pictures and the
        sinks. A picture that cannot be drawn never changes how the run ends: a warning says why."""
        from ..runs import pictures

        run_dir = Path(self.plan.run_dir)
        try:
            written = pictures.draw_run(run_dir, self.summary.fields.get("best"), self.plan.name)
        except Exception as e:
            warn(f"the run's pictures were not drawn ({type(e).__name__}: {first_line(e)})")
            return
        for path in written:
            self.image(step, f"pictures/{path.stem}", path)
        if written:
            self.print(f"pictures: {', '.join(path.name for path in written)} → {run_dir / 'pictures'}")

    def close(self, step: int, ok: bool, last: str | None = None) -> None:
        """The end: the bar and metrics.jsonl closed, the pictures drawn, the `last` line (done: ...) printed, then
        every other sink closed (the summary's state, a failure's and a stop's left to the launcher; W&B's run
        finished)."""
        first = [self.metrics, self.console]  # metrics.jsonl complete before the pictures read it
        for sink in first:
            sink.close(step, ok)
        if self.plan.pictures:
            self.draw(step)
        if last:
            self.print(last)
        for sink in self.sinks:
            if sink not in first:
                sink.close(step, ok)
