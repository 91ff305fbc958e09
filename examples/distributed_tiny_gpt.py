"""Train the tiny GPT on CPython's bundled text with several workers.

    torchrun --standalone --nproc-per-node 2 examples/distributed_tiny_gpt.py --policy diloco --sync-every 16
    torchrun --standalone --nproc-per-node 4 examples/distributed_tiny_gpt.py --policy ddp

Each worker reads its own batches; `ddp` averages gradients every step, `local_sgd` and
`diloco` synchronise every `--sync-every` steps. Rank 0 prints the validation loss and
what the step sent (gloo on CPU, NCCL on GPU).
"""

import argparse

import torch
import torch.distributed as dist

import lordo_compile as lc
from lordo_compile.experiment import RunConfig, train_tiny_gpt

parser = argparse.ArgumentParser()
parser.add_argument("--policy", default="diloco", choices=["ddp", "local_sgd", "diloco"])
parser.add_argument("--sync-every", type=int, default=16)
parser.add_argument("--steps", type=int, default=128)
parser.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager"])
args = parser.parse_args()

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
torch.set_num_threads(max(1, torch.get_num_threads() // dist.get_world_size()))
policy = {
    "ddp": lc.Policy.ddp(),
    "local_sgd": lc.Policy.local_sgd(sync_every=args.sync_every),
    "diloco": lc.Policy.diloco(sync_every=args.sync_every),
}[args.policy]
log = print if dist.get_rank() == 0 else None
run = train_tiny_gpt(policy, RunConfig(steps=args.steps, batch_size=8, compiler=args.compiler), log=log)
if dist.get_rank() == 0:
    print(f"workers {dist.get_world_size()}, policy {args.policy}: validation loss {run.val_loss:.3f}")
    print(run.step.comm_report())
dist.destroy_process_group()
