"""Rank zero's outputs: console (progress bar + summary lines), metrics.jsonl, W&B.

Only global rank 0 ever builds a Sinks. Nothing here is on the per-step path
except `advance`, which tqdm keeps to a time check between redraws.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import stat
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .plan import Plan
from .text import first_line


def write_text(path: Path, text: str) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def detach_terminal() -> None:
    """After a hangup (a closed terminal, dropped ssh) every write to the terminal fails (EIO): what was meant
    for it goes nowhere instead, so that a print cannot kill a run on its way to the checkpoint. The terminal
    is a character device (no longer a tty once hung up); /dev/null, one too, is replaced by itself."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        if stat.S_ISCHR(os.fstat(fd).st_mode):
            os.dup2(null, fd)
    os.close(null)


def warn(text: str) -> None:
    print(f"launch: warning: {text}", file=sys.stderr, flush=True)


def start_wandb(plan: Plan, config: dict):
    """A W&B run, or None with one warning when W&B cannot start: training never depends on it."""
    if plan.wandb == "disabled":
        return None
    try:
        import wandb

        run = wandb.init(
            project=plan.wandb_project,
            entity=plan.wandb_entity,
            name=plan.name,
            dir=plan.run_dir,
            config=config,
            mode=plan.wandb,
            id=plan.wandb_id,
            resume="allow",  # a resumed run continues the same W&B run
            settings=wandb.Settings(init_timeout=30, silent=True, console="off"),
        )
    except Exception as e:
        reason = first_line(e)
        warn(f"W&B could not start ({type(e).__name__}: {reason}); "
             f"continuing with local logs in {Path(plan.run_dir) / 'metrics.jsonl'}")
        return None
    if plan.wandb == "offline":
        print(f"W&B: offline run in {Path(run.dir).parent}; {upload(plan)}", flush=True)
    else:
        print(f"W&B: {run.url}", flush=True)
    return run


def upload(plan: Plan) -> str:
    """How to upload an offline run: every start of it (a resume or a requeue makes a folder each) with one
    command, which wandb syncs as one run in the order they started and skips the starts it synced before."""
    starts = len(list((Path(plan.run_dir) / "wandb").glob(f"offline-run-*-{plan.wandb_id}")))
    return (f"upload {'all ' + str(starts) + ' starts of ' if starts > 1 else ''}this run with "
            f"`wandb sync {shlex.quote(str(Path(plan.run_dir) / 'wandb'))}`")


def terminal_lost(e: OSError) -> None:
    """A console write failed: when the terminal hung up (the launcher's SIGHUP reaches this process a moment
    later), detach from it and go on; any other failure stands."""
    if e.errno != errno.EIO:
        raise e
    detach_terminal()


class Silent:
    """The sinks of every rank but zero: the same calls, nothing written, so that the loop needs no rank guards."""

    wandb = None

    def advance(self) -> None:
        pass

    def print(self, text: str) -> None:
        pass

    def log(self, step: int, values: dict, line: str | None = None) -> None:
        pass

    def event(self, step: int, name: str, values: dict, line: str | None) -> None:
        pass

    def text(self, step: int, name: str, text: str) -> None:
        pass

    def close(self, ok: bool) -> None:
        pass


class Sinks:
    """Rank zero's: the console, metrics.jsonl and W&B."""

    def __init__(self, plan: Plan, data: dict, total_steps: int, start_step: int = 0):
        # the launcher wrote config.json; the sizes that data() revealed complete it
        path = Path(plan.run_dir) / "config.json"
        config = {**json.loads(path.read_text()), "data": data}
        write_json(path, config)
        metrics = Path(plan.run_dir) / "metrics.jsonl"
        if start_step and metrics.exists():
            # resumed: records the crashed or stopped run wrote after its checkpoint will be written again
            lines = metrics.read_text().splitlines(keepends=True)
            write_text(metrics, "".join(line for line in lines if json.loads(line)["step"] <= start_step))
        self.file = open(metrics, "a", buffering=1)
        self.plan = plan
        self.texts: dict[str, list] = {}  # name → [step, text] rows, for W&B tables
        self.wandb = start_wandb(plan, config)
        # disable=None: drawn only when stderr is a terminal, never into log files
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=None,
                        leave=False, file=sys.stderr)

    def advance(self) -> None:
        try:
            self.bar.update()
        except OSError as e:
            terminal_lost(e)

    def print(self, text: str) -> None:
        try:
            if self.bar.disable:
                print(text, flush=True)
            else:
                self.bar.write(text, file=sys.stdout)
        except OSError as e:
            terminal_lost(e)

    def log(self, step: int, values: dict, line: str | None = None) -> None:
        """One record at one optimizer step, to every sink; `line` also goes to the console."""
        self.file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        if self.wandb:
            self.wandb.log(values, step=step)
        if "train/loss" in values:
            self.bar.set_postfix_str(f"loss {values['train/loss']:.4f}", refresh=False)
        if line:
            self.print(line)

    def event(self, step: int, name: str, values: dict, line: str | None) -> None:
        """Something that happened once (early stopping): a record, a console line, the W&B summary."""
        self.file.write(json.dumps({"step": step, "time": time.time(), "event": name, **values}) + "\n")
        if self.wandb:
            self.wandb.summary.update({f"{name}/{k}": v for k, v in values.items()})
        if line:
            self.print(line)

    def text(self, step: int, name: str, text: str) -> None:
        """A text the recipe produced (a language model's sample): the console, a record, and a W&B table of
        every step's text so far."""
        self.texts.setdefault(name, []).append([step, text])
        self.file.write(json.dumps({"step": step, "time": time.time(), "event": name, "text": text}) + "\n")
        if self.wandb:
            import wandb

            self.wandb.log({name: wandb.Table(columns=["step", "text"], data=self.texts[name])}, step=step)
        self.print(f"{name} step {step}: {text}")

    def close(self, ok: bool) -> None:
        self.bar.close()
        self.file.close()
        if self.wandb:
            self.wandb.finish(exit_code=0 if ok else 1)
            if self.plan.wandb == "offline":  # at the end, where a requeued job's log is read
                self.print(f"W&B: {upload(self.plan)}")
