"""A small deterministic recipe for the tests: no dropout, no batch norm, no augmentation unless asked.

With --dump-dir, every process writes its parameters at creation (rank<R>-init.pt)
and at exit (rank<R>-final.pt), so tests can compare ranks and runs; under FSDP, its shard; and the epoch that
--noise's augment was told at each call (rank<R>-epochs.pt).

Planted faults, counted in training forward passes (= optimizer steps without accumulation):
--crash-at N makes rank --crash-rank fail at its N-th (once per --dump-dir: a restarted run goes on) in the
way --fault says: raise an exception, hang, or die without a word; --nan-at N turns every rank's output into
NaN at the N-th; --slow S sleeps S seconds in each forward. --plant PATH --plant-at N: at its N-th, rank 0
writes a pickle that would run code (touching DUMP_DIR/pwned) at PATH under --dump-dir, as someone else who can
write into the run directory would, before that forward's --crash-at fault.

Planted faults for the pre-flight checks: --input-scale 1000 (inputs far from unit scale), --leak N (the first
N training samples also in val and test), --imbalance (9:1 labels, two classes), --zero-layer (the first
layer's weights all zero). During training: --activation relu --first-bias -10 (dead ReLUs), a huge --lr,
--shuffle-labels (nothing consistent to learn).
"""

import atexit
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from launcher import Splits, warmup_cosine


@dataclass
class Hparams:
    epochs: int = 2
    batch_size: int = 16
    lr: float = 0.1
    momentum: float = 0.9
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup: float = 0.25
    n_train: int = 96
    n_val: int = 37
    n_test: int = 23
    per_sample: bool = False  # a map-style Dataset through a DataLoader instead of a TensorDataset
    noise: float = 0.0  # augmentation: Gaussian noise on the inputs from the global generator, × (1 + epoch)
    dump_dir: str = ""
    crash_at: int = 0
    crash_rank: int = 1
    fault: Literal["raise", "hang", "die"] = "raise"
    nan_at: int = 0
    slow: float = 0.0
    plant: str = ""
    plant_at: int = 0
    api_token: str = ""  # named like a secret: never written anywhere
    input_scale: float = 1.0
    leak: int = 0
    imbalance: bool = False
    zero_layer: bool = False
    activation: Literal["tanh", "relu"] = "tanh"
    first_bias: float = 0.0  # filled into the first layer's bias when not 0: -10 kills every ReLU
    shuffle_labels: bool = False  # the loss sees the batch's labels in a new random order at every call
    page_faults: bool = False  # model() prints what re-allocating a step's worth of freed memory faults in


class PerSample(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Count(Metric):
    """How many samples reached the metrics: each one exactly once, whatever the number of ranks."""

    def __init__(self):
        super().__init__()
        self.add_state("n", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, out, y):
        self.n += len(y)

    def compute(self):
        return self.n


def data(hp: Hparams) -> Splits:
    g = torch.Generator().manual_seed(1234)
    n = hp.n_train + hp.n_val + hp.n_test
    x = torch.randn(n, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)  # a linear teacher: learnable
    if hp.imbalance:
        y = (x[:, 0] > x[:hp.n_train, 0].quantile(0.9)).long()  # 9:1 in train, still learnable
    x = x * hp.input_scale
    kind = PerSample if hp.per_sample else TensorDataset
    a, b = hp.n_train, hp.n_train + hp.n_val
    for start in (a, b):  # the first training samples again, at the start of val and of test
        x[start:start + hp.leak], y[start:start + hp.leak] = x[:hp.leak], y[:hp.leak]
    return Splits(train=kind(x[:a], y[:a]), val=kind(x[a:b], y[a:b]) if hp.n_val else None,
                  test=kind(x[b:], y[b:]) if hp.n_test else None,
                  augment=noisy(hp) if hp.noise else None)


told_epochs: list[int] = []  # the epoch each call of augment was told; with --dump-dir, rank<R>-epochs.pt


def noisy(hp: Hparams):
    def augment(x, y, epoch):  # the noise grows with the epoch: a resumed run must be told the right one
        told_epochs.append(epoch)
        return x + hp.noise * (1 + epoch) * torch.randn_like(x), y
    return augment


class Exploit:
    """What a crafted checkpoint file holds: unpickled with code allowed, it runs a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Faulty(nn.Sequential):
    def __init__(self, hp: Hparams, *layers):
        super().__init__(*layers)
        self.hp, self.forwards = hp, 0

    def forward(self, x):
        if self.training and torch.is_grad_enabled():  # training steps, not the pre-flight's forwards
            self.forwards += 1
            hp, rank = self.hp, int(os.environ.get("RANK", "0"))
            time.sleep(hp.slow)
            if self.forwards == hp.plant_at and rank == 0:
                torch.save({"optimizer_state_dict": Exploit(Path(hp.dump_dir) / "pwned")}, Path(hp.dump_dir) / hp.plant)
            marker = Path(hp.dump_dir or ".") / "crashed"
            if self.forwards == hp.crash_at and rank == hp.crash_rank and not marker.exists():
                marker.touch()
                if hp.fault == "hang":
                    time.sleep(3600)
                if hp.fault == "die":
                    os._exit(3)
                raise RuntimeError(f"planted crash at forward {self.forwards}")
            if self.forwards == hp.nan_at:
                return super().forward(x) * float("nan")
        return super().forward(x)


def refaulted(rounds: int = 10, blocks: int = 25) -> float:
    """Page faults per page when `blocks` tensors of 4 MiB are allocated, written and all freed, `rounds` times
    over: near 1 when the freed memory goes back to the system each time, near 1/rounds when the process keeps it."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        held = [torch.ones(1 << 20) for _ in range(blocks)]
        del held
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (rounds * blocks * (4 << 20) / 4096)


def model(hp: Hparams) -> nn.Module:
    m = Faulty(hp, nn.Linear(8, 16), nn.Tanh() if hp.activation == "tanh" else nn.ReLU(), nn.Linear(16, 3))
    if hp.page_faults:
        print(f"page faults per page: {refaulted():.2f}", flush=True)
    if hp.zero_layer:
        nn.init.zeros_(m[0].weight)
    if hp.first_bias:
        nn.init.constant_(m[0].bias, hp.first_bias)
    if hp.dump_dir:
        rank = os.environ.get("RANK", "0")

        def dump(tag):
            # sharded engines: this rank's rows (FSDP2 shards along the first dimension)
            state = {k: (v.to_local() if hasattr(v, "to_local") else v).detach().cpu().clone()
                     for k, v in m.state_dict().items()}
            torch.save(state, Path(hp.dump_dir) / f"rank{rank}-{tag}.pt")

        dump("init")
        atexit.register(dump, "final")
        atexit.register(lambda: torch.save(told_epochs, Path(hp.dump_dir) / f"rank{rank}-epochs.pt"))
    return m


def loss(hp: Hparams):
    if hp.shuffle_labels:
        return lambda out, y: nn.functional.cross_entropy(out, y[torch.randperm(len(y), device=y.device)])
    return nn.CrossEntropyLoss()


def metrics(hp: Hparams) -> dict:
    return {"acc": MulticlassAccuracy(num_classes=3, average="micro"), "count": Count()}


def optimizer(model: nn.Module, hp: Hparams, total_steps: int):
    opt = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum)
    if hp.schedule == "constant":
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return opt, warmup_cosine(opt, total_steps, hp.warmup)
