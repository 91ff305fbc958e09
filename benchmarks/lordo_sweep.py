"""The sweep behind LoRDO's defaults: payload x omega at rank 8, 4 gloo workers, tiny GPT.

    python -m benchmarks.lordo_sweep [--json PATH]

Same setup as `benchmarks.lordo` (same steps, tokens, seed, sync every 32); each row
against low-rank DDP at the same rank.
"""

from __future__ import annotations

import argparse

from .common import print_table, write_json
from .lordo import run_rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--omegas", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    parser.add_argument("--payloads", nargs="+", default=["int8", "low_rank"])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = [dict(policy="low_rank_ddp", rank=args.rank, make="low_rank_ddp")]
    for payload in args.payloads:
        for omega in args.omegas:
            rows.append(dict(policy=f"lordo payload={payload} omega={omega}", rank=args.rank, make="lordo",
                             options=dict(payload=payload, omega=omega)))
    rows = run_rows(rows, args.workers, args.steps, args.batch, "aot_eager")
    print_table(rows, [("label", "policy", "<36"), ("bytes_per_worker", "bytes/worker", ","),
                       ("ratio_vs_low_rank_ddp", "x fewer vs lr-ddp", ".1f"), ("val_loss", "val loss", ".3f"),
                       ("relative_gap", "gap vs lr-ddp", "+.2%")])
    result = {"rows": [{k: v for k, v in r.items() if k != "curve"} for r in rows]}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
