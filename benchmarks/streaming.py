"""Bytes per sync of streaming DiLoCo (fragments) on the tiny GPT, 2 gloo workers.

    python -m benchmarks.streaming [--fragments 1 2 4 8] [--every 8] [--json PATH]

For each fragment count F: DiLoCo with `fragments=F` runs one period of H steps (every
fragment syncs once), and `step.comm_report()` gives the bytes each sync graph sends per
worker. `peak_sync_bytes` is the largest of them, `peak_vs_whole` its ratio to F = 1's single
sync (the target is about 1/F: fragments are cut at parameter boundaries, so the largest
parameter bounds how even they can be). Measured from the compiled graphs' collectives, not
computed from shapes. aot_eager: bytes do not depend on the code generator.
"""

from __future__ import annotations

import argparse

import torch

import lordo_compile as lc
from lordo_compile.launch import run_workers
from lordo_compile.models import GPTConfig

from .common import batches, gpt_step, print_table, write_json


def one_period(rank: int, world: int, fragments: list[int], every: int) -> list[dict]:
    cfg = GPTConfig()
    rows = []
    for count in fragments:
        torch._dynamo.reset()
        _, _, train_step = gpt_step(cfg)
        step = lc.compile(train_step, lc.Policy.diloco(every, fragments=count), compiler="aot_eager")
        for x, y in batches(cfg, 2, every, seed=rank):
            step(x, y)
        report = step.comm_report()
        syncs = {name: report.graph_bytes(name) for name in report.per_graph if name != "step"}
        rows.append({"fragments": count, "syncs": len(syncs), "peak_sync_bytes": max(syncs.values()),
                     "total_bytes": sum(syncs.values())})
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fragments", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--every", type=int, default=8, help="H, steps between syncs of one fragment")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if 1 not in args.fragments:
        args.fragments = [1, *args.fragments]
    rows = run_workers(one_period, 2, timeout=1800, args=(args.fragments, args.every))[0]
    whole = next(r for r in rows if r["fragments"] == 1)["peak_sync_bytes"]
    for row in rows:
        row["peak_vs_whole"] = row["peak_sync_bytes"] / whole
        row["one_over_fragments"] = 1 / row["fragments"]
    print(f"tiny GPT, DiLoCo every {args.every} steps, 2 gloo workers; bytes sent per worker over one period")
    print_table(rows, [("fragments", "F", "d"), ("syncs", "syncs", "d"), ("peak_sync_bytes", "peak B/sync", ","),
                       ("peak_vs_whole", "vs F=1", ".3f"), ("one_over_fragments", "1/F", ".3f"),
                       ("total_bytes", "B/period", ",")])
    write_json(args.json, {"every": args.every, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
