"""TensorBoard (--tensorboard): scalars, texts and pictures under RUN_DIR/tensorboard."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Sink


class Board(Sink):
    def __init__(self, run_dir: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # resumed: as in metrics.jsonl, what the earlier start wrote after its checkpoint is dropped
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)

    def text(self, step: int, name: str, text: str) -> None:
        self.writer.add_text(name, text, step)

    def image(self, step: int, name: str, path: Path) -> None:
        from PIL import Image

        with Image.open(path) as image:
            self.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self, step: int, ok: bool) -> None:
        self.writer.close()
