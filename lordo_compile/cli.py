"""`lordo-compile`: train the tiny GPT on CPython's bundled text, or print a step's graphs.

    lordo-compile train [--policy identity|ddp|galore|local_sgd|diloco|lordo|cage|eco] [--workers N]
                        [--steps 400] [--compare A,B,... --plot compare.png]
    lordo-compile inspect --example mlp|gpt [--policy P] [--events sync] [--stage captured]
                          [--format text|dot|svg] [--diff [A,B]]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from . import api
from .experiment import RunConfig, train_tiny_gpt
from .models import MLP, GPTConfig, TinyGPT
from .passes.ema_nesterov import EMANesterov
from .policy import Policy
from .testing import training_step

POLICIES = ("identity", "ddp", "galore", "local_sgd", "diloco", "lordo", "docom", "cage", "eco", "ema_nesterov")


def make_policy(name: str, args: argparse.Namespace) -> Policy:
    if name == "identity":
        return Policy()
    if name == "ddp":
        return Policy.ddp()
    if name == "galore":
        return Policy.galore(rank=args.rank, update_proj_gap=args.update_proj_gap, scale=args.scale,
                             method=args.method, on_refresh=args.on_refresh)
    if name == "local_sgd":
        return Policy.local_sgd(sync_every=args.sync_every)
    if name == "diloco":
        return Policy.diloco(sync_every=args.sync_every)
    if name == "lordo":
        return Policy.lordo(rank=args.rank, sync_every=args.sync_every)
    if name == "docom":
        return Policy.docom()
    if name == "cage":
        return Policy.cage(bits=args.bits, total_steps=args.steps, hadamard=True)
    if name == "ema_nesterov":
        return Policy(ema_nesterov=EMANesterov(warmup_steps=args.steps // 10, decay_start=args.steps * 8 // 10))
    return Policy.eco(format=args.format)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _train_one(name: str, args: argparse.Namespace, config: RunConfig) -> dict:
    policy = make_policy(name, args)
    if policy.on_nonfinite is not None:
        policy = dataclasses.replace(policy, on_nonfinite=None if args.on_nonfinite == "off" else args.on_nonfinite)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if _is_main():
        print(f"{name}: tiny GPT ({args.layers} layers, width {args.width}) on CPython's pydoc_data.topics, "
              f"{world} worker(s), compiler {args.compiler}", flush=True)
    started = time.perf_counter()
    bar = tqdm(total=args.steps, desc=name, disable=not _is_main() or args.no_progress, leave=False)

    def on_step(i: int, loss: float, step: api.CompiledStep) -> None:
        bar.update(1)
        if i % 10 == 0 or i + 1 == args.steps:
            bar.set_postfix(loss=f"{loss:.3f}", sent=_bytes(step.comm_report().bytes_sent))

    result = train_tiny_gpt(policy, config, on_step=on_step)
    bar.close()
    memory = result.step.memory_report()
    return {"policy": name, "val_loss": result.val_loss, "bytes_sent": result.step.comm_report().bytes_sent,
            "state_bytes": memory.weight_bytes + memory.state_bytes_after, "step_ms": result.median_ms(
                max(set(result.graphs), key=result.graphs.count)), "compile_s": result.compile_seconds, "total_s": time.perf_counter() - started,
            "curve": result.curve}


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def train(args: argparse.Namespace) -> list[dict]:
    """Train each policy of --policy / --compare in turn; print the table, write the plot."""
    if args.workers > 1 and "LOCAL_RANK" not in os.environ:
        return _relaunch(args)
    if "LOCAL_RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    names = args.compare.split(",") if args.compare else [args.policy]
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise SystemExit(f"unknown policy {unknown[0]!r} in --compare; choose from {', '.join(POLICIES)}")
    config = RunConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, layers=args.layers,
                       width=args.width, heads=args.heads, lr=args.lr, warmup=args.warmup,
                       val_batches=args.val_batches, seed=args.seed, compiler=args.compiler,
                       eval_every=max(1, args.steps // 8) if args.compare else 0)
    rows = [_train_one(name, args, config) for name in names]
    if _is_main():
        print()
        print(f"{'policy':<10} {'val loss':>9} {'bits/byte':>10} {'sent/worker':>12} {'state B':>12} "
              f"{'step ms':>8} {'compile s':>10} {'total s':>8}")
        for r in rows:
            print(f"{r['policy']:<10} {r['val_loss']:9.3f} {r['val_loss'] / math.log(2):10.3f} "
                  f"{_bytes(r['bytes_sent']):>12} {r['state_bytes']:>12,} {r['step_ms']:8.1f} "
                  f"{r['compile_s']:10.1f} {r['total_s']:8.1f}")
        if args.compare:
            plot_compare(rows, args.plot)
            print(f"plot: {args.plot}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return rows


def _relaunch(args: argparse.Namespace) -> list[dict]:
    """Start `args.workers` processes of this same command through torchrun (gloo on this host)."""
    forwarded = args.argv if args.argv is not None else sys.argv[1:]
    code = subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={args.workers}", "-m", "lordo_compile.cli", *forwarded])
    if code:
        raise SystemExit(code)
    return []


def plot_compare(rows: list[dict], path: str) -> None:
    """Validation loss against steps and against bytes sent per worker, one line per policy."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--compare draws its plot with matplotlib: pip install 'lordo-compile[dev]' or matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_bytes) = plt.subplots(1, 2, figsize=(11, 4.5))
    for row in rows:
        steps, sent, loss = zip(*row["curve"])
        by_step.plot(steps, loss, marker="o", markersize=3, label=row["policy"])
        by_bytes.plot([max(b, 1) for b in sent], loss, marker="o", markersize=3, label=row["policy"])
    by_step.set_xlabel("step")
    by_bytes.set_xlabel("bytes sent per worker (cumulative; 1 = none)")
    by_bytes.set_xscale("log")
    for ax in (by_step, by_bytes):
        ax.set_ylabel("validation loss (nats per byte)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _example_policy(name: str) -> Policy:
    """`name` sized for the inspect examples (the MLP's smallest matrix side is 2)."""
    return make_policy(name, argparse.Namespace(rank=1, update_proj_gap=4, scale=0.25, method="svd",
                                                on_refresh="keep", sync_every=4, bits=4, steps=100,
                                                format="int8"))


def _example_step(name: str, compiler: str, policy: Policy) -> api.CompiledStep:
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

    step = api.compile(train_step, policy, optimizers=[opt], compiler=compiler)
    step(x, y)
    return step


def inspect_command(args: argparse.Namespace) -> None:
    policy = _example_policy(args.policy)
    step = _example_step(args.example, "aot_eager" if args.stage == "aten" else "eager", policy)
    graphs = step.graphs
    name = args.events or ("step" if "step" in graphs else next(iter(graphs)))
    if name not in graphs:
        raise SystemExit(f"no graph for the events {name!r}; this policy has {', '.join(graphs)}")
    stages = graphs[name]
    if args.diff is not None:
        names = [stage for stage in stages if stage not in ("lowered", "aten")]
        before, _, after = (args.diff or f"captured,{names[-1]}").partition(",")
        print(stages.diff(before, after) or f"{before} -> {after}: no change")
        return
    if args.stage not in stages:
        raise SystemExit(f"no stage {args.stage!r}; graph {name!r} has {', '.join(stages)}")
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
    t.add_argument("--compare", metavar="A,B,...", help="train several policies and plot them (--plot)")
    t.add_argument("--plot", default="compare.png", help="with --compare: the PNG to write")
    t.add_argument("--workers", type=int, default=1, help="processes (gloo on this host, through torchrun)")
    t.add_argument("--sync-every", type=int, default=32, help="local_sgd, diloco, lordo: steps between syncs")
    t.add_argument("--bits", type=int, default=4, help="cage: weight bits")
    t.add_argument("--format", default="fp8_e4m3", choices=["fp8_e4m3", "int8", "int4"], help="eco: weight format")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--on-nonfinite", choices=["raise", "skip", "off"], default="raise",
                   help="what a NaN/inf loss or gradient does (checked inside the step; 'off': not checked)")
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--layers", type=int, default=4)
    t.add_argument("--width", type=int, default=128)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--warmup", type=int, default=30)
    t.add_argument("--val-batches", type=int, default=8)
    t.add_argument("--rank", type=int, default=32, help="galore, lordo: rank of the projected moments")
    t.add_argument("--update-proj-gap", type=int, default=100, help="galore: steps between projection refreshes")
    t.add_argument("--scale", type=float, default=0.25, help="galore: scale of the projected update")
    t.add_argument("--method", default="svd", choices=["svd", "randomized", "subspace"])
    t.add_argument("--on-refresh", default="keep", choices=["keep", "reproject", "reset"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager", "eager"])

    i = commands.add_parser("inspect", help="print a compiled example step's graphs")
    i.add_argument("--example", default="mlp", choices=["mlp", "gpt"])
    i.add_argument("--policy", default="identity", choices=POLICIES)
    i.add_argument("--events", help="which graph: the events its steps carry, joined by '+' (default: step, "
                                    "the graph of steps with no event)")
    i.add_argument("--stage", default="captured")
    i.add_argument("--format", default="text", choices=["text", "dot", "svg"])
    i.add_argument("--diff", nargs="?", const="", metavar="BEFORE,AFTER",
                   help="print a unified diff between two stages (alone: captured against the policy's last pass)")

    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "train":
        train(args)
    else:
        inspect_command(args)


if __name__ == "__main__":
    main()
