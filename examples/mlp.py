"""The smallest complete use: an MLP, AdamW with two parameter groups, a cosine schedule.

    python examples/mlp.py
"""

import torch
import torch.nn.functional as F

import lordo_compile as lc
from lordo_compile.models import MLP

torch.manual_seed(0)
model = MLP((32, 64, 64, 10))
decay = [p for p in model.parameters() if p.dim() == 2]
no_decay = [p for p in model.parameters() if p.dim() == 1]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-3)
schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200)
teacher = torch.nn.Linear(32, 10)


def train_step(x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


step = lc.compile(train_step, lc.Policy())
for i in range(200):
    x = torch.randn(64, 32)
    y = teacher(x).argmax(dim=1)
    loss = step(x, y)
    schedule.step()
    if i % 50 == 0 or i == 199:
        print(f"step {i:3d}  loss {loss.item():.4f}  lr {schedule.get_last_lr()[0]:.2e}")

print(step.explain())
print(f"recompiles: {step.captures - 1}")
