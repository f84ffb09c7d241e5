"""launcher: run a training recipe in one process or many.

The public API a recipe uses is small: `Splits` (what `data(hp)` returns), the
optimizer helpers `warmup_cosine`, `param_groups` (per-layer learning rates) and `freeze`,
the losses `class_weights` and `FocalLoss`, and `progress` (a bar over a long loop of the
recipe's own, decoding data say). Everything else is the CLI's.
"""

from .recipe.contract import Splits

__all__ = ["Splits", "warmup_cosine", "param_groups", "freeze", "class_weights", "FocalLoss", "progress"]
HELPERS = {"warmup_cosine": "recipe.optim", "param_groups": "recipe.optim", "freeze": "recipe.optim",
           "class_weights": "recipe.losses", "FocalLoss": "recipe.losses", "progress": "recipe.bars"}


def __getattr__(name):
    # the helpers import torch; keep `import launcher` itself instant
    if name in HELPERS:
        import importlib

        return getattr(importlib.import_module(f".{HELPERS[name]}", __name__), name)
    raise AttributeError(name)
