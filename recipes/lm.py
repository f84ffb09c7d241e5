"""A GPT-style language model on bytes: Tiny Shakespeare by default, any text with --data.

    launch recipes/lm.py --cpu --procs 2                                   # the tiny preset, minutes on a CPU
    launch recipes/lm.py --gpus 8 --size gpt2 --precision bf16 --compile --data /data/books

Tokens are bytes (a vocabulary of 256: no tokenizer file, no download). The text is tokenized once per node
by prepare() into a file of bytes, memory-mapped by every process, so a corpus far larger than memory
trains through the DataLoader; the file sits beside the data and is rebuilt only when a source changes.
Splits are stretches of the token stream: training windows from the start, then validation, then test, so
no training window shares a token position with the other two. Validation reports loss, perplexity and
bits per byte, and after each validation every process samples a continuation of a fixed prompt (rank zero
shows it). The model: token and position embeddings (learned or rotary), pre-norm blocks of causal
scaled_dot_product_attention (the fused kernel on a GPU) and an MLP, the output layer tied to the token
embedding, initialisation scaled by depth; AdamW without decay on norms, biases and embeddings; warm-up
then cosine; gradient clipping at 1.0 unless --clip-grad says otherwise.
"""

import codecs
import gzip
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchmetrics import Metric
from torchmetrics.text import Perplexity

from launcher import Splits, warmup_cosine

EMBEDDED = Path(__file__).parent / "data" / "tinyshakespeare.txt.gz"
PRESETS = {"tiny": {"layers": 4, "heads": 4, "dim": 128, "context": 64},
           "gpt2": {"layers": 12, "heads": 12, "dim": 768, "context": 1024}}  # GPT-2's 124M shape, bytes in
VOCAB = 256
counts = "tokens"  # the step counts tokens: throughput in tokens/s
defaults = {"clip_grad": 1.0}  # the launcher's flags, as this recipe wants them unless given


@dataclass
class Hparams:
    size: Literal["tiny", "gpt2"] = field(default="tiny", metadata={"help": "preset of layers, heads, dim, context"})
    layers: Optional[int] = None  # None: the preset's
    heads: Optional[int] = None
    dim: Optional[int] = None
    context: Optional[int] = None
    positions: Literal["learned", "rotary"] = "learned"
    dropout: float = 0.0
    data: str = field(default="", metadata={"help": "a text file or a folder of .txt files (default: Tiny "
                                                    "Shakespeare, in the repository)"})
    held_out: float = field(default=0.05, metadata={"help": "share of the tokens for validation, and again for test"})
    epochs: int = 5  # the tiny preset: about ten minutes on 2 CPU cores
    batch_size: int = 64  # windows of `context` tokens per optimizer step
    lr: float = 2e-3
    final_lr: float = 0.1  # × lr at the last step
    warmup: float = 0.05
    weight_decay: float = 0.1
    beta2: float = 0.99
    prompt: str = "ROMEO:\n"
    sample_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 40

    def __post_init__(self):
        for name, value in PRESETS[self.size].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.dim % self.heads or (self.positions == "rotary" and self.dim // self.heads % 2):
            raise ValueError(f"--dim {self.dim} must split into --heads {self.heads} equal heads (of an even size "
                             "for rotary positions)")
        if not 0 < self.held_out < 0.5:
            raise ValueError(f"--held-out {self.held_out} must lie between 0 and 0.5")


# ---------------------------------------------------------------- data


def sources(hp: Hparams) -> list[Path]:
    if not hp.data:
        return [EMBEDDED]
    where = Path(hp.data).expanduser()
    if where.is_dir():
        found = sorted(p for p in where.rglob("*.txt") if p.is_file())
        if not found:
            raise ValueError(f"--data {where} holds no .txt file")
        return found
    if not where.is_file():
        raise FileNotFoundError(f"--data {where}: no such file or folder")
    return [where]


def token_file(hp: Hparams) -> Path:
    """The bytes of every source, one file: beside the data, or for the embedded text in ~/.cache/launcher."""
    if not hp.data:
        return Path("~/.cache/launcher/tinyshakespeare.bytes").expanduser()
    where = Path(hp.data).expanduser()
    return where / ".tokens.bytes" if where.is_dir() else where.with_name(where.name + ".tokens")


def tokens(hp: Hparams) -> Path:
    """The token file, built when missing or when a source has changed since (its record says which); read
    and checked as UTF-8 text in chunks, so a corpus need not fit in memory."""
    files, path = sources(hp), token_file(hp)
    record = path.with_name(path.name + ".json")
    stamp = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    if path.exists() and record.exists() and json.loads(record.read_text()) == stamp:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            for p in files:
                text = codecs.getincrementaldecoder("utf-8")()
                with (gzip.open(p) if p.suffix == ".gz" else open(p, "rb")) as f:
                    while chunk := f.read(1 << 24):
                        try:
                            text.decode(chunk)
                        except UnicodeDecodeError:
                            raise ValueError(f"{p} is not UTF-8 text") from None
                        out.write(chunk)
        if tmp.stat().st_size < 100 * PRESETS["tiny"]["context"]:
            raise ValueError(f"{hp.data or EMBEDDED} holds {tmp.stat().st_size} bytes of text: too little to train "
                             "and evaluate on")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)  # atomic: a process reading the old file, or none, never sees half of one
    record.write_text(json.dumps(stamp))
    return path


