"""Data-parallel training with an explicit gradient all-reduce, captured as one graph.

    torchrun --standalone --nproc-per-node 2 examples/ddp_allreduce.py

Each worker sees its own data; gradients are averaged inside the compiled step (gloo on
CPU, NCCL on GPU), so every worker ends with the same parameters.
"""

import torch
import torch.distributed as dist

import lordo_compile as lc
from lordo_compile.data import ByteBatches
from lordo_compile.models import GPTConfig, TinyGPT

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
cfg = GPTConfig(n_layer=2, d_model=64, block_size=64)
model = TinyGPT(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


def train_step(x, y):
    loss = model.loss(x, y)
    loss.backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
    opt.step()
    opt.zero_grad()
    return loss


step = lc.compile(train_step, lc.Policy())
data = ByteBatches(block_size=cfg.block_size)
generator = torch.Generator().manual_seed(rank)
for i in range(60):
    loss = step(*data.batch(8, generator))
    if rank == 0 and i % 20 == 0:
        print(f"step {i:3d}  loss {loss.item():.3f}")

checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
gathered = [torch.zeros_like(checksum) for _ in range(world)]
dist.all_gather(gathered, checksum)
if rank == 0:
    print("workers agree:", all(torch.equal(g, gathered[0]) for g in gathered))
    print(step.explain())
dist.destroy_process_group()
