"""Weights & Biases: the run's records, summaries, tables and pictures. W&B never ends a run: when it cannot
start, or its service dies under the run, a warning says so and metrics.jsonl keeps every record."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path

from ..plan import Plan
from ..runs.files import warn
from ..text import first_line
from .base import Sink


class WandbRun(Sink):
    def __init__(self, plan: Plan, run, say: Callable[[str], None]):
        self.plan, self.run, self.say = plan, run, say
        self.texts: dict[str, list] = {}  # name → [step, text] rows, for W&B tables

    @classmethod
    def start(cls, plan: Plan, config: dict, say: Callable[[str], None]) -> WandbRun | None:
        """A W&B run, or None with one warning when W&B cannot start: training never depends on it."""
        if plan.wandb == "disabled":
            return None
        try:
            import wandb

            run = wandb.init(
                project=plan.wandb_project,
                entity=plan.wandb_entity,
                group=plan.wandb_group,
                name=plan.name,
                dir=plan.run_dir,
                config=config,
                mode=plan.wandb,
                id=plan.wandb_id,
                resume="allow",  # a resumed run continues the same W&B run
                settings=wandb.Settings(init_timeout=30, silent=True, console="off"),
            )
        except Exception as e:
            warn(f"W&B could not start ({type(e).__name__}: {first_line(e)}); "
                 f"continuing with local logs in {Path(plan.run_dir) / 'metrics.jsonl'}")
            return None
        if plan.wandb == "offline":
            print(f"W&B: offline run in {Path(run.dir).parent}; {upload(plan)}", flush=True)
        else:
            print(f"W&B: {run.url}", flush=True)
        return cls(plan, run, say)

    def call(self, fn: Callable, step: int) -> bool:
        """fn(the W&B run), if it still runs; whether it went through. Its service process can die under the run
        (a signal to every process of a job, as Slurm's preemption sends, ends it too): then the run goes on
        without W&B."""
        if not self.run:
            return False
        try:
            fn(self.run)
            return True
        except Exception as e:
            self.run = None
            try:  # what is left of it, and its exit hook, which would print the same failure again at exit
                import wandb

                wandb.teardown(exit_code=1)
            except Exception:
                pass
            warn(f"W&B stopped at step {step} ({type(e).__name__}: {first_line(e)}): training goes on without it; "
                 f"metrics.jsonl keeps every record")
            return False

    def log(self, step: int, values: dict) -> None:
        self.call(lambda run: run.log(values, step=step), step)

    def event(self, step: int, name: str, values: dict) -> None:
        self.call(lambda run: run.summary.update({f"{name}/{k}": v for k, v in values.items()}), step)

    def text(self, step: int, name: str, text: str) -> None:
        """A W&B table of every step's text so far."""
        import wandb

        self.texts.setdefault(name, []).append([step, text])
        table = wandb.Table(columns=["step", "text"], data=self.texts[name])
        self.call(lambda run: run.log({name: table}, step=step), step)

    def classes(self, step: int, record: dict) -> None:
        import wandb

        from ..runs import pictures

        rows = [[name, *(record[k][i] for k in pictures.SCORES)] for i, name in enumerate(record["names"])]
        table = wandb.Table(columns=["class", *pictures.SCORES], data=rows)
        self.call(lambda run: run.log({"test/classes": table}, step=step), step)

    def image(self, step: int, name: str, path: Path) -> None:
        import wandb

        self.call(lambda run: run.log({name: wandb.Image(str(path))}, step=step), step)

    def close(self, step: int, ok: bool) -> None:
        if self.call(lambda run: run.finish(exit_code=0 if ok else 1), step) and self.plan.wandb == "offline":
            self.say(f"W&B: {upload(self.plan)}")  # at the end, where a requeued job's log is read


def upload(plan: Plan) -> str:
    """How to upload an offline run: every start of it (a resume or a requeue makes a folder each) with one
    command, which wandb syncs as one run in the order they started and skips the starts it synced before."""
    starts = len(list((Path(plan.run_dir) / "wandb").glob(f"offline-run-*-{plan.wandb_id}")))
    return (f"upload {'all ' + str(starts) + ' starts of ' if starts > 1 else ''}this run with "
            f"`wandb sync {shlex.quote(str(Path(plan.run_dir) / 'wandb'))}`")
