"""Every training process: plan → Accelerator (process group, world-size guard) → recipe → trainer."""

from __future__ import annotations

import os
import sys

import torch

from . import engine, recipe, trainer
from .plan import Plan


def run(plan: Plan) -> dict:
    acc = engine.accelerator(plan)  # joins the process group and checks the world size
    try:
        module = recipe.load(plan.recipe)
        hp = recipe.hparams(module.Hparams, plan.hparams)
        if plan.debug:
            torch.autograd.set_detect_anomaly(True)
        return trainer.Trainer(plan, acc, module, hp).fit()
    finally:
        if torch.distributed.is_initialized():
            # DDP's reducer keeps gloo work objects that hold tensors; left to interpreter shutdown, their
            # destructors abort the process ("terminate called without an active exception"), so free them
            # now: Accelerate holds the prepared model until free_memory(), which also collects the garbage
            acc.free_memory()
            torch.distributed.destroy_process_group()


def main() -> None:
    """Started by the elastic agent. A failure is written to the agent's error file, from which the
    launcher shows the root cause once, instead of every rank printing its own traceback."""
    try:
        run(Plan.from_env())
    except Exception as e:
        if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
            raise
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(e)
        # skip interpreter shutdown: the traceback still holds the process group's objects, whose
        # destructors would abort the process and hide the exit code
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    main()
