"""How far seeds alone move the baseline: dense AdamW's final validation loss per learning rate and run length.

    python -m benchmarks.regime [--lrs 5e-4 1e-3 2e-3] [--steps 600 1200] [--seeds 3] [--jobs 2] [--json PATH]

A claim can only be resolved where the baseline's seed spread (largest minus smallest
final validation loss over the seeds) is below the effect it looks for. Every
configuration here is the tiny GPT of `lordo_compile.experiment` (4 layers of width 128,
batches of 16 sequences of 128 bytes, AdamW with 30 warm-up steps and cosine decay to the
run's end), `Policy()`, validated on the whole held-out split; the rows differ in peak
learning rate and steps. Runs go `--jobs` at a time, each in its own process with one
thread (the figures do not depend on it; the wall-clock does). `--quick`: 20 steps, 2 seeds.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import statistics
import time

import torch

import lordo_compile as lc
from lordo_compile.experiment import RunConfig, train_tiny_gpt

from .common import print_table, write_json


def train(steps: int, lr: float, seed: int) -> dict:
    torch.set_num_threads(1)
    started = time.perf_counter()
    result = train_tiny_gpt(lc.Policy(), RunConfig(steps=steps, lr=lr, seed=seed, val_batches=0, compiler="aot_eager"))
    return {"seed": seed, "val_loss": result.val_loss, "wall_s": time.perf_counter() - started}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3])
    parser.add_argument("--steps", type=int, nargs="+", default=[600])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one process and one thread each")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.lrs = [20], 2, args.lrs[:1]
    grid = [(steps, lr) for steps in args.steps for lr in args.lrs]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = {(steps, lr, seed): pool.submit(train, steps, lr, seed)
                   for steps, lr in grid for seed in range(args.seeds)}
        runs = {key: future.result() for key, future in futures.items()}
    rows = []
    for steps, lr in grid:
        values = [runs[steps, lr, seed]["val_loss"] for seed in range(args.seeds)]
        rows.append({"config": f"{steps} steps, lr {lr:g}", "steps": steps, "lr": lr, "values": values,
                     "mean": statistics.fmean(values), "n_seeds": len(values), "seed_spread": max(values) - min(values),
                     "wall_s": statistics.median(runs[steps, lr, seed]["wall_s"] for seed in range(args.seeds)),
                     "runs": [runs[steps, lr, seed] for seed in range(args.seeds)]})
    header = (f"dense AdamW, tiny GPT (4 x 128), batch 16 x 128 bytes, seeds 0..{args.seeds - 1}, whole held-out split, "
              f"aot_eager, {args.jobs} runs at a time, one thread each")
    print(header)
    print_table(rows, [("config", "config", "<"), ("mean", "val loss", ".4f"), ("seed_spread", "seed spread", ".4f"),
                       ("wall_s", "run s", ".0f")])
    best = min(rows, key=lambda row: row["mean"])
    print(f"lowest mean: {best['config']}, seed spread {best['seed_spread']:.4f} nats")
    result = {"header": header, "arguments": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
