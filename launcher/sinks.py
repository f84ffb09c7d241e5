"""Rank zero's outputs: console (progress bar + summary lines), console.log, metrics.jsonl, summary.json, pictures,
W&B, TensorBoard.

Only global rank 0 ever builds a Sinks. Nothing here is on the per-step path
except `advance`, which tqdm keeps to a time check between redraws.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import stat
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .bars import progress
from .plan import Plan
from .text import first_line


def write_text(path: Path, text: str) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


PENDING = ".config.next.json"  # a start's record until it has begun training: see write_record


def write_record(run_dir: str, record: dict) -> None:
    """The run's record (config.json). A start that continues a run keeps it apart, beside the record of the start
    it continues, until it has begun training (publish_record): a start that fails never replaces the command
    `launch resume` repeats."""
    path = Path(run_dir) / "config.json"
    write_json(path.with_name(PENDING) if path.exists() else path, record)


def publish_record(run_dir: str, **more) -> dict:
    """This start's record becomes the run's, with `more` added (what the data revealed); the record."""
    path = Path(run_dir) / "config.json"
    pending = path.with_name(PENDING)
    config = {**json.loads((pending if pending.exists() else path).read_text()), **more}
    write_json(path, config)
    pending.unlink(missing_ok=True)
    return config


SUMMARY_ORDER = ("state", "reason", "step", "total_steps", "best", "metrics", "train_loss", "samples_per_s", "eta_s",
                 "wall_s", "warnings", "verdict", "started", "updated", "pid", "host", "slurm_job")


def read_summary(run_dir: str) -> dict:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def start_summary(plan: Plan) -> None:
    """Node 0's launcher as a run starts: a new summary, or a resumed run's with this start's facts."""
    earlier = read_summary(plan.run_dir) if plan.resume else {}
    write_json(Path(plan.run_dir) / "summary.json", {
        **earlier, "state": "running", "reason": None, "eta_s": None, "started": time.time(), "wall_s": 0.0,
        "pid": os.getpid(), "host": socket.gethostname(), "slurm_job": slurm_job()})


def slurm_job() -> str | None:
    """The Slurm job this process runs in, as squeue and scancel name it: an array's task as JOB_TASK."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def update_summary(run_dir: str, **fields) -> None:
    """Merge fields into the run's summary.json: how the run stands, for a person or a script, in one small file.
    Rank zero keeps it current while it trains; the launcher of node 0, which alone knows how the job ended,
    writes the last word (the state, and the reason in one line for any but "completed")."""
    summary = {**read_summary(run_dir), **fields, "updated": time.time()}
    if summary.get("started"):
        summary["wall_s"] = round(summary["updated"] - summary["started"], 1)
    ordered = sorted(summary, key=lambda k: SUMMARY_ORDER.index(k) if k in SUMMARY_ORDER else len(SUMMARY_ORDER))
    try:
        write_json(Path(run_dir) / "summary.json", {k: summary[k] for k in ordered})
    except OSError:  # a full disk, a run directory gone: a record never changes how a run ends, nor hides why
        pass


class Console:
    """A standard stream that also appends each line it finishes to the run's console.log, as a terminal ends up
    showing it: a line redrawn with carriage returns (the progress bar) as its last drawing, a bar erased
    before a line (tqdm's write) as nothing. Launch and rank zero each keep one, appending to the same file."""

    def __init__(self, stream, log: Path):
        self.stream, self.pending = stream, ""
        self.fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, text: str) -> int:
        self.pending += text
        if "\n" in self.pending:
            *lines, self.pending = self.pending.split("\n")
            logged = "".join(line.rstrip("\r").rsplit("\r", 1)[-1].rstrip() + "\n" for line in lines)
            try:
                if self.fd is not None:
                    os.write(self.fd, logged.encode())
            except OSError:  # a full disk: the console goes on without its log, and the run with it
                self.fd = None
        cut = self.pending.rstrip("\r").rfind("\r")  # a bar that redraws without end keeps its last drawing alone
        if cut >= 0:
            self.pending = self.pending[cut + 1:]
        return self.stream.write(text)  # last: a terminal that hung up raises here, after the log has the line

    def __getattr__(self, name):  # isatty (tqdm draws on terminals alone), fileno, flush, encoding: the stream's
        return getattr(self.stream, name)


