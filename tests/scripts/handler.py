"""A script with its own handler of SIGTERM (or --signal), as a preemptible job has: it saves a checkpoint of its
own and exits."""

import argparse
import signal
import sys
import time
from pathlib import Path

import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--saved", required=True)
parser.add_argument("--signal", default="TERM")
args = parser.parse_args()
dist.init_process_group("gloo")


def save(signum, frame):
    Path(f"{args.saved}-{dist.get_rank()}").write_text(signal.Signals(signum).name)
    sys.exit(0)


signal.signal(getattr(signal, f"SIG{args.signal}"), save)
print("training", flush=True)
while True:
    time.sleep(0.1)
