"""Batches for every rank: the same global batches whatever the number of processes.

Training. Each epoch has one permutation of the training set, drawn from (seed,
epoch) and identical on every rank. Optimizer step s uses the global batch
order[s*B : (s+1)*B]; its B samples are cut into `accum` micro-steps × `world`
ranks × `micro` samples. The gradient of a step is therefore the mean over the
same B samples on 1 or N processes, with or without accumulation. The last,
incomplete global batch of an epoch is dropped, so every step sees exactly B.

Evaluation. Rank r takes samples r, r+W, r+2W, ... padded to the same count on
every rank (so that sharded engines run the same number of forward passes); each
batch says how many of its leading samples are real, and only those reach the
metrics. No sample is counted twice and none is missed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset


def permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def micro_batches(order: torch.Tensor, start_step: int, steps: int, batch: int, accum: int, world: int, rank: int):
    """This rank's index lists, in the order the loop consumes them, for steps [start_step, steps)."""
    micro = batch // (accum * world)
    for s in range(start_step, steps):
        for k in range(accum):
            begin = s * batch + (k * world + rank) * micro
            yield order[begin : begin + micro]


def is_tensor_data(ds: Dataset) -> bool:
    return isinstance(ds, TensorDataset) and len(ds.tensors) == 2


def place(ds: TensorDataset, device: torch.device) -> TensorDataset:
    """The tensor data set on the device when it fits comfortably, else where it is."""
    if device.type == "cpu":
        return ds
    size = sum(t.numel() * t.element_size() for t in ds.tensors)
    free, _ = torch.cuda.mem_get_info(device)
    return TensorDataset(*(t.to(device) for t in ds.tensors)) if size < free // 4 else ds


class Loader:
    """Micro-batches of one split for one rank, as (x, y) on the device. The fast path, for a tensor data set
    (kept whole on the device when it fits: the speed-record CIFAR-10 scripts' way): the permutation is drawn
    there and each batch is one indexing operation, with no DataLoader, workers or copies. `fast=False` (or any
    other data set) takes torch's DataLoader, sample by sample."""

    def __init__(self, ds: Dataset, device: torch.device, workers: int, fast: bool = True):
        self.fast = fast and is_tensor_data(ds)
        self.ds, self.device, self.workers = place(ds, device) if self.fast else ds, device, workers

    def __len__(self) -> int:
        return len(self.ds)

    def batches(self, index_lists) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.fast:
            x, y = self.ds.tensors
            if x.device == self.device:  # the common case: cut batches where the data already lives
                for idx in index_lists:
                    yield x[idx], y[idx]
                return
            for idx in index_lists:
                yield x[idx].to(self.device, non_blocking=True), y[idx].to(self.device, non_blocking=True)
            return
        loader = DataLoader(
            self.ds,
            batch_sampler=[idx.tolist() for idx in index_lists],
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_epoch(self, seed: int, epoch: int, start_step: int, steps: int, batch: int, accum: int, world: int,
                    rank: int):
        order = permutation(len(self.ds), seed, epoch)
        if self.fast:
            order = order.to(self.ds.tensors[0].device)
        return self.batches(list(micro_batches(order, start_step, steps, batch, accum, world, rank)))

    def eval_batches(self, batch: int, world: int, rank: int, limit: int | None = None):
        """(x, y, n_real) for this rank; every rank yields the same number of batches."""
        n = len(self.ds)
        mine = torch.arange(rank, n, world)
        per_rank = -(-n // world)
        padded = torch.cat([mine, torch.zeros(per_rank - len(mine), dtype=torch.long)])
        index_lists = list(padded.split(batch))[:limit]
        for i, (x, y) in enumerate(self.batches(index_lists)):
            yield x, y, max(0, min(batch, len(mine) - i * batch))
