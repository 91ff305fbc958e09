"""Compressed gossip (DoCoM-SGT) against DDP and LoRDO: bytes per worker and validation loss.

    python -m benchmarks.gossip [--steps 128] [--workers 4] [--rows ...] [--seeds 3] [--lrs ...] [--quick] [--json PATH]

Every row trains the same tiny GPT (AdamW with warmup and cosine decay) for the same steps
on the same paired seeds with `--workers` gloo workers, each on its own batches of
CPython's bundled help text. "ddp" (all-reduce of every gradient) is the baseline every
other row is compared with: DoCoM-SGT on a ring with top-k 1% (AdamW on the tracked
gradient), with and without its momentum ("beta=1": one forward and backward per step),
and LoRDO r=8 (int8 payload every 32 steps); `--rows` adds top-k 0.1%. Every row's peak
learning rate is tuned over the same sweep (`--lrs`, default 1e-3, 3e-3 and 1e-2) on the
tuning seeds. The claim read off each row: worker 0's validation loss (whole held-out
split) is within 1% of DDP's. Figures are worker 0's: the mean over seeds for losses, the
median for step ms. Bytes (the same on every seed) are what each compiled step counts
(`step.comm_report()`): the payload of each collective, and for gossip the buffer sent to
each neighbour. The wire column estimates what ring algorithms move per worker for the
collectives (all-reduce 2(K-1)/K of its payload, all-gather (K-1) times it); gossip's
point-to-point messages are on the wire as counted. "val loss avg" is the loss of the
average of the workers' parameters (taken once, after training, for evaluation only, and
not counted in the bytes). `--quick`: DoCoM 1% against DDP only, 16 steps, 2 workers,
2 seeds, no tuning.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.distributed as dist

import lordo_compile as lc
from lordo_compile.data import ByteBatches
from lordo_compile.experiment import RunConfig, evaluate, train_tiny_gpt
from lordo_compile.launch import run_workers
from lordo_compile.models import TinyGPT
from lordo_compile.runtime.comm import CommReport

from . import harness
from .harness import Config

POLICIES = {
    "ddp": lambda: lc.Policy.ddp(),
    "docom 1%": lambda: lc.Policy.docom(ratio=0.01),
    "docom 1% beta=1": lambda: lc.Policy.docom(ratio=0.01, beta=1.0),
    "docom 0.1%": lambda: lc.Policy.docom(ratio=0.001),
    "lordo r=8": lambda: lc.Policy.lordo(rank=8),
}
DEFAULT_ROWS = ["docom 1%", "docom 1% beta=1", "lordo r=8"]
LR = 3e-3


def _wire_bytes(report: CommReport, world: int) -> int:
    factors = {"all_reduce": 2 * (world - 1) / world, "all_gather_into_tensor": world - 1, "neighbour_exchange": 1}
    total = 0.0
    for graph, collectives in report.per_graph.items():
        for collective in collectives:
            total += factors[collective.op] * collective.payload_bytes * report.calls.get(graph, 0)
    return round(total)


def worker(rank: int, world: int, policy: lc.Policy, config: RunConfig) -> dict:
    result = train_tiny_gpt(policy, config)
    with torch.no_grad():
        for p in result.model.parameters():
            dist.all_reduce(p.data)
            p.data /= world
    report = result.step.comm_report()
    usual = max(set(result.graphs), key=result.graphs.count)
    val_split = ByteBatches(block_size=config.seq_len).val_split(config.batch_size)
    return {"val_loss": result.val_loss, "val_loss_average": evaluate(result.model, val_split),
            "bytes_per_worker": report.bytes_sent, "wire_bytes_per_worker": _wire_bytes(report, world),
            "step_ms": result.median_ms(usual)}  # median over the steps of the run's most frequent graph


def run(config: Config, seed: int, args: argparse.Namespace) -> dict:
    run_config = RunConfig(steps=args.steps, batch_size=args.batch, lr=config.options["lr"], seed=seed,
                           val_batches=0, compiler=args.compiler)
    policy = POLICIES[config.options["policy"]]()
    return run_workers(worker, args.workers, timeout=1800, args=(policy, run_config))[0]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="sequences of 128 bytes per worker per step")
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=[p for p in POLICIES if p != "ddp"],
                        help="policies compared with ddp")
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.workers, args.rows = 16, 2, ["docom 1%"]
    seeds, tuning_seeds = harness.seeds_of(args)
    sweep = harness.lr_sweep(args, default=(1e-3, LR, 1e-2))
    configs = [Config("ddp", {"policy": "ddp", "lr": LR}, sweep=sweep)]
    configs += [Config(label, {"policy": label, "lr": LR}, "ddp", sweep) for label in args.rows]
    rows = harness.compare(configs, lambda config, seed: run(config, seed, args), seeds, tuning_seeds)
    for row in rows:
        runs = row["runs"]  # bytes do not depend on the seed
        row.update(bytes_per_worker=runs[0]["bytes_per_worker"], wire_bytes_per_worker=runs[0]["wire_bytes_per_worker"],
                   val_loss_average=statistics.fmean(r["val_loss_average"] for r in runs),
                   step_ms=statistics.median(r["step_ms"] for r in runs))
        row["ratio_vs_ddp"] = rows[0]["bytes_per_worker"] / max(1, row["bytes_per_worker"])
    params = sum(p.numel() for p in TinyGPT().parameters())
    lr = harness.lr_words(sweep, tuning_seeds, LR)
    header = (f"tiny GPT ({params:,} parameters), {args.workers} gloo workers x {args.batch} sequences of 128 bytes, "
              f"{args.steps} steps, AdamW, {lr}, seeds {seeds}, {args.compiler}")
    harness.report(rows, header, [("bytes_per_worker", "bytes/worker", ","),
                                  ("wire_bytes_per_worker", "wire (ring est.)", ","),
                                  ("ratio_vs_ddp", "x fewer vs ddp", ".1f"),
                                  ("val_loss_average", "val loss avg", ".4f"), ("step_ms", "step ms", ".0f")])
    claims = [harness.claim_line(row, "lower", 0.01 * rows[0]["mean"], label=f"{row['config']} within 1% of ddp")
              for row in rows[1:]]
    print("\n".join(claims))
    return harness.save(args.json, header, rows, args, claims=claims,
                        policies={c.name: POLICIES[c.name]().describe() for c in configs})


if __name__ == "__main__":
    main()
