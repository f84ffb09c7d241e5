"""Each process of a training script (`launch [flags] SCRIPT [its arguments]`), started by torch's agent as
`python -P -m launcher.processes.script SCRIPT ARGS`: the script runs as `python SCRIPT ARGS` runs it (`__main__`, its
arguments in sys.argv, its folder first on sys.path), with these things added. The process dies with its
launcher, as a recipe's does; rank 0's output joins RUN_DIR/console.log. An exception goes to torch's error file
alone, from which the launcher shows the root cause once. And rank 0 says so when the script never joined a
process group of all the processes started: each would have trained a model of its own on all the data, the
classic silent failure of a multi-process launch.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import traceback
from datetime import timedelta
from pathlib import Path

from ..plan import PARENT_ENV, Plan
from ..runs.files import keep_console
from .leave import die_with, leave


def main() -> None:
    die_with(int(os.environ.get(PARENT_ENV, "0")), signal.SIGKILL)
    plan = Plan.from_env()
    if os.environ.get("RANK") == "0":  # its output is the console's, whose log it joins
        keep_console(plan.run_dir)
    stop = os.environ.get("LAUNCH_STOP_SIGNAL", "TERM")
    if stop != "TERM":  # the batch script's tasks ignore --script-signal on its way here: the script's to handle
        signal.signal(getattr(signal, f"SIG{stop}"), signal.SIG_DFL)
    script, *args = sys.argv[1:]
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    # a script trains with torch: importing it first costs nothing, and lets the process groups be seen
    import torch.distributed as dist

    sizes, timeout = [], timedelta(seconds=plan.timeout)
    for module in (dist, dist.distributed_c10d):
        module.init_process_group = _noting(module.init_process_group, sizes, timeout)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # sys.exit(0) ends as the script's end does; any other code is the script's exit code
        if e.code not in (None, 0):
            raise
    except Exception as e:  # not SystemExit: a script's sys.exit(code) is its exit code
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if not error_file:
            raise
        _record(e, str(Path(script).resolve()), error_file)  # the launcher prints it, once for the job
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if dist.is_initialized():
        sizes.append(dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("RANK") == "0" and world > 1 and world not in sizes:
        joined = f"joined a process group of {max(sizes)}" if sizes else "never joined a process group"
        print(f"launch: warning: {Path(script).name} {joined}, though {world} processes were started: each trained "
              f"on its own, as {world} separate runs (call torch.distributed.init_process_group() or use "
              "Accelerate's Accelerator(), which read the environment the launcher gives)", file=sys.stderr,
              flush=True)
    # the script's exit handlers run; the interpreter's teardown of torch does not, where a store's or process
    # group's thread still joinable at exit aborted a finished rank now and then ("terminate called without an
    # active exception", SIGABRT)
    leave(0)


def _record(e: Exception, script: str, error_file: str) -> None:
    """The exception as a recipe's worker records it (worker.record), its traceback from the script's first frame
    on; a collective that timed out, or a peer gone, is marked as following another rank's failure."""
    from .worker import record

    tb = e.__traceback__
    while tb and tb.tb_frame.f_code.co_filename != script:  # this module's frames and runpy's
        tb = tb.tb_next
    record(e, error_file, "".join(traceback.format_exception(type(e), e, tb or e.__traceback__)))


def _noting(init, sizes: list[int], timeout: timedelta):
    """init_process_group, noting the size of each group joined. Its collectives time out after --timeout unless
    the script gives a timeout of its own; joined through env:// (the default), its keys go under this restart
    attempt's own prefix in the launcher's store, as a recipe's do (engines/group.py)."""
    def init_process_group(*args, **kwargs):
        import torch.distributed as dist

        from ..engines.group import attempt_store

        if len(args) < 3:
            kwargs.setdefault("timeout", timeout)
        if len(args) < 2 and kwargs.get("init_method") in (None, "env://") and kwargs.get("store") is None:
            world = int(os.environ["WORLD_SIZE"])
            kwargs.update(init_method=None, rank=int(os.environ["RANK"]), world_size=world,
                          store=attempt_store(world, kwargs["timeout"] or dist.constants.default_pg_timeout))
        result = init(*args, **kwargs)
        sizes.append(dist.get_world_size())
        return result

    return init_process_group


if __name__ == "__main__":
    main()
