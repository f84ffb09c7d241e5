"""The reference: a careful hand-written PyTorch loop over a recipe's model, data, loss and optimizer.

    python benchmarks/handwritten.py RECIPE STEPS LOG_EVERY [--clip-grad C] [--device cuda] [name=value ...]
    torchrun --nproc-per-node 2 benchmarks/handwritten.py benchmarks/mlp.py STEPS LOG_EVERY  # DDP over gloo

What the launcher does per step, written out: a fresh permutation each epoch, batches cut by indexing (a
tensor data set) or collated sample by sample (any other: nanoGPT's loop reads its windows the same way),
the recipe's augmentation, forward and loss (the recipe's step where it has one), backward, optional
clipping, the recipe's optimizer and schedule (AdamW with warm-up + cosine where it has none), the loss
summed on the device and read every LOG_EVERY steps. With --device cuda, the model, a tensor data set and the
permutations live on the GPU (as the launcher's device-data path keeps them); other batches are copied there.
name=value pairs override the recipe's hyperparameters. Prints one JSON line (rank 0): the wall-clock
time of the first optimizer step and the seconds of each LOG_EVERY-step window.
benchmarks/lm_speed.py imports `Loop` to run the same step beside the launcher's in one process.
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import time
from types import ModuleType

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map
from torch.utils.data import TensorDataset, default_collate

from launcher.recipe.optim import default_optimizer


def load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("recipe", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


class Loop:
    """The recipe's model, data and optimizer, and one training step over them."""

    def __init__(self, recipe: ModuleType, hp, steps: int, world: int, clip_grad: float, device: str = "cpu"):
        self.recipe, self.hp, self.clip_grad, self.device = recipe, hp, clip_grad, torch.device(device)
        torch.manual_seed(0)
        self.splits = recipe.data(hp)
        self.train = self.splits.train
        if isinstance(self.train, TensorDataset):
            self.train = TensorDataset(*(t.to(self.device) for t in self.train.tensors))
        self.model = recipe.model(hp).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt, self.sched = getattr(recipe, "optimizer", default_optimizer)(self.model, hp, steps)
        if world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(self.model)
        self.loss_fn = recipe.loss(hp) if hasattr(recipe, "loss") else None

    def batch_of(self, idx: torch.Tensor):
        if isinstance(self.train, TensorDataset):
            return tuple(t[idx] for t in self.train.tensors)
        batch = default_collate([self.train[i] for i in idx.tolist()])
        return batch if self.device.type == "cpu" else tree_map(lambda t: t.to(self.device, non_blocking=True), batch)

    def loss_of(self, batch) -> torch.Tensor:
        if not hasattr(self.recipe, "step"):
            xb, yb = batch
            return self.loss_fn(self.model(xb), yb)
        out = self.recipe.step(self.model, batch, self.hp)
        return out["loss"] if isinstance(out, dict) else out[0] if isinstance(out, tuple) else out

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        batch = self.batch_of(idx)
        if self.splits.augment:
            batch = self.splits.augment(*batch)
        loss = self.loss_of(batch)
        loss.backward()
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("steps", type=int)
    ap.add_argument("log_every", type=int)
    ap.add_argument("--clip-grad", type=float, default=0.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("overrides", nargs="*", metavar="name=value")
    args = ap.parse_args()
    recipe = load(args.recipe)
    hp = recipe.Hparams()
    for pair in args.overrides:
        name, value = pair.split("=", 1)
        hp = dataclasses.replace(hp, **{name: type(getattr(hp, name))(value)})

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    loop = Loop(recipe, hp, args.steps, world, args.clip_grad, args.device)
    steps_per_epoch, micro = len(loop.train) // hp.batch_size, hp.batch_size // world
    step, first, windows = 0, None, []
    loss_sum = torch.zeros((), device=loop.device)
    start = time.perf_counter()
    for epoch in range(math.ceil(args.steps / steps_per_epoch)):
        order = torch.randperm(len(loop.train), generator=torch.Generator().manual_seed(epoch)).to(loop.device)
        for i in range(steps_per_epoch):
            loss_sum += loop.step(order[i * hp.batch_size + rank * micro: i * hp.batch_size + (rank + 1) * micro])
            step += 1
            if first is None:
                first = time.time()
            if step % args.log_every == 0:
                loss_sum.item()
                loss_sum.zero_()
                now = time.perf_counter()
                windows.append(now - start)
                start = now
            if step == args.steps:
                break
        if step == args.steps:
            break
    if rank == 0:
        print(json.dumps({"first_step": first, "windows": windows}))
    if world > 1:
        dist.barrier()  # nobody tears the group down while a peer still talks
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
