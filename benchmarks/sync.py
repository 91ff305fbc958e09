"""Communication against loss on paired seeds: DDP, local SGD and DiLoCo, gloo workers, tiny GPT.

    python -m benchmarks.sync [--workers 4] [--steps 640] [--every 8 32] [--only CONFIG ...] [--seeds 3] [--quick]
                              [--json PATH]

Each configuration trains as `benchmarks.lordo` does (its `run`): the same tiny GPT for
the same steps on the same seeds, every worker on its own batches. "local_sgd H=h" and
"diloco H=h" sync every h steps (--every); both are compared with "ddp". Every
configuration's peak learning rate is tuned on the tuning seeds. DiLoCo's inner steps are
local SGD's, so it takes the peak learning rate tuned for "local_sgd H=h" and tunes its
outer learning rate and momentum per sync interval (`lordo.DILOCO_GRID`; the defaults of
`Policy.diloco` were chosen for 500-step intervals): `harness.Config.tuned_after`. The
claims, at each H: DiLoCo is within 1% of DDP, and DiLoCo beats local SGD (plain model
averaging). "ddp lr=1e-3" is DDP at the inner learning rate every DiLoCo and local SGD row
chose (not tuned): tuned DDP chose 2e-3, where full-rank AdamW's seeds spread by 0.4 nats and
no 1% claim can be read; DiLoCo is also compared with it.

Bytes per worker are counted by the compiled step itself (`step.comm_report()`); they do
not depend on the seed. `--only NAME ...`: a partial run of the rows named (a DiLoCo row
needs its local SGD row); its rows join those already in the --json of a run set up alike. `--quick`: 2 workers, 16 steps of a one-layer model, H = 8 only.
"""

from __future__ import annotations

import argparse

from . import harness
from .harness import Config
from .lordo import (DILOCO_GRID, LR, LRS, add_run_arguments, claim, compare_on_workers, ratios, setup_of,
                    within)


# DDP at DiLoCo's inner learning rate, untuned (see the module doc).
DDP_AT_INNER_LR = "ddp lr=1e-3"


def configs(every: list[int], sweep: tuple[dict, ...]) -> list[Config]:
    rows = [Config("ddp", {"policy": "ddp", "lr": LR}, sweep=sweep),
            Config(DDP_AT_INNER_LR, {"policy": "ddp", "lr": 1e-3})]
    rows += [Config(f"local_sgd H={h}", {"policy": "local_sgd", "sync_every": h, "lr": LR}, "ddp", sweep)
             for h in every]
    return rows + [Config(f"diloco H={h}", {"policy": "diloco", "sync_every": h, "lr": LR, "outer_lr": 0.7,
                                            "outer_momentum": 0.9}, "ddp", DILOCO_GRID, f"local_sgd H={h}")
                   for h in every]


def claims(rows: list[dict]) -> list[str]:
    """Each claim whose rows ran (all, unless --only chose some)."""
    by = {row["config"]: row for row in rows}
    lines = []
    for h in sorted({row["options"]["sync_every"] for row in rows if "sync_every" in row["options"]}):
        diloco, local = f"diloco H={h}", f"local_sgd H={h}"
        for ddp in ("ddp", DDP_AT_INNER_LR):
            if {diloco, ddp} <= by.keys():
                lines.append(within(harness.versus(rows, diloco, ddp), by[ddp], ddp))
        if {diloco, local} <= by.keys():
            lines.append(claim(f"{diloco} beats local SGD (diloco - local_sgd)",
                               harness.versus(rows, diloco, local), "lower"))
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--every", type=int, nargs="+", default=[8, 32], help="sync intervals H")
    harness.add_arguments(parser, compiler="inductor", only=True)
    args = parser.parse_args(argv)
    setup = setup_of(args, every=[8])
    every_config = configs(args.every, harness.lr_sweep(args, LRS))
    comparison = harness.select(every_config, args.only)
    rows, header = compare_on_workers(comparison, setup, args, "sync every H as each row names",
                                      diloco=f"DiLoCo's outer lr and momentum at local SGD's; {DDP_AT_INNER_LR!r} "
                                             "not tuned")
    for row in rows:
        row.update(outer_lr=row["options"].get("outer_lr"), outer_momentum=row["options"].get("outer_momentum"))
    harness.report(rows, header, [("bytes_per_worker", "bytes/worker", ","), ("ratio_vs_ddp", "x fewer vs ddp", ".1f"),
                                  ("relative_diff", "rel. diff", "+.2%"), ("outer_lr", "outer lr", "g"),
                                  ("outer_momentum", "outer mom.", "g")])
    print("\n".join(claims(rows)))
    # The rows' names carry their interval, so partial runs with other --every share a JSON.
    return harness.save(args.json, header, rows, args, claims=claims, selecting=("every",), configs=every_config,
                        figures=ratios)

if __name__ == "__main__":
    main()
