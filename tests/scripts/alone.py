"""A script that ignores the environment the launcher gives: it never joins a process group, so each process
trains on its own."""

import torch

model = torch.nn.Linear(2, 1)
print("trained", model(torch.ones(1, 2)).shape)
