"""The pre-flight's look at the data: the labels' balance, and inputs that splits share, exactly (hashed) or nearly
(neardup.py)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import is_dataclass
from itertools import islice

import numpy as np
import torch

from ..recipe import data
from ..recipe.bars import progress
from . import neardup
from .report import Call, Report, checked

LABEL_SAMPLE = 2_000  # samples read for the class balance when the dataset holds no label tensor
HASH_LIMIT = 200_000  # rows of a tensor data set hashed per split; more are sampled
SAMPLE_HASH_LIMIT = 20_000  # samples of any other dataset (each one read through __getitem__), or of a stream
NEAR_SHARE = 0.01  # near-duplicates of an earlier split's inputs in this share of a split earn a warning
NEAR_EXAMPLES = 20  # (index, index) pairs of each pair of splits kept in the record
IMBALANCE = 3.0  # largest over smallest class count that earns a warning
LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def label_of(batch):
    """The labels in a batch: a pair's second element, or a field named label, labels, target(s) or y."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping):
        return next((batch[k] for k in LABEL_KEYS if k in batch), None)
    if is_dataclass(batch):
        return next((getattr(batch, k) for k in LABEL_KEYS if hasattr(batch, k)), None)
    return None


def labels_of(train, seed: int) -> tuple[torch.Tensor | None, str]:
    """(the training labels, where they came from): a label tensor the dataset holds, else a sample."""
    ds = getattr(train, "ds", None)
    if data.indexable(ds):
        found = ds.tensors[1] if isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) >= 2 \
            else label_of(ds.tensors)
        if found is not None:
            return found, ""
    if getattr(ds, "targets", None) is not None:
        return torch.as_tensor(ds.targets), ""
    batch = train.sample(1, LABEL_SAMPLE, seed)[0]
    found = label_of(batch)
    n = data.size(batch)
    where = f" (the stream's first {n:,})" if train.size is None else f" ({n:,} sampled)" if n < train.size else ""
    return (found if isinstance(found, torch.Tensor) else None), where


def labels(train, calls: list[list[Call]], seed: int, report: Report) -> None:
    y, where = labels_of(train, seed)
    if y is None:
        report.lines.append("labels   none found (a sample's second element, or a field named label, labels, target, "
                            "targets or y): not checked")
        return
    y = y.detach().cpu()
    weighted = any(c.args.get("weight") is not None or c.args.get("pos_weight") is not None
                   for made in calls for c in made)
    if y.is_floating_point():
        if not ((y == 0) | (y == 1)).all():
            report.lines.append(f"labels   real-valued targets {tuple(y.shape[1:])}: no classes to balance")
            return
        positives = y.reshape(len(y), -1).sum(0)
        low = int(torch.minimum(positives, len(y) - positives).min())  # the rarer side of the most uneven label
        classes, high = 2, len(y) - low
        kind = "binary labels" if len(positives) == 1 else f"{len(positives)} binary labels (the most uneven)"
    elif y.ndim == 1:
        counts = torch.bincount(y[y >= 0].long())
        counts = counts[counts > 0]
        classes, low, high = len(counts), int(counts.min()), int(counts.max())
        kind = f"{classes} classes"
    else:
        report.lines.append(f"labels   a label per position {tuple(y.shape[1:])}: class balance not checked")
        return
    ratio = high / low if low else math.inf
    report.values["labels"] = {"classes": classes, "min_count": low, "max_count": high, "imbalance": ratio}
    what = f"{kind}, {low:,} … {high:,} training samples each (imbalance {ratio:.1f}:1){where}"
    report.lines.append(f"labels   {what}{'; the loss weights them' if weighted else ''}")
    if ratio >= IMBALANCE and not weighted:
        report.warnings.append(
            f"the classes are imbalanced ({what}): the model can score well by favouring the large classes; weight "
            "the loss (nn.CrossEntropyLoss(weight=launcher.class_weights(labels))), use a focal loss "
            "(launcher.FocalLoss), or a weighted sampler, and watch per-class metrics")


def inputs_of(sample):
    """What a sample's input is, for telling samples apart: a pair's first element, else the whole sample."""
    return sample[0] if isinstance(sample, (tuple, list)) and len(sample) >= 2 else sample


def digest(tree) -> bytes:
    """A sample's content as 16 bytes: its tensors' and arrays' bytes, and every other leaf's repr."""
    h = hashlib.blake2b(digest_size=16)
    for leaf in data.walk(tree):
        if isinstance(leaf, torch.Tensor):
            leaf = leaf.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(leaf.tobytes() if isinstance(leaf, np.ndarray) else repr(leaf).encode())
    return h.digest()


