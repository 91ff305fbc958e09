"""Compressed gossip (DoCoM-SGT) against DDP and LoRDO: bytes per worker and validation loss.

    python -m benchmarks.gossip --json benchmarks/results/gossip.json [--steps 128] [--rows ...] [--quick]

Every row trains the same tiny GPT (same seed, AdamW with warmup and cosine decay) for the
same steps with 4 gloo workers, each on its own batches of CPython's bundled help text:
DDP (all-reduce of every gradient), LoRDO r=8 (defaults: int8 payload every 32 steps), and
DoCoM-SGT on a ring with top-k 1% (defaults, AdamW on the tracked gradient), with and without
its momentum (beta=1: one forward and backward per step); `--rows` adds top-k 0.1%. Bytes are what each
compiled step counts (`step.comm_report()`): the payload of each collective, and for gossip
the buffer sent to each neighbour. The wire column estimates what ring algorithms move per
worker for the collectives (all-reduce 2(K-1)/K of its payload, all-gather (K-1) times it);
gossip's point-to-point messages are on the wire as counted. Validation loss is reported for
worker 0's model as trained and for the average of the 4 workers' parameters (an average
taken once, after training, for evaluation only, and not counted in the bytes).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import lordo_compile as lc
from lordo_compile.data import ByteBatches
from lordo_compile.experiment import RunConfig, evaluate, train_tiny_gpt
from lordo_compile.launch import run_workers
from lordo_compile.models import TinyGPT
from lordo_compile.runtime.comm import CommReport

from .common import print_table, write_json

ROWS = {
    "ddp": lambda: lc.Policy.ddp(),
    "lordo r=8": lambda: lc.Policy.lordo(rank=8),
    "docom 1%": lambda: lc.Policy.docom(ratio=0.01),
    "docom 1% beta=1": lambda: lc.Policy.docom(ratio=0.01, beta=1.0),
    "docom 0.1%": lambda: lc.Policy.docom(ratio=0.001),
}
DEFAULT_ROWS = ["ddp", "lordo r=8", "docom 1%", "docom 1% beta=1"]
COLUMNS = [("label", "policy", "<18"), ("bytes_per_worker", "bytes/worker", ","),
           ("wire_bytes_per_worker", "wire (ring est.)", ","), ("ratio_vs_ddp", "x fewer vs ddp", ".1f"),
           ("val_loss_worker0", "val loss w0", ".3f"), ("val_loss_average", "val loss avg", ".3f"),
           ("median_step_ms", "step ms", ".0f")]  # median over the steps of each row's most frequent phase


def _wire_bytes(report: CommReport, world: int) -> int:
    factors = {"all_reduce": 2 * (world - 1) / world, "all_gather_into_tensor": world - 1, "neighbour_exchange": 1}
    total = 0.0
    for phase, collectives in report.per_phase.items():
        for collective in collectives:
            total += factors[collective.op] * collective.payload_bytes * report.calls.get(phase, 0)
    return round(total)


def worker(rank: int, world: int, label: str, steps: int, batch: int, compiler: str) -> dict:
    config = RunConfig(steps=steps, batch_size=batch, compiler=compiler)
    started = time.perf_counter()
    run = train_tiny_gpt(ROWS[label](), config)
    wall = time.perf_counter() - started
    val_batches = ByteBatches(block_size=config.seq_len).val_batches(config.batch_size, config.val_batches)
    with torch.no_grad():
        for p in run.model.parameters():
            dist.all_reduce(p.data)
            p.data /= world
    report = run.step.comm_report()
    usual = max(set(run.phases), key=run.phases.count)
    return {"val_loss_worker0": run.val_loss, "val_loss_average": evaluate(run.model, val_batches),
            "bytes_per_worker": report.bytes_sent, "wire_bytes_per_worker": _wire_bytes(report, world),
            "per_phase": {p: [(c.op, c.payload_bytes) for c in cs] for p, cs in report.per_phase.items()},
            "calls": dict(report.calls), "state_bytes": run.step.memory_report().state_bytes_after,
            "median_step_ms": run.median_ms(usual), "wall_s": wall}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="sequences of 128 bytes per worker per step")
    parser.add_argument("--compiler", default="aot_eager", choices=["aot_eager", "inductor"])
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS))
    parser.add_argument("--quick", action="store_true", help="16 steps: a smoke run")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    steps = 16 if args.quick else args.steps
    rows = []
    for label in args.rows:
        result = run_workers(worker, args.workers, timeout=1800, args=(label, steps, args.batch, args.compiler))[0]
        rows.append({"label": label, **result})
        print(f"  {label}: val loss {result['val_loss_worker0']:.3f} (worker 0), "
              f"{result['val_loss_average']:.3f} (average), {result['bytes_per_worker']:,} bytes, "
              f"{result['wall_s']:.0f} s", flush=True)
    ddp = next((r for r in rows if r["label"] == "ddp"), None)
    for row in rows:
        if ddp is not None:
            row["ratio_vs_ddp"] = ddp["bytes_per_worker"] / max(1, row["bytes_per_worker"])
    params = sum(p.numel() for p in TinyGPT().parameters())
    header = (f"tiny GPT ({params:,} parameters), {args.workers} gloo workers x {args.batch} sequences of 128 bytes, "
              f"{steps} steps, compiler {args.compiler}")
    print(header)
    print_table(rows, COLUMNS)
    result = {"header": header, "steps": steps, "workers": args.workers, "batch": args.batch,
              "policies": {label: ROWS[label]().describe() for label in args.rows}, "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
