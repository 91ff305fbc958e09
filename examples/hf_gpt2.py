"""Train a Hugging Face GPT-2 (small config, random init, no download) with LoRDO's
compiled step, model code unchanged.

    pip install 'lordo-compile[hf]'
    python examples/hf_gpt2.py [--steps 20]          # one process
    torchrun --standalone --nproc-per-node 2 examples/hf_gpt2.py

The batches are CPython's bundled help text, as bytes.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import lordo_compile as lc
from lordo_compile.data import ByteBatches


def build(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)

    def train_step(x):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    return model, opt, train_step


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager"])
    args = parser.parse_args(argv)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    model, opt, train_step = build()
    # GPT-2's c_attn / c_fc / c_proj are Conv1D modules, not nn.Linear: select them by name.
    policy = lc.Policy.lordo(rank=8, sync_every=4, params=r"\.(c_attn|c_fc|c_proj)\.weight$")
    step = lc.compile(train_step, policy, optimizers=[opt], compiler=args.compiler)
    data = ByteBatches(block_size=64)
    generator = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    losses = []
    for i in range(args.steps):
        x, _ = data.batch(4, generator)
        losses.append(float(step(x)))
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; bytes sent per worker {step.comm_report().bytes_sent:,}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
