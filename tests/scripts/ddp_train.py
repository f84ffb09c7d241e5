"""A plain torchrun-style training script, as teams bring them: DDP over gloo, a DistributedSampler, its own
argparse, training at the top level (no main guard). It knows nothing of the launcher."""

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--note", default="")
parser.add_argument("--crash-rank", type=int, default=-1)
parser.add_argument("--crash-first-start", action="store_true")
args = parser.parse_args()

dist.init_process_group("gloo")
rank = dist.get_rank()
if rank == args.crash_rank:
    raise ValueError(f"planted failure on rank {rank}")
if args.crash_first_start and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and rank == 1:
    raise RuntimeError("planted failure of the first start")
torch.manual_seed(0)
x = torch.randn(96, 4)
y = x @ torch.tensor([1.0, -2.0, 3.0, 0.5]) + 0.1
model = DistributedDataParallel(torch.nn.Linear(4, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
sampler = DistributedSampler(TensorDataset(x, y), shuffle=True, seed=0)
loader = DataLoader(TensorDataset(x, y), batch_size=8, sampler=sampler)
for epoch in range(3):
    sampler.set_epoch(epoch)
    for xb, yb in loader:
        loss = (model(xb).squeeze(1) - yb).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
if rank == 0:
    torch.save(model.module.state_dict(), args.out)
    print(f"world {dist.get_world_size()} note {args.note!r} loss {loss.item():.6f}")
dist.destroy_process_group()
