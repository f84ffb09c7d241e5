"""A token-tagging recipe for the tests: dict batches of sequences of different lengths, padded by a collate
function, a loss averaged over the tokens that are not padding, and that count returned by the step.

Each sample is {"ids": LongTensor[T], "labels": LongTensor[T], "index": its place in the data}, T from 3 to
12; the label of a token is a function of it and the token before (learnable). Padding ids are 0, padded
labels -100.

--style counts     step() returns {"loss", "count", "preds", "target"}: the loss is exact over tokens
--style pair       step() returns (loss, count), no metrics
--style mean       step() returns the mean over each micro-batch's tokens, no count
--style extras     as counts, and the loss is cross-entropy + 0.1 × a penalty, both returned beside it as
                   "ce" and "aux" (logged as train/ce, val/aux, …)
--style hf         the model computes its own loss from the labels (Hugging Face's convention) and step()
                   returns the model's output as it is, a dict with "loss" and "logits"
--stream           the training split is an IterableDataset (with --length, it declares its length)
--unused           the model holds a head that no step uses
--dump-dir D       every process writes its parameters at exit (rank<R>-final.pt) and the sample indices
                   its training steps saw, micro-batch by micro-batch (rank<R>-seen.pt)
--crash-at N       rank --crash-rank raises at its N-th training forward (once per --dump-dir)
"""

import atexit
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import IterableDataset
from torchmetrics.classification import MulticlassAccuracy

from launcher import Splits

VOCAB, CLASSES, PAD, IGNORE = 16, 4, 0, -100


@dataclass
class Hparams:
    epochs: int = 2
    batch_size: int = 16
    lr: float = 0.5
    n_train: int = 96
    n_val: int = 30
    style: Literal["counts", "pair", "mean", "hf", "extras"] = "counts"
    stream: bool = False
    length: bool = False  # the stream declares its length
    unused: bool = False
    dump_dir: str = ""
    crash_at: int = 0
    crash_rank: int = 1


def _samples(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (int(torch.randint(3, 13, (1,), generator=g)),), generator=g)
        labels = (ids + (torch.cat([ids.new_zeros(1), ids[:-1]]) > VOCAB // 2)) % CLASSES
        out.append({"ids": ids, "labels": labels, "index": i})
    return out


class Stream(IterableDataset):
    """The same samples as the map-style split, in an order drawn from the epoch: what every rank and worker
    reads alike."""

    def __init__(self, items: list[dict], declared: bool):
        self.items, self.declared, self.epoch = items, declared, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(len(self.items), generator=torch.Generator().manual_seed(self.epoch))
        return (self.items[i] for i in order.tolist())

    def __len__(self):
        if not self.declared:
            raise TypeError("a stream without a length")
        return len(self.items)


def pad(samples: list[dict]) -> dict:
    longest = max(len(s["ids"]) for s in samples)
    ids = torch.full((len(samples), longest), PAD)
    labels = torch.full((len(samples), longest), IGNORE)
    for row, s in enumerate(samples):
        ids[row, :len(s["ids"])], labels[row, :len(s["labels"])] = s["ids"], s["labels"]
    return {"ids": ids, "labels": labels, "index": torch.tensor([s["index"] for s in samples])}


def data(hp: Hparams) -> Splits:
    train = _samples(hp.n_train, 0)
    val = [{**s, "index": -1 - i} for i, s in enumerate(_samples(hp.n_val, 1))]
    return Splits(train=Stream(train, hp.length) if hp.stream else train, val=val, collate_fn=pad)


class Tagger(nn.Module):
    def __init__(self, hp: Hparams):
        super().__init__()
        self.hp, self.forwards = hp, 0
        self.embed = nn.Embedding(VOCAB, 16)
        self.mix = nn.Linear(32, 32)
        self.head = nn.Linear(32, CLASSES)
        self.spare = nn.Linear(32, CLASSES) if hp.unused else None

    def forward(self, ids, labels=None, index=None):
        if self.training and torch.is_grad_enabled():
            self.forwards += 1
            seen.append(index.tolist())
            marker = Path(self.hp.dump_dir or ".") / "crashed"
            rank = int(os.environ.get("RANK", "0"))
            if self.forwards == self.hp.crash_at and rank == self.hp.crash_rank and not marker.exists():
                marker.touch()
                raise RuntimeError(f"planted crash at forward {self.forwards}")
        h = self.embed(ids)
        h = torch.cat([h, F.pad(h[:, :-1], (0, 0, 1, 0))], -1)  # each token and the one before
        logits = self.head(torch.tanh(self.mix(h)))
        if labels is None:
            return logits
        return {"loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE), "logits": logits}


seen: list[list[int]] = []


def model(hp: Hparams) -> nn.Module:
    m = Tagger(hp)
    if hp.dump_dir:
        rank = os.environ.get("RANK", "0")

        def dump():
            state = {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
            torch.save(state, Path(hp.dump_dir) / f"rank{rank}-final.pt")
            torch.save(seen, Path(hp.dump_dir) / f"rank{rank}-seen.pt")

        atexit.register(dump)
    return m


def step(model, batch, hp: Hparams):
    if hp.style == "hf":
        return model(**batch)
    logits = model(batch["ids"], index=batch["index"])
    labels = batch["labels"]
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    count = (labels != IGNORE).sum()
    if hp.style == "pair":
        return loss, count
    if hp.style == "mean":
        return loss
    out = {"loss": loss, "count": count, "preds": logits.flatten(0, 1), "target": labels.flatten()}
    if hp.style == "extras":  # the penalty is a mean over the same tokens as the loss
        aux = (logits.pow(2).mean(-1) * (labels != IGNORE)).sum() / count
        out.update(loss=loss + 0.1 * aux, ce=loss, aux=aux)
    return out


def metrics(hp: Hparams) -> dict:
    return {"acc": MulticlassAccuracy(num_classes=CLASSES, average="micro", ignore_index=IGNORE)} \
        if hp.style in ("counts", "extras") else {}


def optimizer(model: nn.Module, hp: Hparams, total_steps: int):
    opt = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=0.9)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
