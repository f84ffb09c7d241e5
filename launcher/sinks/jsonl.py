"""metrics.jsonl: every record and event of the run, one JSON object a line, each with its step and time."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..runs.files import write_text
from .base import Sink


class MetricsFile(Sink):
    def __init__(self, run_dir: str, start_step: int):
        path = Path(run_dir) / "metrics.jsonl"
        if start_step and path.exists():
            # resumed: records the crashed or stopped run wrote after its checkpoint will be written again
            lines = path.read_text().splitlines(keepends=True)
            write_text(path, "".join(line for line in lines if json.loads(line)["step"] <= start_step))
        self.file = open(path, "a", buffering=1)

    def write(self, step: int, record: dict) -> None:
        self.file.write(json.dumps({"step": step, "time": time.time(), **record}) + "\n")

    def log(self, step: int, values: dict) -> None:
        self.write(step, values)

    def event(self, step: int, name: str, values: dict) -> None:
        self.write(step, {"event": name, **values})

    def text(self, step: int, name: str, text: str) -> None:
        self.write(step, {"event": name, "text": text})

    def classes(self, step: int, record: dict) -> None:
        self.write(step, {"event": "classes", **record})

    def close(self, step: int, ok: bool) -> None:
        self.file.close()
