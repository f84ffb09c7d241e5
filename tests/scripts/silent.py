"""A script whose rank 1 goes silent before a collective, as a stuck data loader or a deadlock would leave it."""

import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
if dist.get_rank() == 1:
    time.sleep(600)
dist.all_reduce(torch.ones(1))
