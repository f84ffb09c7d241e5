"""Who speaks? Shakespeare's speeches, each a sequence of bytes of its own length, classified by speaker: the
example of a recipe whose samples are dicts, padded batch by batch by a collate function, with a step of its
own.

    launch recipes/speakers.py --cpu --procs 2

Data: the Tiny Shakespeare text that ships with the repository (recipes/data/tinyshakespeare.txt.gz, see
recipes/data/README.md): the speeches of the `speakers` characters who speak most, each kept once (short
ones such as "My lord?" recur), their first 512 bytes. Every tenth speech goes to validation and the next one
to test, so that the three splits cover the plays alike. Model: a bag of embeddings of the bytes and of
hashed byte pairs and triples, averaged over the speech's own length (the padding masked out), then an MLP.
"""

import gzip
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from launcher import Splits

DATA = Path(__file__).parent / "data" / "tinyshakespeare.txt.gz"
LONGEST = 512  # bytes of a speech kept
BUCKETS = 1 << 14  # hashed byte pairs and triples


@dataclass
class Hparams:
    epochs: int = 8
    batch_size: int = 32  # global: speeches per optimizer step, however many processes share them
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: float = 0.05
    speakers: int = 8
    dim: int = 64
    dropout: float = 0.3


best = ("val/acc", "max")


def speeches(hp: Hparams) -> tuple[list[dict], list[str]]:
    """({"ids": bytes as a LongTensor, "label": speaker} in the text's order, the speakers' names)."""
    with gzip.open(DATA, "rt") as f:
        blocks = [block.strip("\n").split("\n") for block in f.read().split("\n\n")]
    said = [(lines[0][:-1], "\n".join(lines[1:])) for lines in blocks if len(lines) > 1 and lines[0].endswith(":")]
    names = [name for name, _ in Counter(name for name, _ in said).most_common(hp.speakers)]
    kept, seen = [], set()
    for name, words in said:
        if name in names and words not in seen:
            seen.add(words)
            kept.append({"ids": torch.tensor(list(words.encode()[:LONGEST])), "label": names.index(name)})
    return kept, names


def pad(samples: list[dict]) -> dict:
    """A batch of speeches: bytes padded with 0 (no text byte is 0) to the longest of the batch, and the mask."""
    ids = nn.utils.rnn.pad_sequence([s["ids"] for s in samples], batch_first=True)
    return {"ids": ids, "mask": ids != 0, "label": torch.tensor([s["label"] for s in samples])}


def data(hp: Hparams) -> Splits:
    kept, _ = speeches(hp)
    val, test = kept[0::10], kept[1::10]
    train = [s for i, s in enumerate(kept) if i % 10 > 1]
    return Splits(train=train, val=val, test=test, collate_fn=pad)


class Bag(nn.Module):
    def __init__(self, hp: Hparams):
        super().__init__()
        self.bytes, self.pairs, self.triples = (nn.Embedding(n, hp.dim) for n in (256, BUCKETS, BUCKETS))
        self.head = nn.Sequential(nn.LayerNorm(hp.dim), nn.Linear(hp.dim, 4 * hp.dim), nn.GELU(),
                                  nn.Dropout(hp.dropout), nn.Linear(4 * hp.dim, hp.speakers))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        one, two = F.pad(ids[:, :-1], (1, 0)), F.pad(ids[:, :-2], (2, 0))  # the byte before, and the one before that
        h = self.bytes(ids) + self.pairs((one * 256 + ids) % BUCKETS) + self.triples((two * 65536 + one * 256 + ids)
                                                                                       % BUCKETS)
        h = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # the mean over the speech's own bytes
        return self.head(h)


def model(hp: Hparams) -> nn.Module:
    return Bag(hp)


def step(model: nn.Module, batch: dict, hp: Hparams) -> dict:
    logits = model(batch["ids"], batch["mask"])
    return {"loss": F.cross_entropy(logits, batch["label"]), "preds": logits, "target": batch["label"]}


def metrics(hp: Hparams) -> dict:
    return {"acc": MulticlassAccuracy(num_classes=hp.speakers, average="micro")}
