"""A bar for a long phase outside the training steps (a recipe decoding its data, an evaluation): drawn on a
terminal alone, by the launcher and rank zero alone, and erased when the phase ends."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def progress(iterable, what: str, total: int | None = None, unit: str = "it"):
    """`iterable`, with a bar while it is consumed: `for image in progress(images, "decoding"): ...`."""
    shown = os.environ.get("RANK", "0") == "0"  # torch's agent numbers its workers; the launcher and --debug: none
    # disable=None: drawn only when stderr is a terminal, never into log files. position=0: over the training's bar
    # (which redraws itself after), not on a line of its own below it, which tqdm reaches with a line feed that
    # console.log would take for the end of a line
    return tqdm(iterable, desc=what, total=total, unit=unit, dynamic_ncols=True, leave=False, file=sys.stderr,
                disable=None if shown else True, position=0)
