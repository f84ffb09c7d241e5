"""A script written for GPUs alone: it picks its device by LOCAL_RANK and never asks whether there is one."""

import os

import torch

torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
print("on", torch.cuda.current_device())
