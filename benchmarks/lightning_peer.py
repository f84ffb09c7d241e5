"""The peer: PyTorch Lightning's Trainer on the same recipe model, data, loss and optimizer as
benchmarks/handwritten.py, in Lightning's own way (a DataLoader, the Trainer's loop and clipping).

    pip install -e '.[bench]'    # lightning, pinned
    python benchmarks/lightning_peer.py RECIPE STEPS LOG_EVERY [--clip-grad C]

Progress bar, logger, checkpoints and model summary off: only the loop is measured. Prints one JSON line:
the seconds of each LOG_EVERY-step window, each ending with the loss read back, as the other loops do.
"""

import argparse
import importlib.util
import json
import time

import lightning as L
import torch
from torch.utils.data import DataLoader

from launcher.recipe.optim import default_optimizer

ap = argparse.ArgumentParser()
ap.add_argument("recipe")
ap.add_argument("steps", type=int)
ap.add_argument("log_every", type=int)
ap.add_argument("--clip-grad", type=float, default=0.0)
args = ap.parse_args()
spec = importlib.util.spec_from_file_location("recipe", args.recipe)
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
hp = recipe.Hparams()


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net, self.loss_fn = recipe.model(hp), recipe.loss(hp)
        self.loss_sum, self.windows, self.start = torch.zeros(()), [], None

    def training_step(self, batch, i):
        loss = self.loss_fn(self.net(batch[0]), batch[1])
        self.loss_sum += loss.detach()
        return loss

    def on_train_start(self):
        self.start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, i):
        if self.global_step % args.log_every == 0:
            self.loss_sum.item()
            self.loss_sum.zero_()
            now = time.perf_counter()
            self.windows.append(now - self.start)
            self.start = now

    def configure_optimizers(self):
        opt, sched = getattr(recipe, "optimizer", default_optimizer)(self.net, hp, args.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


torch.manual_seed(0)
module = Module()
loader = DataLoader(recipe.data(hp).train, batch_size=hp.batch_size, shuffle=True, drop_last=True)
trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, gradient_clip_val=args.clip_grad or None,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, loader)
print(json.dumps({"windows": module.windows}))
