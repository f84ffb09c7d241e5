"""The reference: a careful hand-written PyTorch loop over the benchmark recipe's model and data.

    python benchmarks/handwritten.py STEPS LOG_EVERY                      # one process
    torchrun --nproc-per-node 2 benchmarks/handwritten.py STEPS LOG_EVERY  # DDP over gloo

AdamW (decay on matrices only) with warm-up + cosine, gradient clipping at 1.0, a fresh permutation each epoch,
batches cut by indexing, the loss summed on the device and read every LOG_EVERY steps.
Prints one JSON line (rank 0): the wall-clock time of the first optimizer step and the
seconds of each LOG_EVERY-step window.
"""

import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlp  # noqa: E402

steps, log_every = int(sys.argv[1]), int(sys.argv[2])
world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
if world > 1:
    dist.init_process_group("gloo")

hp = mlp.Hparams()
torch.manual_seed(0)
x, y = mlp.data(hp).train.tensors
model = mlp.model(hp)
params = list(model.parameters())
if world > 1:
    model = torch.nn.parallel.DistributedDataParallel(model)
loss_fn = mlp.loss(hp)
opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
                         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=hp.lr)
warm = round(hp.warmup * steps)
sched = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))))

micro = hp.batch_size // world
step, first, windows = 0, None, []
loss_sum = torch.zeros(())
start = time.perf_counter()
for epoch in range(math.ceil(steps / (len(y) // hp.batch_size))):
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
    for i in range(len(y) // hp.batch_size):
        idx = order[i * hp.batch_size + rank * micro: i * hp.batch_size + (rank + 1) * micro]
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        step += 1
        if first is None:
            first = time.time()
        if step % log_every == 0:
            loss_sum.item()
            loss_sum.zero_()
            now = time.perf_counter()
            windows.append(now - start)
            start = now
        if step == steps:
            break
    if step == steps:
        break
if rank == 0:
    print(json.dumps({"first_step": first, "windows": windows}))
if world > 1:
    dist.barrier()  # nobody tears the group down while a peer still talks
    dist.destroy_process_group()
