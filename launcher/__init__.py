"""launcher: run a training recipe in one process or many.

The public API a recipe uses is small: `Splits` (what `data(hp)` returns), the
optimizer helpers `warmup_cosine`, `param_groups` (per-layer learning rates) and `freeze`,
and the losses `class_weights` and `FocalLoss`. Everything else is the CLI's.
"""

from .recipe import Splits

__all__ = ["Splits", "warmup_cosine", "param_groups", "freeze", "class_weights", "FocalLoss"]
HELPERS = {"warmup_cosine": "optim", "param_groups": "optim", "freeze": "optim", "class_weights": "losses",
           "FocalLoss": "losses"}


def __getattr__(name):
    # the helpers import torch; keep `import launcher` itself instant
    if name in HELPERS:
        import importlib

        return getattr(importlib.import_module(f".{HELPERS[name]}", __name__), name)
    raise AttributeError(name)
