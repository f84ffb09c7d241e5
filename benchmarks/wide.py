"""A wide MLP for benchmarks/memory.py: Ψ ≈ 16.8 M parameters in four 2048×2048 layers, little else.

With --report DIR each process writes report-<rank>.json: its resident memory when the model is about
to be built (after torch, DeepSpeed and the process group), the highest resident memory seen in a
forward once training has settled (from the third training step on: optimizer state exists), and the
process's peak (initialisation included).
"""

import atexit
import ctypes
import json
import os
import resource
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from launcher import Splits

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402,F401  imported before the baseline, so that every engine's figure leaves it out


@dataclass
class Hparams:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    width: int = 2048
    depth: int = 4
    report: str = ""


def resident() -> int:
    """Bytes resident now, after handing freed heap back to the system."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Wide(nn.Sequential):
    def __init__(self, hp: Hparams):
        super().__init__(*[m for _ in range(hp.depth) for m in (nn.Linear(hp.width, hp.width), nn.ReLU())],
                         nn.Linear(hp.width, 10))
        self.calls, self.steady = 0, 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 2:
            self.steady = max(self.steady, resident())
        return super().forward(x)


def data(hp: Hparams) -> Splits:
    g = torch.Generator().manual_seed(0)
    n = hp.batch_size * 8
    x, y = torch.randn(n, hp.width, generator=g), torch.randint(0, 10, (n,), generator=g)
    return Splits(train=TensorDataset(x, y))


def model(hp: Hparams) -> nn.Module:
    baseline = resident()
    m = Wide(hp)
    params = sum(p.numel() for p in m.parameters())
    if hp.report:
        def report():
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            path = Path(hp.report) / f"report-{os.environ.get('RANK', '0')}.json"
            path.write_text(json.dumps({"baseline": baseline, "steady": m.steady, "peak": peak, "params": params}))

        atexit.register(report)
    return m


def loss(hp: Hparams):
    return nn.CrossEntropyLoss()
