"""Step time of `Policy.ddp()` against torch's DistributedDataParallel: tiny GPT, gloo workers.

    python -m benchmarks.ddp_step [--workers 2] [--steps 30] [--warmup 5] [--batch 8] [--quick] [--json PATH]

Every worker builds the same model (seed 0) three times and trains each on its own
batches (seeded by rank), with AdamW:
- "DDP": `DistributedDataParallel(model)` (25 MB buckets, all-reduces issued from autograd
  hooks as buckets fill, overlapped with the rest of the backward), eager fused AdamW;
- "DDP + torch.compile": the same module compiled (`torch.compile(ddp_model.module.loss)`
  under DDP's optimizer, which splits the graph at bucket boundaries) and a compiled
  `opt.step()`;
- "lordo Policy.ddp()": the plain step (no all-reduce in it) compiled with the policy,
  which inserts one all-reduce of every gradient into the one graph, after the backward;
- "lordo, buckets of 25 MiB": the same with `DataParallel(bucket_cap_mb=25)`: DDP's buckets
  (1 MiB first), each all-reduce issued during the backward as soon as its gradients exist.
The timed steps go round robin (one step of each in turn) after `--warmup` untimed
rounds, each call after a barrier so that both workers start it together; rank 0's
times. `ratio_vs_ddp` is lordo's median over DDP's (`buckets_ratio_vs_ddp` the bucketed
row's); `ratio_vs_best_ddp` over the faster DDP
row. One thread per worker (they share this machine's cores with gloo's threads).
`--quick`: a smoke run (a 2-layer GPT of width 32, 4 steps of 2 sequences).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import lordo_compile as lc
from lordo_compile.launch import run_workers
from lordo_compile.models import GPTConfig, TinyGPT
from lordo_compile.testing import training_step

from .common import QUICK_GPT, batches, print_table, timing_arguments, write_json

DDP = "DDP"
COMPILED_DDP = "DDP + torch.compile"
LORDO = "lordo Policy.ddp()"
BUCKETS = "lordo, buckets of 25 MiB"


def _model(cfg: GPTConfig):
    torch.manual_seed(0)
    return TinyGPT(cfg)


def variants(cfg: GPTConfig) -> dict:
    ddp_model = DistributedDataParallel(_model(cfg))
    ddp_opt = torch.optim.AdamW(ddp_model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)

    def ddp_step(x, y):
        # DDP's hooks fire on forward() through the wrapper: the loss is computed from its output.
        loss = torch.nn.functional.cross_entropy(ddp_model(x).flatten(0, 1), y.flatten())
        loss.backward()
        ddp_opt.step()
        ddp_opt.zero_grad()
        return loss.detach()

    compiled_model = DistributedDataParallel(_model(cfg))
    compiled_forward = torch.compile(compiled_model)
    compiled_opt = torch.optim.AdamW(compiled_model.parameters(), lr=1e-3, weight_decay=0.1)

    @torch.compile
    def update():
        compiled_opt.step()

    def compiled_ddp_step(x, y):
        loss = torch.nn.functional.cross_entropy(compiled_forward(x).flatten(0, 1), y.flatten())
        loss.backward()
        update()
        compiled_opt.zero_grad()
        return loss.detach()

    model = _model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    lordo = lc.compile(training_step(model.loss, opt), lc.Policy.ddp())
    bucketed_model = _model(cfg)
    bucketed_opt = torch.optim.AdamW(bucketed_model.parameters(), lr=1e-3, weight_decay=0.1)
    bucketed = lc.compile(training_step(bucketed_model.loss, bucketed_opt),
                          lc.Policy(data_parallel=lc.DataParallel(bucket_cap_mb=25)))
    return {DDP: ddp_step, COMPILED_DDP: compiled_ddp_step, LORDO: lordo, BUCKETS: bucketed}


def worker(rank: int, world: int, steps: int, warmup: int, batch: int, cfg: GPTConfig) -> dict:
    data = batches(cfg, batch, steps + warmup + 1, seed=rank)
    steps_of = variants(cfg)
    first = {}
    for name, step in steps_of.items():
        dist.barrier()
        started = time.perf_counter()
        step(*data[0])
        first[name] = time.perf_counter() - started
    times: dict[str, list[float]] = {name: [] for name in steps_of}
    for i, (x, y) in enumerate(data[1:]):
        for name, step in steps_of.items():
            dist.barrier()
            started = time.perf_counter()
            step(x, y)
            if i >= warmup:
                times[name].append(time.perf_counter() - started)
    return {"ms": {name: statistics.median(t) * 1e3 for name, t in times.items()}, "first_call_s": first}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="sequences per worker")
    timing_arguments(parser, steps=30, warmup=5)
    args = parser.parse_args(argv)
    cfg = GPTConfig()
    if args.quick:
        cfg = QUICK_GPT
        args.steps, args.warmup, args.batch = 4, 1, 2
    results = run_workers(worker, args.workers, timeout=3600, args=(args.steps, args.warmup, args.batch, cfg))
    ms, first = results[0]["ms"], results[0]["first_call_s"]
    best = min((DDP, COMPILED_DDP), key=ms.get)
    rows = [{"variant": name, "ms": ms[name], "ratio": ms[name] / ms[DDP], "first": first[name]} for name in ms]
    print(f"tiny GPT, {args.workers} gloo workers x {args.batch} sequences of {cfg.block_size}, "
          f"1 thread each, median of {args.steps} round-robin steps (rank 0)")
    print_table(rows, [("variant", "variant", "<22"), ("ms", "ms/step", ".1f"), ("ratio", "vs DDP", ".3f"),
                       ("first", "1st call s", ".1f")])
    result = {"ratio_vs_ddp": ms[LORDO] / ms[DDP], "ratio_vs_best_ddp": ms[LORDO] / ms[best], "best_ddp": best,
              "buckets_ratio_vs_ddp": ms[BUCKETS] / ms[DDP],
              "ms": ms, "first_call_s": first, "per_rank_ms": [r["ms"] for r in results],
              "workers": args.workers, "batch_per_worker": [args.batch, cfg.block_size]}
    print(f"lordo Policy.ddp(): {result['ratio_vs_ddp']:.3f}x DDP's step time, "
          f"{result['ratio_vs_best_ddp']:.3f}x the faster DDP ({best})")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