def prepare(hp: Hparams) -> None:
    """Once per node, before any process starts."""
    tokens(hp)


class Windows(Dataset):
    """Windows of `context` + 1 tokens of a token file's stretch [begin, end), `stride` apart: (input, target),
    the target the input moved by one. The file is memory-mapped in each process that reads it."""

    def __init__(self, path: Path, begin: int, end: int, context: int, stride: int):
        self.path, self.begin, self.context, self.stride = path, begin, context, stride
        self.count = max(0, (end - begin - context - 1) // stride + 1)
        self.ids = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        if self.ids is None:
            self.ids = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = self.begin + i * self.stride
        window = torch.from_numpy(self.ids[start:start + self.context + 1].astype(np.int64))
        return window[:-1], window[1:]


def data(hp: Hparams) -> Splits:
    path = tokens(hp)
    n = path.stat().st_size
    held = int(n * hp.held_out)
    train_end, val_end = n - 2 * held, n - held
    return Splits(train=Windows(path, 0, train_end, hp.context, hp.context),
                  val=Windows(path, train_end, val_end, hp.context, hp.context),
                  test=Windows(path, val_end, n, hp.context, hp.context))


# ---------------------------------------------------------------- model


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotary positions: each pair of channels of a head turned by its position's angle."""
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, hp: Hparams):
        super().__init__()
        self.heads, self.dropout = hp.heads, hp.dropout
        self.qkv = nn.Linear(hp.dim, 3 * hp.dim, bias=False)
        self.out = nn.Linear(hp.dim, hp.dim, bias=False)

    def forward(self, x: torch.Tensor, angles: torch.Tensor | None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if angles is not None:
            q, k = rotate(q, angles[:t]), rotate(k, angles[:t])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, hp: Hparams):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hp.dim), nn.LayerNorm(hp.dim)
        self.attention = Attention(hp)
        self.mlp = nn.Sequential(nn.Linear(hp.dim, 4 * hp.dim, bias=False), nn.GELU(),
                                 nn.Linear(4 * hp.dim, hp.dim, bias=False), nn.Dropout(hp.dropout))

    def forward(self, x: torch.Tensor, angles: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), angles)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, hp: Hparams):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hp.dim)
        self.positions = nn.Embedding(hp.context, hp.dim) if hp.positions == "learned" else None
        if hp.positions == "rotary":
            half = hp.dim // hp.heads // 2
            frequencies = 10000.0 ** (-torch.arange(half) / half)
            self.register_buffer("angles", torch.outer(torch.arange(hp.context), frequencies), persistent=False)
        else:
            self.angles = None
        self.drop = nn.Dropout(hp.dropout)
        self.blocks = nn.ModuleList(Block(hp) for _ in range(hp.layers))
        self.norm = nn.LayerNorm(hp.dim)
        self.head = nn.Linear(hp.dim, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied: one matrix reads and writes tokens
        for name, p in self.named_parameters():
            if p.ndim >= 2:  # residual projections scaled down by depth, so the stream's variance stays put
                deep = name.endswith(("attention.out.weight", "mlp.2.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * hp.layers) if deep else 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.positions is not None:
            x = x + self.positions(torch.arange(ids.shape[1], device=ids.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, self.angles)
        return self.head(self.norm(x))


def model(hp: Hparams) -> nn.Module:
    return GPT(hp)


def step(model: nn.Module, batch, hp: Hparams) -> dict:
    x, y = batch
    logits = model(x)
    return {"loss": F.cross_entropy(logits.flatten(0, 1), y.flatten()), "count": y.numel(), "preds": logits,
            "target": y}


class BitsPerByte(Metric):
    """The cross-entropy over every predicted byte, in bits."""

    def __init__(self):
        super().__init__()
        self.add_state("nats", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bytes", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.nats += F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="sum").double()
        self.bytes += target.numel()

    def compute(self) -> torch.Tensor:
        return self.nats / self.bytes / math.log(2)


def metrics(hp: Hparams) -> dict:
    return {"perplexity": Perplexity(), "bpb": BitsPerByte()}


def optimizer(model: nn.Module, hp: Hparams, total_steps: int):
    """AdamW; weight decay on the matrices of the blocks only, not on norms, biases or embeddings."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not name.startswith(("embed", "positions")) else rest).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=hp.lr, betas=(0.9, hp.beta2))
    return opt, warmup_cosine(opt, total_steps, hp.warmup, hp.final_lr)


@torch.no_grad()
def sample(model: nn.Module, hp: Hparams) -> str:
    """A continuation of the prompt, drawn from a generator of its own: the same text on every process."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.tensor([list(hp.prompt.encode())], device=device)
    for _ in range(hp.sample_tokens):
        logits = model(ids[:, -hp.context:])[0, -1].float() / hp.temperature
        cut = logits.topk(min(hp.top_k, VOCAB)).values[-1]
        probabilities = logits.masked_fill(logits < cut, -math.inf).softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probabilities, 1, generator=generator)[None]], 1)
    return bytes(ids[0].tolist()).decode("utf-8", errors="replace")
