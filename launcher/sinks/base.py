"""The one interface of rank zero's outputs: each sink takes what it keeps and ignores the rest."""

from __future__ import annotations

from pathlib import Path


class Sink:
    def log(self, step: int, values: dict) -> None:
        """A record of metrics at one optimizer step."""

    def event(self, step: int, name: str, values: dict) -> None:
        """Something that happened once (the pre-flight, early stopping, the verdict)."""

    def text(self, step: int, name: str, text: str) -> None:
        """A text the recipe produced."""

    def classes(self, step: int, record: dict) -> None:
        """The test split's confusion matrix (names, matrix, weights_step) and per-class scores."""

    def image(self, step: int, name: str, path: Path) -> None:
        """A picture written to `path`."""

    def close(self, step: int, ok: bool) -> None:
        """The run's end in this process; `ok` when training completed."""
