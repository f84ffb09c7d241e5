"""Batches for every rank: the same global batches whatever the number of processes.

A batch is a tree: a tensor, or any nesting of tuples, lists, dicts and dataclasses of tensors (other
leaves, strings say, stay on the host). It reaches the device as a tree, pinned and without blocking on a GPU.

Training on a map-style dataset. Each epoch has one permutation of the training set, drawn from (seed,
epoch) and identical on every rank. Optimizer step s uses the global batch order[s*B : (s+1)*B]; its B
samples are cut into `accum` micro-steps × `world` ranks × `micro` samples. The gradient of a step is
therefore the mean over the same B samples on 1 or N processes, with or without accumulation. The last,
incomplete global batch of an epoch is dropped, so every step sees exactly B.

Training on a stream (an IterableDataset). The stream is cut into chunks of `micro` samples in the same
layout: chunk c goes to rank c % W, and there to DataLoader worker (c // W) % workers, so that each optimizer
step takes the stream's next B samples, none twice and none skipped. Every process and worker reads the
stream and keeps its own chunks, so a stream must yield the same samples in the same order wherever it is
read (`set_epoch(epoch)` is called on it first when it has that method: seed any shuffling from it). Only
whole steps are taken: when the stream ends, every rank ends at the same step. A resumed run reads past the
samples that the checkpoint's steps consumed, so it continues with exactly the batches it would have had.

Evaluation. Rank r takes samples r, r+W, r+2W, ...; batches are cut to the rank's own samples before any
model sees them, and every rank runs as many batches as the others (sharded engines run each forward
together): a rank short of one runs sample 0 marked as not real, and its result is thrown away. No sample
is counted twice and none is missed.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from itertools import islice

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, get_worker_info
from torch.utils.data._utils.collate import collate as torch_collate
from torch.utils.data._utils.collate import default_collate_fn_map

from ..errors import RecipeError
from ..text import first_line
from .contract import Splits

# ---------------------------------------------------------------- batches as trees


def tree_map(fn: Callable, tree):
    """`fn` applied to every tensor of a tree, its structure kept; other leaves stay as they are."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, Mapping):
        mapped = {k: tree_map(fn, v) for k, v in tree.items()}
        return mapped if type(tree) is dict else _rebuilt(tree, mapped)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a namedtuple
        return type(tree)(*(tree_map(fn, v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, v) for v in tree)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return dataclasses.replace(tree, **{f.name: tree_map(fn, getattr(tree, f.name))
                                            for f in dataclasses.fields(tree) if f.init})
    return tree


def _rebuilt(original: Mapping, mapped: dict):
    try:
        return type(original)(mapped)
    except TypeError:  # a mapping that cannot be built from a dict
        return mapped


def walk(tree) -> Iterator:
    """Every leaf of a tree, tensors and others, in order."""
    if isinstance(tree, Mapping):
        children = tree.values()
    elif isinstance(tree, (tuple, list)):
        children = tree
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        children = (getattr(tree, f.name) for f in dataclasses.fields(tree))
    else:
        yield tree
        return
    for child in children:
        yield from walk(child)


def leaves(tree) -> Iterator[torch.Tensor]:
    """The tensors of a tree, in order."""
    return (leaf for leaf in walk(tree) if isinstance(leaf, torch.Tensor))


def to_device(batch, device: torch.device):
    return tree_map(lambda t: t.to(device, non_blocking=True), batch)


def size(batch) -> int:
    """Samples in a batch: the first dimension of its first tensor."""
    first = next(leaves(batch), None)
    if first is None or first.ndim == 0:
        raise RecipeError(f"a batch must hold tensors with a batch dimension first; this one is {describe(batch)}")
    return first.shape[0]


def describe(tree) -> str:
    """A batch's structure in a few words, for error messages."""
    if isinstance(tree, torch.Tensor):
        return f"a tensor {tuple(tree.shape)}"
    if isinstance(tree, Mapping):
        return f"a {type(tree).__name__} with keys {', '.join(map(str, tree))}"
    if isinstance(tree, (tuple, list)):
        return f"a {type(tree).__name__} of {len(tree)}"
    return f"a {type(tree).__name__}"


def collate(samples: list):
    """torch's default_collate, which also batches dataclasses field by field."""
    kinds = _dataclass_types(samples[0])
    return torch_collate(samples, collate_fn_map={**default_collate_fn_map, **dict.fromkeys(kinds, _dataclasses)})


def _dataclasses(samples: list, *, collate_fn_map):
    first = samples[0]
    return dataclasses.replace(first, **{
        f.name: torch_collate([getattr(s, f.name) for s in samples], collate_fn_map=collate_fn_map)
        for f in dataclasses.fields(first) if f.init})


def _dataclass_types(tree) -> set[type]:
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return {type(tree)}.union(*(_dataclass_types(getattr(tree, f.name)) for f in dataclasses.fields(tree)))
    if isinstance(tree, Mapping):
        return set().union(*(_dataclass_types(v) for v in tree.values()))
    if isinstance(tree, (tuple, list)):
        return set().union(*(_dataclass_types(v) for v in tree))
    return set()


def default_collate(samples: list, split: str):
    """`collate`, with the remedy when samples cannot be stacked (different lengths, say)."""
    try:
        return collate(samples)
    except (RuntimeError, TypeError) as e:
        reason = first_line(e)
        raise RecipeError(f"the {split} split's samples cannot be batched by torch's default_collate ({reason}): "
                          "samples of different shapes need a collate function that pads them, "
                          "Splits(collate_fn=...)") from None


# ---------------------------------------------------------------- datasets


class TensorMap(Dataset):
    """A dict of equal-length tensors as a dataset of dict samples (batched by indexing on the fast path)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


def dataset(split, name: str):
    """A split as data() gave it, checked: a map-style dataset, a stream, or a dict of tensors (→ TensorMap)."""
    if isinstance(split, dict):
        if not split or not all(isinstance(v, torch.Tensor) and v.ndim for v in split.values()):
            raise RecipeError(f"data(): the {name} split is a dict, which must map names to tensors of samples")
        lengths = {k: len(v) for k, v in split.items()}
        if len(set(lengths.values())) > 1:
            raise RecipeError(f"data(): the {name} split's tensors differ in length "
                              f"({', '.join(f'{k} {n}' for k, n in lengths.items())})")
        return TensorMap(split)
    if isinstance(split, IterableDataset):
        return split
    if not (hasattr(split, "__getitem__") and hasattr(split, "__len__")):
        raise RecipeError(f"data(): the {name} split is a {type(split).__name__}; a split is a map-style dataset "
                          "(__len__ and __getitem__), an IterableDataset (train only) or a dict of tensors")
    return split


def indexable(ds) -> bool:
    """Tensors whole in memory: batched by one indexing operation per tensor."""
    return isinstance(ds, (TensorDataset, TensorMap))


def tensors(ds) -> list[torch.Tensor]:
    return list(ds.tensors.values()) if isinstance(ds, TensorMap) else list(ds.tensors)


def take(ds, idx: torch.Tensor):
    """Samples idx of an indexable data set, as one batch: a tuple (TensorDataset) or a dict (TensorMap)."""
    if isinstance(ds, TensorMap):
        return {k: v[idx] for k, v in ds.tensors.items()}
    return tuple(t[idx] for t in ds.tensors)


def place(ds, device: torch.device):
    """An indexable data set on the device when it fits comfortably, else where it is."""
    if device.type == "cpu":
        return ds
    room = sum(t.numel() * t.element_size() for t in tensors(ds))
    free, _ = torch.cuda.mem_get_info(device)
    if room >= free // 4:
        return ds
    if isinstance(ds, TensorMap):
        return TensorMap({k: v.to(device) for k, v in ds.tensors.items()})
    return TensorDataset(*(t.to(device) for t in ds.tensors))


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


def loaders(splits, device: torch.device, workers: int, fast: bool) -> tuple:
    """(train, {"val": ..., "test": ...}) for what data(hp) returned."""
    if not isinstance(splits, Splits):
        raise RecipeError(f"data(hp) returned {describe(splits)}; it returns launcher.Splits(train=..., val=..., "
                          "test=...)")
    evals = {name: loader(ds, name, device, workers, fast, splits.collate_fn)
             for name, ds in (("val", splits.val), ("test", splits.test)) if ds is not None}
    return loader(splits.train, "train", device, workers, fast, splits.collate_fn), evals


def augmenter(augment: Callable | None) -> Callable | None:
    """The recipe's augment as f(batch, epoch) -> batch: called like the batch, augment(x, y) for a pair; with
    epoch=E (the batch's epoch, from 0) when it has a parameter of that name, for augmentations that change from
    epoch to epoch (airbench's flip, which mirrors each image in every other epoch). Its signature is read once."""
    if augment is None:
        return None
    try:
        told = "epoch" in inspect.signature(augment).parameters
    except (TypeError, ValueError):  # a builtin or extension without a signature: called without it
        told = False

    def apply(batch, epoch: int):
        extra = {"epoch": epoch} if told else {}
        return augment(*batch, **extra) if isinstance(batch, (tuple, list)) else augment(batch, **extra)
    return apply


def loader(split, name: str, device: torch.device, workers: int, fast: bool, collate_fn):
    """The batches of one split: a Loader for a map-style dataset, a Stream for an IterableDataset."""
    ds = dataset(split, name)
    if isinstance(collate_fn, dict):
        unknown = set(collate_fn) - {"train", "val", "test"}
        if unknown:
            raise RecipeError(f"data(): Splits(collate_fn=...) names no split {', '.join(sorted(unknown))} "
                              "(train, val, test)")
        collate_fn = collate_fn.get(name)
    fast = fast and collate_fn is None  # a collate function sees the samples one by one
    collate_fn = collate_fn or functools.partial(default_collate, split=name)
    if isinstance(ds, IterableDataset):
        if name != "train":
            raise RecipeError(f"data(): the {name} split is a stream (IterableDataset); evaluation is exact over "
                              "a split of known size: give a map-style dataset")
        return Stream(ds, device, workers, collate_fn)
    return Loader(ds, device, workers, fast, collate_fn)


class Loader:
    """Micro-batches of one map-style split for one rank, on the device. The fast path, for a tensor data set
    (kept whole on the device when it fits: the speed-record CIFAR-10 scripts' way): the permutation is drawn
    there and each batch is one indexing operation, with no DataLoader, workers or copies. A collate function,
    `fast=False` or any other data set takes torch's DataLoader, sample by sample."""

    def __init__(self, ds: Dataset, device: torch.device, workers: int, fast: bool, collate_fn: Callable):
        self.fast = fast and indexable(ds)
        self.ds, self.device, self.workers = place(ds, device) if self.fast else ds, device, workers
        self.collate = collate_fn
        self.size = len(ds)

    def batches(self, index_lists, workers: int | None = None) -> Iterator:
        if self.fast:
            where = tensors(self.ds)[0].device
            moved = where != self.device  # a data set too big for the device: batches go there one by one
            for idx in index_lists:
                found = take(self.ds, idx.to(where))
                yield to_device(found, self.device) if moved else found
            return
        loader = DataLoader(self.ds, batch_sampler=[idx.tolist() for idx in index_lists], collate_fn=self.collate,
                            num_workers=self.workers if workers is None else workers,
                            pin_memory=self.device.type == "cuda")
        try:
            for batch in loader:
                yield to_device(batch, self.device)
        except RecipeError as e:  # raised in a DataLoader worker, it arrives inside that worker's traceback
            raise RecipeError(str(e).strip().splitlines()[-1].split("RecipeError: ", 1)[-1]) from None

    def train_epoch(self, seed: int, epoch: int, start_step: int, steps: int, batch: int, accum: int, world: int,
                    rank: int):
        order = permutation(self.size, seed, epoch)
        if self.fast:
            order = order.to(tensors(self.ds)[0].device)
        return self.batches(list(micro_batches(order, start_step, steps, batch, accum, world, rank)))

    def eval_batches(self, batch: int, world: int, rank: int, limit: int | None = None):
        """(batch, real) for this rank; every rank yields the same number of batches."""
        count = self.eval_count(batch, world)  # batches of the ranks with the most samples
        index_lists = [idx for idx in torch.arange(rank, self.size, world).split(batch) if len(idx)]
        real = len(index_lists)
        index_lists = (index_lists + [torch.zeros(1, dtype=torch.long)] * (count - real))[:limit]
        for i, found in enumerate(self.batches(index_lists)):
            yield found, i < real

    def eval_count(self, batch: int, world: int, limit: int | None = None) -> int:
        """How many batches eval_batches yields."""
        count = math.ceil(math.ceil(self.size / world) / batch)
        return count if limit is None else min(count, limit)

    def sample(self, batches: int, batch: int, seed: int) -> list:
        """A few random batches, drawn from a generator of their own; no DataLoader workers."""
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(seed))[:batches * batch]
        return list(self.batches(list(order.split(batch)), workers=0))


class Stream:
    """Micro-batches of an IterableDataset for one rank (see the module's docstring)."""

    def __init__(self, ds: IterableDataset, device: torch.device, workers: int, collate_fn: Callable):
        self.ds, self.device, self.workers, self.collate = ds, device, workers, collate_fn
        try:
            self.size = len(ds)  # a stream may declare its length; it then has epochs
        except TypeError:
            self.size = None

    def train_epoch(self, seed: int, epoch: int, start_step: int, steps: int, batch: int, accum: int, world: int,
                    rank: int):
        per_step = accum * world
        shard = Shard(self.ds, self.collate, epoch, batch // per_step, world, rank, per_step, start_step * per_step,
                      steps * per_step)
        batches = DataLoader(shard, batch_size=None, num_workers=self.workers, pin_memory=self.device.type == "cuda")
        return (to_device(b, self.device) for b in batches)

    def sample(self, batches: int, batch: int, seed: int) -> list:
        """The stream's first few batches (of epoch 0), the last one perhaps short."""
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(0)
        first = list(islice(self.ds, batches * batch))
        return [to_device(self.collate(first[at:at + batch]), self.device) for at in range(0, len(first), batch)]


class Shard(IterableDataset):
    """One rank's chunks [start, stop) of a stream, each collated into a micro-batch; in a DataLoader worker,
    that worker's share of them. The stream is read a step (`per_step` chunks) at a time."""

    def __init__(self, ds, collate_fn: Callable, epoch: int, micro: int, world: int, rank: int, per_step: int,
                 start: int, stop: int):
        self.ds, self.collate, self.epoch, self.micro, self.world, self.rank = ds, collate_fn, epoch, micro, world, rank
        self.per_step, self.start, self.stop = per_step, start, stop

    def __iter__(self):
        info = get_worker_info()
        workers, me = (info.num_workers, info.id) if info else (1, 0)
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(self.epoch)
        samples, span = iter(self.ds), self.per_step * self.micro
        for first in range(0, self.stop, self.per_step):
            step = list(islice(samples, span))
            if len(step) < span:
                return  # the stream ended: whole steps only, so that every rank stops at the same one
            for c in range(max(first, self.start), first + self.per_step):
                if c % self.world == self.rank and (c - self.start) // self.world % workers == me:
                    at = (c - first) * self.micro
                    yield self.collate(step[at:at + self.micro])
