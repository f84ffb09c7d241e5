"""launcher: run a training recipe in one process or many.

The public API a recipe uses is small: `Splits` (what `data(hp)` returns) and the
optimizer helpers `warmup_cosine` and `param_groups`. Everything else is the CLI's.
"""

from .recipe import Splits

__all__ = ["Splits", "warmup_cosine", "param_groups"]


def __getattr__(name):
    # the optimizer helpers import torch; keep `import launcher` itself instant
    if name in ("warmup_cosine", "param_groups"):
        from . import optim

        return getattr(optim, name)
    raise AttributeError(name)
