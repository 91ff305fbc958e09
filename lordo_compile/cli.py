"""`lordo-compile`: train the tiny GPT on CPython's bundled text, or print a step's graphs.

    lordo-compile train [--policy identity] [--steps 300]
    lordo-compile inspect --example mlp [--stage captured] [--format text|dot|svg] [--diff A,B]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from . import api
from .experiment import RunConfig, RunResult, train_tiny_gpt
from .models import MLP, GPTConfig, TinyGPT
from .policy import Policy
from .testing import training_step

def make_policy(args: argparse.Namespace) -> Policy:
    if args.policy == "identity":
        return Policy()
    return Policy.galore(rank=args.rank, update_proj_gap=args.update_proj_gap, scale=args.scale,
                         method=args.method, on_refresh=args.on_refresh)


POLICIES = ("identity", "galore")


def train(args: argparse.Namespace) -> RunResult:
    config = RunConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, layers=args.layers,
                       width=args.width, heads=args.heads, lr=args.lr, warmup=args.warmup,
                       val_batches=args.val_batches, seed=args.seed, compiler=args.compiler)
    policy = make_policy(args)
    print(f"tiny GPT ({args.layers} layers, width {args.width}) on CPython's pydoc_data.topics, policy "
          f"{args.policy}, compiler {args.compiler}")
    started = time.perf_counter()
    result = train_tiny_gpt(policy, config, log=print)
    memory = result.step.memory_report()
    print()
    print(f"{'policy':<10} {'val loss':>9} {'bits/byte':>10} {'step ms':>8} {'opt state B':>12} {'compile s':>10} {'total s':>8}")
    print(f"{args.policy:<10} {result.val_loss:9.3f} {result.val_loss / math.log(2):10.3f} {result.median_ms():8.1f} "
          f"{memory.state_bytes_after:>12,} {result.compile_seconds:10.1f} {time.perf_counter() - started:8.1f}")
    return result


def _example_step(name: str, compiler: str) -> api.CompiledStep:
    torch.manual_seed(0)
    if name == "mlp":
        model = MLP((8, 16, 2))
        x, y = torch.randn(4, 8), torch.randn(4, 2)

        def loss_fn(x, y):
            return F.mse_loss(model(x), y)
    else:
        model = TinyGPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=16))
        x = torch.randint(0, 32, (2, 8))
        y = torch.randint(0, 32, (2, 8))
        loss_fn = model.loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    train_step = training_step(loss_fn, opt)

    step = api.compile(train_step, Policy(), optimizers=[opt], compiler=compiler)
    step(x, y)
    return step


def inspect_command(args: argparse.Namespace) -> None:
    step = _example_step(args.example, "aot_eager" if args.stage == "aten" else "eager")
    phases = step.graphs
    if args.phase not in phases:
        raise SystemExit(f"no phase {args.phase!r}; this policy has {', '.join(phases)}")
    stages = phases[args.phase]
    if args.diff:
        before, _, after = args.diff.partition(",")
        print(stages.diff(before, after) or f"{before} -> {after}: no change")
        return
    if args.stage not in stages:
        raise SystemExit(f"no stage {args.stage!r}; phase {args.phase!r} has {', '.join(stages)}")
    view = stages[args.stage]
    if args.format == "text":
        print(view.text, end="")
    elif args.format == "dot":
        print(view.to_dot(), end="")
    else:
        try:
            sys.stdout.write(view.to_svg())
        except ImportError as error:
            raise SystemExit(str(error)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lordo-compile", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    t = commands.add_parser("train", help="train the tiny GPT on CPython's pydoc_data.topics text")
    t.add_argument("--policy", default="identity", choices=POLICIES)
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--layers", type=int, default=4)
    t.add_argument("--width", type=int, default=128)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--warmup", type=int, default=30)
    t.add_argument("--val-batches", type=int, default=8)
    t.add_argument("--rank", type=int, default=32, help="galore: rank of the projected moments")
    t.add_argument("--update-proj-gap", type=int, default=100, help="galore: steps between projection refreshes")
    t.add_argument("--scale", type=float, default=0.25, help="galore: scale of the projected update")
    t.add_argument("--method", default="svd", choices=["svd", "randomized", "subspace"])
    t.add_argument("--on-refresh", default="keep", choices=["keep", "reproject", "reset"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager", "eager"])

    i = commands.add_parser("inspect", help="print a compiled example step's graphs")
    i.add_argument("--example", default="mlp", choices=["mlp", "gpt"])
    i.add_argument("--phase", default="step")
    i.add_argument("--stage", default="captured")
    i.add_argument("--format", default="text", choices=["text", "dot", "svg"])
    i.add_argument("--diff", metavar="BEFORE,AFTER", help="print a unified diff between two stages")

    args = parser.parse_args(argv)
    if args.command == "train":
        train(args)
    else:
        inspect_command(args)


if __name__ == "__main__":
    main()
