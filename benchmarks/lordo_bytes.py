"""LoRDO's bytes against low-rank DDP counted both ways, from each run's comm report.

    python -m benchmarks.lordo_bytes --json benchmarks/results/lordo_bytes.json

Which baseline the paper's "about 10x fewer bytes than low-rank DDP" counts against is
open (ALGORITHMS.md section 3). Low-rank DDP as `Policy.low_rank_ddp` runs it all-reduces
the projected gradient every step (and the full gradient at each refresh of its projection,
every 32 steps); GaLore under plain DDP all-reduces the full gradient every step, which is
`Policy.ddp`'s traffic. Every row trains the tiny GPT of `benchmarks.lordo` for the same
steps with a sync (and a low-rank DDP refresh) every 32; its bytes are what
`step.comm_report()` counted for one worker (each collective's payload, which does not
depend on the number of workers). Batch 1: the rows are about bytes, not loss.
"""

from __future__ import annotations

import argparse

from lordo_compile.experiment import RunConfig

from .common import print_table, write_json
from .harness import Config
from .lordo import LR, SYNC_EVERY, run

COLUMNS = [("label", "policy", "<40"), ("bytes_per_worker", "bytes/worker", ","), ("bytes_per_step", "bytes/step", ","),
           ("ratio_vs_low_rank_ddp", "x fewer vs projected-grad lr-ddp", ".1f"),
           ("ratio_vs_ddp", "x fewer vs full-grad all-reduce", ".1f")]


def run_rows(rows: list[dict], workers: int, steps: int, batch: int, compiler: str) -> list[dict]:
    """One seed of each row (dicts of `policy`, `rank`, `make` and LoRDO `options`): this
    benchmark reads bytes, which no seed changes. Ratios are against the row "ddp" and the
    "low_rank_ddp" row at the same rank."""
    setup = RunConfig(steps=steps, batch_size=batch, compiler=compiler)
    for row in rows:
        options = {"policy": row["make"], "rank": row["rank"], "sync_every": SYNC_EVERY, "lr": LR,
                   "fields": row.get("options", {})}
        row.update(run(Config(row["policy"], options), 0, setup, workers),
                   label=row["policy"] + (f" r={row['rank']}" if row["rank"] else ""))
    ddp, low_rank = next(r for r in rows if r["make"] == "ddp"), [r for r in rows if r["make"] == "low_rank_ddp"]
    for row in rows:
        base = next((r for r in low_rank if r["rank"] == row["rank"]), low_rank[0])
        row["ratio_vs_ddp"] = ddp["bytes_per_worker"] / (row["bytes_per_worker"] or 1)
        row["ratio_vs_low_rank_ddp"] = base["bytes_per_worker"] / (row["bytes_per_worker"] or 1)
    return rows


def _rows(ranks: list[int]) -> list[dict]:
    rows = [dict(policy="ddp", rank=None, make="ddp")]
    for rank in ranks:
        rows += [
            dict(policy="low_rank_ddp", rank=rank, make="low_rank_ddp"),
            dict(policy="lordo", rank=rank, make="lordo", options={}),
            dict(policy="lordo authors", rank=rank, make="lordo", options=dict(variant="authors")),
            dict(policy="lordo authors payload=low_rank", rank=rank, make="lordo",
                 options=dict(variant="authors", payload="low_rank")),
        ]
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=256, help=f"a multiple of the sync interval {SYNC_EVERY}")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--compiler", default="aot_eager", choices=["aot_eager", "inductor"])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.steps % SYNC_EVERY:
        parser.error(f"--steps must be a multiple of the sync interval {SYNC_EVERY}, got {args.steps}")
    rows = run_rows(_rows(args.ranks), args.workers, args.steps, 1, args.compiler)
    for row in rows:
        row["bytes_per_step"] = row["bytes_per_worker"] // args.steps
    header = (f"tiny GPT, {args.steps} steps, sync and low-rank DDP refresh every {SYNC_EVERY}, "
              f"{args.workers} gloo workers, bytes per worker from step.comm_report()")
    print(header)
    print_table(rows, COLUMNS)
    keep = ("label", "policy", "rank", "bytes_per_worker", "bytes_per_step", "ratio_vs_low_rank_ddp", "ratio_vs_ddp")
    result = {"header": header, "steps": args.steps, "sync_every": SYNC_EVERY,
              "rows": [{k: row[k] for k in keep} for row in rows]}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
