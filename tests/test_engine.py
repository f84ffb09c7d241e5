"""The engine's per-step operations in one process, where no launch is needed to see them."""

import copy

import torch
from torch import nn

from launcher.engines.ddp import Ddp


def test_the_loss_scaler_path_gives_the_plain_update():
    """The GradScaler branch with fp32 arithmetic: scaled backward over two micro-steps, unscale before
    clipping, step. A power-of-two scale is exact, so the update must equal the unscaled one bit for bit."""
    torch.manual_seed(0)
    plain_model = nn.Linear(8, 3)
    scaled_model = copy.deepcopy(plain_model)
    x, y = torch.randn(2, 4, 8), torch.randint(0, 3, (2, 4))
    norms = []
    for model, scaler in ((plain_model, None), (scaled_model, torch.amp.GradScaler("cpu", init_scale=2.0**12))):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        engine = Ddp(model, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 2, scaler, clip=0.01)
        for k in range(2):
            engine.sync(k == 1)
            engine.backward(nn.functional.cross_entropy(model(x[k]), y[k]))
        norms.append(engine.update())
        assert all(p.grad is None for p in model.parameters())
    assert norms[0] > 0.01 and norms[0] == norms[1]  # logged before clipping, unscaled
    for a, b in zip(plain_model.parameters(), scaled_model.parameters(), strict=True):
        assert torch.equal(a, b)
