"""A plain Accelerate training script: an unmodified Accelerator() reads what it runs with from the environment
that `accelerate launch`, or the launcher, gives. It knows nothing of the launcher."""

import argparse

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
args = parser.parse_args()

accelerator = Accelerator()
torch.manual_seed(0)
x = torch.randn(96, 4)
y = x @ torch.tensor([1.0, -2.0, 3.0, 0.5]) + 0.1
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
evaluation = DataLoader(TensorDataset(x[:37], y[:37]), batch_size=8)
model, optimizer, loader, evaluation = accelerator.prepare(model, optimizer, loader, evaluation)
for _ in range(3):
    for xb, yb in loader:
        with accelerator.accumulate(model):
            loss = (model(xb).squeeze(1) - yb).pow(2).mean()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
model.eval()
with torch.no_grad():
    predicted = torch.cat([accelerator.gather_for_metrics(model(xb).squeeze(1)) for xb, _ in evaluation])
if accelerator.is_main_process:
    torch.save(accelerator.unwrap_model(model).state_dict(), args.out)
    print(f"processes {accelerator.num_processes} precision {accelerator.mixed_precision} accumulation "
          f"{accelerator.gradient_accumulation_steps} device {accelerator.device} evaluated {len(predicted)}")
accelerator.end_training()
