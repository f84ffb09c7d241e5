"""The failures the launcher tells in plain words: one leaf module, so that the code that raises one and
the code that reports it (processes/worker.py, processes/spawn.py, cli/run.py) need not import each other."""


class UsageError(Exception):
    """Bad input, told before anything starts: one line, exit 2."""


class RecipeError(Exception):
    """A recipe that cannot be used as written; the CLI shows it as one line and exits 2."""


class TrainingError(Exception):
    """A failure the user reads as one plain line (no traceback): what happened and what to do."""


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


class ForeignCheckpoint(CheckpointError):
    """A checkpoint holding what the launcher never wrote there (a file its manifest does not list, a link, code in
    a pickle): refused, and never passed over for an older checkpoint in silence as a damaged one is."""


class Stopped(Exception):
    """Every rank stopped on a signal, after saving a checkpoint."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signum} at step {step}")
        self.signum, self.step = signum, step


# failures that explain themselves in one line; anything else is shown with its traceback
PLAIN = (TrainingError, CheckpointError, RecipeError)
