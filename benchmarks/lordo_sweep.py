"""The sweep behind LoRDO's defaults: payload x omega at one rank, paired seeds, gloo workers, tiny GPT.

    python -m benchmarks.lordo_sweep [--payloads int8 low_rank] [--omegas 0.9 0.7 0.5] [--seeds 3] [--json PATH]

Each configuration trains as `benchmarks.lordo` does (its `run`: same tiny GPT, steps,
workers and seeds, sync every 32), at the peak learning rate its tuning seeds chose. Each
"lordo P omega=W" row (payload P) is compared with "low_rank_ddp r=R", and the claim the
defaults were chosen on is checked for each: within 1% of low-rank DDP (the tolerance is
1% of its mean loss) at >= 10x fewer bytes. `--quick`: 2 workers, 16 steps of a one-layer
model, sync every 8, omega 0.7 only.
"""

from __future__ import annotations

import argparse

from . import harness
from .harness import Config
from .lordo import BYTES, LR, LRS, SYNC_EVERY, add_run_arguments, compare_on_workers, headline, setup_of


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--sync-every", type=int, default=SYNC_EVERY)
    parser.add_argument("--omegas", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    parser.add_argument("--payloads", nargs="+", default=["int8", "low_rank"])
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    setup = setup_of(args, sync_every=8, omegas=[0.7])
    sweep = harness.lr_sweep(args, LRS)
    options = {"rank": args.rank, "sync_every": args.sync_every, "lr": LR}
    base = f"low_rank_ddp r={args.rank}"
    comparison = [Config(base, {"policy": "low_rank_ddp", **options}, sweep=sweep)]
    comparison += [Config(f"lordo {payload} omega={omega}",
                          {"policy": "lordo", "fields": {"payload": payload, "omega": omega}, **options}, base, sweep)
                   for payload in args.payloads for omega in args.omegas]
    rows, header = compare_on_workers(comparison, setup, args, f"sync every {args.sync_every}")
    harness.report(rows, header, BYTES)
    lines = [headline(row, rows[0]) for row in rows[1:]]
    print("\n".join(lines))
    return harness.save(args.json, header, rows, args, claims=lines)


if __name__ == "__main__":
    main()