def fingerprints(loader, seed: int, name: str) -> tuple[set[bytes], str, torch.Tensor | None, torch.Tensor]:
    """(hashes of the split's inputs, how many were hashed, the inputs as one tensor where they stack (for the
    near-duplicate search), their indices in the split), reading a sample of a split too big to read whole."""
    ds = loader.ds
    if loader.size is None:  # a stream: its first samples
        inputs = [inputs_of(sample) for sample in islice(ds, SAMPLE_HASH_LIMIT)]
        return ({digest(x) for x in inputs}, f"the stream's first {len(inputs):,}", stacked(inputs),
                torch.arange(len(inputs)))
    n = loader.size
    limit = HASH_LIMIT if data.indexable(ds) else SAMPLE_HASH_LIMIT
    index = torch.arange(n) if n <= limit else torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]
    shown = f"{n:,}" if n <= limit else f"{limit:,} of {n:,} sampled"
    what = f"pre-flight: hashing {name}"
    if data.indexable(ds):
        columns = data.tensors(ds)
        labelled = isinstance(ds, torch.utils.data.TensorDataset) and len(columns) >= 2
        picked = [t if n <= limit else t[index.to(t.device)] for t in (columns[:1] if labelled else columns)]
        rows = [t.detach().cpu().contiguous().reshape(len(index), -1).view(torch.uint8).numpy() for t in picked]
        hashes = {hashlib.blake2b(b"".join(r[i].tobytes() for r in rows), digest_size=16).digest()
                  for i in progress(range(len(index)), what, unit="sample")}
        return hashes, shown, picked[0] if labelled else None, index
    inputs = [inputs_of(ds[i]) for i in progress(index.tolist(), what, unit="sample")]
    return {digest(x) for x in inputs}, shown, stacked(inputs), index


def stacked(inputs: list) -> torch.Tensor | None:
    """The samples' inputs as one tensor, where they are tensors of one shape."""
    if inputs and all(isinstance(x, torch.Tensor) and x.shape == inputs[0].shape for x in inputs):
        return torch.stack(inputs)
    return None


def leakage(splits: dict, seed: int, report: Report) -> None:
    hashed = {name: fingerprints(loader, seed, name) for name, loader in splits.items()}
    if len(hashed) < 2:
        report.lines.append("splits   only a training split: nothing to compare")
        return
    shared = {}
    names = list(hashed)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared[f"{a}/{b}"] = len(hashed[a][0] & hashed[b][0])
    report.values["shared_samples"] = shared
    sizes = " / ".join(f"{name} {n}" for name, (_, n, _, _) in hashed.items())
    if not any(shared.values()):
        report.lines.append(f"splits   no input shared between {', '.join(names)} ({sizes} hashed)")
    else:
        at_least = "at least " if "sampled" in sizes or "stream" in sizes else ""
        what = ", ".join(f"{at_least}{n:,} shared by {pair.replace('/', ' and ')}" for pair, n in shared.items() if n)
        report.lines.append(f"splits   {what} ({sizes} hashed)")
        report.warnings.append(
            f"the same inputs appear in more than one split ({what}): the evaluation scores memorised samples, and "
            "every metric on those splits overstates the model; remove them from the evaluation splits in data()")
    checked(report, "near", lambda: near_duplicates({k: (rows, index) for k, (_, _, rows, index) in hashed.items()},
                                                    seed, report))


def near_duplicates(inputs: dict, seed: int, report: Report) -> None:
    """Each later split's inputs that nearly copy an earlier split's (neardup.py): counted, a few shown, a warning
    where they are NEAR_SHARE of a split or more."""
    rows = {name: r for name, (r, _) in inputs.items() if r is not None}
    if len(rows) < len(inputs):
        report.lines.append("near     not searched: the inputs are not tensors of one shape")
        return
    why = next(filter(None, map(neardup.eligible, rows.values())), None) or (
        None if len({r.shape[1:] for r in rows.values()}) == 1 else "the splits' inputs differ in shape")
    if why:
        report.lines.append(f"near     not searched: {why}")
        return
    names, found = list(rows), {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            hits = neardup.search(rows[a], rows[b], seed)
            found[(a, b)] = [(int(inputs[b][1][x]), int(inputs[a][1][y])) for x, y in hits.tolist()]
    report.values["near_duplicates"] = {f"{a}/{b}": {"count": len(p), "examples": p[:NEAR_EXAMPLES]}
                                        for (a, b), p in found.items()}
    rule = f"cosine ≥ {neardup.NEAR} after centring"
    if not any(found.values()):
        report.lines.append(f"near     no near-duplicates between {', '.join(names)} ({rule})")
        return
    parts = []
    for (a, b), pairs in found.items():
        if pairs:
            shown = ", ".join(f"{b} {x} ≈ {a} {y}" for x, y in pairs[:3]) + (", …" if len(pairs) > 3 else "")
            copy = "nearly copies a" if len(pairs) == 1 else "nearly copy"
            parts.append(f"{len(pairs):,} of the {len(rows[b]):,} {b} inputs {copy} {a} input{'s' * (len(pairs) > 1)}"
                         f" ({shown})")
            if len(pairs) >= NEAR_SHARE * len(rows[b]):
                report.warnings.append(
                    f"{parts[-1]} ({rule}): the same pictures with a little noise or another encoding, and the "
                    f"{b} metrics overstate the model on them; remove them from {b} in data() (metrics.jsonl's "
                    "preflight record lists them)")
    report.lines.append(f"near     {'; '.join(parts)} ({rule})")
