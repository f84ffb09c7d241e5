"""The console: the training's progress bar (on a terminal alone) and the lines printed above it."""

from __future__ import annotations

import sys

from tqdm import tqdm

from ..recipe.bars import progress
from ..runs.files import terminal_lost
from .base import Sink


class Console(Sink):
    def __init__(self, total_steps: int, start_step: int):
        # disable=None: drawn only when stderr is a terminal, never into log files
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=None,
                        leave=False, file=sys.stderr)
        if self.bar.disable:  # no terminal: a step has nothing to draw
            self.advance = lambda: None

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
        return progress(iterable, what, total, unit="batch")

    def log(self, step: int, values: dict) -> None:
        if "train/loss" in values:
            self.bar.set_postfix_str(f"loss {values['train/loss']:.4f}", refresh=False)

    def text(self, step: int, name: str, text: str) -> None:
        self.print(f"{name} step {step}: {text}")

    def close(self, step: int, ok: bool) -> None:
        self.bar.close()
