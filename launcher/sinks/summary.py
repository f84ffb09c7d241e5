"""summary.json as rank zero keeps it while it trains: the step, the latest loss and throughput, the ETA, the
best metric, the latest evaluation, warnings and the verdict (the launcher of node 0 writes the last word)."""

from __future__ import annotations

from ..runs.files import read_summary, update_summary
from .base import Sink


class Summary(Sink):
    def __init__(self, run_dir: str, total_steps: int, start_step: int):
        self.run_dir = run_dir
        self.fields = {key: value for key, value in read_summary(run_dir).items()  # an earlier start's
                       if key in ("best", "metrics", "warnings", "verdict")}
        self.fields.setdefault("metrics", {})
        self.fields.setdefault("warnings", [])
        self.write(state="running", step=start_step, total_steps=total_steps)

    def write(self, **fields) -> None:
        self.fields.update(fields)
        update_summary(self.run_dir, **self.fields)

    def trained(self, step: int, values: dict, eta: float | None, write: bool) -> None:
        """A training record; written when `write` (at the console's pace)."""
        self.fields.update(step=step, train_loss=values["train/loss"], samples_per_s=values["samples_per_s"],
                           eta_s=None if eta is None else round(eta, 1))
        if write:
            self.write()

    def results(self, values: dict) -> None:
        self.fields["metrics"].update(values)
        self.write()

    def best(self, metric: str, value: float, step: int) -> None:
        """Kept for the next write."""
        self.fields["best"] = {"metric": metric, "value": value, "step": step}

    def event(self, step: int, name: str, values: dict) -> None:
        if values.get("warnings"):
            self.write(warnings=self.fields["warnings"] + list(values["warnings"]))
        if name == "verdict":
            self.write(verdict=values["findings"])

    def close(self, step: int, ok: bool) -> None:
        # a failure's reason, or a stop's, is the launcher's to write: it knows what happened on every rank
        self.write(step=step, **({"state": "completed", "reason": None} if ok else {}))
