"""Stopping together on SIGTERM / SIGINT / SIGHUP.

A signal reaches the ranks at slightly different moments, yet they must all stop, and save, after the
same optimizer step: one rank in a checkpoint barrier while another runs the next backward would hang.
So each step every rank publishes whether it has been signalled, in an all-reduce on a small CPU
(gloo) group that runs in the background, and acts on the previous step's result, which every rank
reads alike. No rank waits for the device, and the stop comes one step after the signal.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from ..runs.files import detach_terminal
from . import hang

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # a closed terminal or dropped ssh: save, as for TERM


class Stop:
    def __init__(self, world: int):
        self.signal = 0
        self.first_at = 0.0
        self._group = dist.new_group(backend="gloo") if world > 1 else None
        self._pending = None
        self._previous = {}

    def __enter__(self) -> Stop:
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if self._pending and exc_type is None:  # after a failure a peer may be gone: never wait for it
            self._pending[0].wait()
        self._pending = None

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGHUP:
            detach_terminal()
        stacks = hang.stalled()
        if stacks:  # no step will come to agree on a stop at, so nothing can be saved: waiting helps no one
            print(f"{signal.Signals(signum).name} while training was stalled (stacks: {stacks}): exiting without a "
                  "checkpoint", file=sys.stderr, flush=True)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)  # dying of the signal, as the agent that sent it expects
        if not self.signal:
            self.signal, self.first_at = signum, time.monotonic()
        elif time.monotonic() - self.first_at > 2:
            # asked twice (the same signal can arrive twice at once, from the terminal and the launcher)
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: not waiting for the checkpoint")

    def agreed(self) -> int:
        """Called once per optimizer step on every rank: the signal all ranks stop for now, or 0."""
        if self._group is None:
            return self.signal
        decided = 0
        if self._pending:
            work, flag = self._pending
            work.wait()
            decided = int(flag.item())
        if decided:
            self._pending = None
            return decided
        flag = torch.tensor([self.signal], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return 0
