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
from .data import ByteBatches
from .models import MLP, GPTConfig, TinyGPT
from .policy import Policy
from .testing import training_step

POLICIES = {"identity": Policy}


def _policy(name: str) -> Policy:
    if name not in POLICIES:
        raise SystemExit(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    return POLICIES[name]()


@torch.no_grad()
def evaluate(model: TinyGPT, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    losses = [float(model.loss(x, y)) for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    cfg = GPTConfig(block_size=args.seq_len, n_layer=args.layers, d_model=args.width, n_head=args.heads)
    model = TinyGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    data = ByteBatches(block_size=args.seq_len)
    val_batches = data.val_batches(args.batch_size, args.val_batches)
    generator = torch.Generator().manual_seed(args.seed)

    train_step = training_step(model.loss, opt)

    step = api.compile(train_step, _policy(args.policy), compiler=args.compiler)
    print(f"tiny GPT: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(data.train):,} training bytes from pydoc_data.topics, policy {args.policy}, compiler {args.compiler}")
    started = time.perf_counter()
    step_times = []
    loss = float("nan")
    for i in range(args.steps):
        x, y = data.batch(args.batch_size, generator)
        t0 = time.perf_counter()
        loss = float(step(x, y))
        step_times.append(time.perf_counter() - t0)
        schedule.step()
        if i == 0:
            print(f"step    1  loss {loss:.3f}  (capture + compile {step_times[0]:.1f} s)")
        elif (i + 1) % args.log_every == 0 or i + 1 == args.steps:
            print(f"step {i + 1:4d}  loss {loss:.3f}  lr {schedule.get_last_lr()[0]:.2e}")
    val_loss = evaluate(model, val_batches)
    steady = sorted(step_times[1:])[len(step_times[1:]) // 2] if len(step_times) > 1 else float("nan")
    result = {
        "policy": args.policy,
        "train_loss": loss,
        "val_loss": val_loss,
        "val_bits_per_byte": val_loss / math.log(2),
        "step_ms": steady * 1e3,
        "compile_s": step_times[0],
        "total_s": time.perf_counter() - started,
    }
    print()
    print(f"{'policy':<10} {'val loss':>9} {'bits/byte':>10} {'step ms':>8} {'compile s':>10} {'total s':>8}")
    print(f"{result['policy']:<10} {val_loss:9.3f} {result['val_bits_per_byte']:10.3f} "
          f"{result['step_ms']:8.1f} {result['compile_s']:10.1f} {result['total_s']:8.1f}")
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
    t.add_argument("--policy", default="identity", choices=sorted(POLICIES))
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--layers", type=int, default=4)
    t.add_argument("--width", type=int, default=128)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--warmup", type=int, default=30)
    t.add_argument("--val-batches", type=int, default=8)
    t.add_argument("--log-every", type=int, default=25)
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