def keep_console(run_dir: str) -> None:
    """From here on this process's output also goes to RUN_DIR/console.log (once per process)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, Console):
            setattr(sys, name, Console(stream, Path(run_dir) / "console.log"))


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

    def close(self, step: int, ok: bool, last: str | None = None) -> None:
        pass


class Sinks:
    """Rank zero's: the console, metrics.jsonl, summary.json, the pictures, W&B and TensorBoard."""

    def __init__(self, plan: Plan, data: dict, total_steps: int, start_step: int = 0):
        config = publish_record(plan.run_dir, data=data)  # training begins: this start's record is the run's
        metrics = Path(plan.run_dir) / "metrics.jsonl"
        if start_step and metrics.exists():
            # resumed: records the crashed or stopped run wrote after its checkpoint will be written again
            lines = metrics.read_text().splitlines(keepends=True)
            write_text(metrics, "".join(line for line in lines if json.loads(line)["step"] <= start_step))
        self.file = open(metrics, "a", buffering=1)
        self.plan = plan
        self.summary = {key: value for key, value in read_summary(plan.run_dir).items()  # an earlier start's
                        if key in ("best", "metrics", "warnings", "verdict")}
        self.summary.setdefault("metrics", {})
        self.summary.setdefault("warnings", [])
        self.summarise(state="running", step=start_step, total_steps=total_steps)
        self.texts: dict[str, list] = {}  # name → [step, text] rows, for W&B tables
        self.wandb = start_wandb(plan, config)
        self.board = None
        if plan.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # resumed: as in metrics.jsonl, what the earlier start wrote after its checkpoint is dropped
            self.board = SummaryWriter(str(Path(plan.run_dir) / "tensorboard"),
                                       purge_step=start_step + 1 if start_step else None)
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

    def progress(self, iterable, what: str, total: int):
        """`iterable` with a bar of its own under the training's, on a terminal alone; erased when it ends."""
        return progress(iterable, what, total, unit="batch")

    def summarise(self, **fields) -> None:
        self.summary.update(fields)
        update_summary(self.plan.run_dir, **self.summary)

    def best(self, metric: str, value: float, step: int) -> None:
        """The recipe's best metric improved (written with the next summary)."""
        self.summary["best"] = {"metric": metric, "value": value, "step": step}

    def log(self, step: int, values: dict, line: str | None = None, eta: float | None = None) -> None:
        """One record at one optimizer step, to every sink; `line` also goes to the console (and the summary is
        brought up to date, with the training's `eta`: at the console's pace, not every step's)."""
        self.file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        if "train/loss" in values:
            self.summary.update(step=step, train_loss=values["train/loss"], samples_per_s=values["samples_per_s"],
                                eta_s=None if eta is None else round(eta, 1))
            if line:
                self.summarise()
        self.to_wandb(lambda run: run.log(values, step=step), step)
        if self.board:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, step)
        if "train/loss" in values:
            self.bar.set_postfix_str(f"loss {values['train/loss']:.4f}", refresh=False)
        if line:
            self.print(line)

    def results(self, step: int, values: dict, line: str | None) -> None:
        """An evaluation's results: a record, and in the summary the latest value of each metric."""
        self.summary["metrics"].update(values)
        self.log(step, values, line)
        self.summarise()

    def event(self, step: int, name: str, values: dict, line: str | None) -> None:
        """Something that happened once (early stopping): a record, a console line, the W&B summary."""
        self.file.write(json.dumps({"step": step, "time": time.time(), "event": name, **values}) + "\n")
        if values.get("warnings"):
            self.summarise(warnings=self.summary["warnings"] + list(values["warnings"]))
        if name == "verdict":
            self.summarise(verdict=values["findings"])
        self.to_wandb(lambda run: run.summary.update({f"{name}/{k}": v for k, v in values.items()}), step)
        if line:
            self.print(line)

    def text(self, step: int, name: str, text: str) -> None:
        """A text the recipe produced (a language model's sample): the console, a record, and a W&B table of
        every step's text so far."""
        self.texts.setdefault(name, []).append([step, text])
        self.file.write(json.dumps({"step": step, "time": time.time(), "event": name, "text": text}) + "\n")
        if self.wandb:
            import wandb

            self.to_wandb(lambda run: run.log({name: wandb.Table(columns=["step", "text"], data=self.texts[name])},
                                              step=step), step)
        if self.board:
            self.board.add_text(name, text, step)
        self.print(f"{name} step {step}: {text}")

    def classes(self, step: int, names: list[str], matrix: list[list[int]], weights_step: int) -> None:
        """The test split's confusion matrix and each class's precision, recall and F1: a record, a W&B table."""
        from . import pictures  # matplotlib: at the end, not in every process's start-up

        scores = pictures.per_class(matrix)
        record = {"names": names, "matrix": matrix, "weights_step": weights_step, **scores}
        self.file.write(json.dumps({"step": step, "time": time.time(), "event": "classes", **record}) + "\n")
        if self.wandb:
            import wandb

            rows = [[name, *(scores[k][i] for k in pictures.SCORES)] for i, name in enumerate(names)]
            self.to_wandb(lambda run: run.log({"test/classes": wandb.Table(columns=["class", *pictures.SCORES],
                                                                           data=rows)}, step=step), step)

    def draw(self, step: int) -> None:
        """The run's pictures, from every record it wrote (an earlier start's too), into RUN_DIR/pictures and W&B.
        A picture that cannot be drawn never changes how the run ends: a warning says why."""
        from . import pictures

        run_dir = Path(self.plan.run_dir)
        try:
            written = pictures.draw_run(run_dir, self.summary.get("best"), self.plan.name)
        except Exception as e:
            warn(f"the run's pictures were not drawn ({type(e).__name__}: {first_line(e)})")
            return
        if self.wandb and written:
            import wandb

            self.to_wandb(lambda run: run.log({f"pictures/{path.stem}": wandb.Image(str(path)) for path in written},
                                              step=step), step)
        if self.board:
            from PIL import Image

            for path in written:
                with Image.open(path) as image:
                    self.board.add_image(f"pictures/{path.stem}", np.asarray(image.convert("RGB")), step,
                                         dataformats="HWC")
        if written:
            self.print(f"pictures: {', '.join(path.name for path in written)} → {run_dir / 'pictures'}")

    def to_wandb(self, call, step: int) -> bool:
        """call(the W&B run), if there is one; whether it went through. W&B never ends a run: its service process
        can die under it (a signal to every process of a job, as Slurm's preemption sends, ends it too), and
        then the run goes on without W&B, as metrics.jsonl keeps every record."""
        if not self.wandb:
            return False
        try:
            call(self.wandb)
            return True
        except Exception as e:
            self.wandb = None
            try:  # what is left of it, and its exit hook, which would print the same failure again at exit
                import wandb

                wandb.teardown(exit_code=1)
            except Exception:
                pass
            warn(f"W&B stopped at step {step} ({type(e).__name__}: {first_line(e)}): training goes on without it; "
                 f"metrics.jsonl keeps every record")
            return False

    def close(self, step: int, ok: bool, last: str | None = None) -> None:
        """The end: the pictures drawn, the `last` line (done: ...) printed, the state written (a failure's and a
        stop's by the launcher) and W&B's run finished."""
        self.bar.close()
        self.file.close()
        if self.plan.pictures:
            self.draw(step)
        if last:
            self.print(last)
        if self.board:
            self.board.close()
        # a failure's reason, or a stop's, is the launcher's to write: it knows what happened on every rank
        self.summarise(step=step, **({"state": "completed", "reason": None} if ok else {}))
        if self.to_wandb(lambda run: run.finish(exit_code=0 if ok else 1), step):
            if self.plan.wandb == "offline":  # at the end, where a requeued job's log is read
                self.print(f"W&B: {upload(self.plan)}")
