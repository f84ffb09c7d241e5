"""Where a run stands: everything a checkpoint restores besides the engine's state, the random generators and
what the parts keep of their own (the counts' scale, the open log window, the health history)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken
    best: tuple[float, int] | None = None  # the best value of the monitored metric, and its step
    best_val: dict | None = None  # the validation metrics of the best weights, which the test evaluation may use
    bad_evals: int = 0  # evaluations since the best one: what --early-stop counts
    skipped: int = 0  # steps skipped for a non-finite gradient (--skip-nonfinite)
    history: dict = field(default_factory=lambda: {"train": [], "val": []})  # (step, loss) of the whole run
    initial: float | None = None  # the pre-flight's initial loss, where the verdict's curve starts

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's progress; those saved before a field was kept leave it as it is (best_val, history, the
        initial loss)."""
        self.step, self.bad_evals, self.skipped = state["step"], state["bad_evals"], state["skipped"]
        self.best = tuple(state["best"]) if state["best"] else None
        self.best_val = state.get("best_val")
        self.history = state.get("history", self.history)
        self.initial = state.get("initial")
