"""Near-duplicates between two sets of inputs (images, features), in time linear in their size.

Two inputs are near-duplicates when, each less its own mean, their cosine is at least NEAR: the same picture
with a little noise, another JPEG encoding, or a brightness or contrast change. Each input's signs against
TABLES × BITS random hyperplanes (locality-sensitive hashing) put it in one bucket per table; inputs that
share a bucket in any table are candidates, the candidates whose signs differ in few of all the hyperplanes are
compared exactly. A pair at cosine 0.99 (an angle of 0.14 rad) agrees on all 16 signs of a table with
probability (1 - 0.14/π)^16 ≈ 0.48, so one of 8 tables finds it with probability 0.995; two unrelated inputs
share a bucket with probability 2^-16 per table. What it misses, by design: the same picture shifted, cropped,
flipped or resized (the pixels no longer line up), and near-duplicates within one split.
"""

from __future__ import annotations

import math

import torch

NEAR = 0.99
BITS, TABLES = 16, 8
CAP = 32  # candidates per input and table: a crowded bucket (plain backgrounds) gives its first CAP
HAMMING = 24  # of the 128 signs at most this many may differ before the exact comparison (about 6 at NEAR)
CHUNK = 4096  # inputs per matrix product, to bound memory


def eligible(rows: torch.Tensor) -> str | None:
    """Why these inputs cannot be compared this way, or None: real values, or uint8 pictures."""
    if rows.is_floating_point() or (rows.dtype == torch.uint8 and rows.ndim >= 3):
        return None if rows[0].numel() >= 16 else f"inputs of {rows[0].numel()} values are too small to compare"
    return f"{str(rows.dtype).removeprefix('torch.')} inputs (indices, not values)"


def centred(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each input flattened, less its mean, of unit length; and whether it varies at all."""
    x = rows.reshape(len(rows), -1).float()
    x = x - x.mean(1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True)
    return x / norm.clamp_min(1e-12), norm.squeeze(1) > 1e-6 * math.sqrt(x.shape[1])


def signs(rows: torch.Tensor, planes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(TABLES × BITS signs per input, whether it varies), CHUNK inputs at a time."""
    out, varies = [], []
    for at in range(0, len(rows), CHUNK):
        unit, ok = centred(rows[at:at + CHUNK])
        out.append(unit @ planes > 0)
        varies.append(ok)
    return torch.cat(out), torch.cat(varies)


def search(a: torch.Tensor, b: torch.Tensor, seed: int) -> torch.Tensor:
    """(row of b, row of a) for each b that is a near-duplicate of some a without being equal to it (exact copies
    are the hash check's), sorted by b; one a per b."""
    planes = torch.randn(a[0].numel(), TABLES * BITS, generator=torch.Generator().manual_seed(seed)).to(a.device)
    sa, va = signs(a, planes)
    sb, vb = signs(b, planes)
    weights = 2 ** torch.arange(BITS, device=a.device)
    ka, kb = ((s.reshape(len(s), TABLES, BITS).long() * weights).sum(-1) for s in (sa, sb))
    pairs = []
    for t in range(TABLES):
        keys, order = ka[:, t].sort()
        query = kb[:, t].contiguous()
        low = torch.searchsorted(keys, query)
        many = (torch.searchsorted(keys, query, right=True) - low).clamp_max(CAP) * vb
        which = torch.repeat_interleave(torch.arange(len(b), device=a.device), many)
        offset = torch.arange(len(which), device=a.device) - torch.repeat_interleave(many.cumsum(0) - many, many)
        pairs.append(which * len(a) + order[torch.repeat_interleave(low, many) + offset])
    flat = torch.unique(torch.cat(pairs))
    ib, ia = flat // len(a), flat % len(a)
    close = va[ia] & ((sa[ia] != sb[ib]).sum(1) <= HAMMING)
    ib, ia = ib[close], ia[close]
    found = []
    for at in range(0, len(ib), CHUNK):
        x, y = ib[at:at + CHUNK], ia[at:at + CHUNK]
        cos = (centred(b[x])[0] * centred(a[y])[0]).sum(1)
        equal = (b[x].reshape(len(x), -1) == a[y].reshape(len(y), -1)).all(1)
        keep = (cos >= NEAR) & ~equal
        found.append(torch.stack([x[keep], y[keep]], 1))
    hits = torch.cat(found) if found else torch.zeros(0, 2, dtype=torch.long, device=a.device)
    first = torch.ones(len(hits), dtype=torch.bool, device=a.device)
    first[1:] = hits[1:, 0] != hits[:-1, 0]  # unique() sorted the pairs by b
    return hits[first].cpu()
