"""Communication against loss on paired seeds: DDP, local SGD and DiLoCo, gloo workers, tiny GPT.

    python -m benchmarks.sync [--workers 4] [--steps 640] [--every 8 32] [--seeds 3] [--quick] [--json PATH]

Each configuration trains as `benchmarks.lordo` does (its `run`): the same tiny GPT for
the same steps on the same seeds, every worker on its own batches. "local_sgd H=h" and
"diloco H=h" sync every h steps (--every); both are compared with "ddp". Every
configuration's peak learning rate is tuned on the tuning seeds, and DiLoCo's outer
learning rate and momentum with it, per sync interval (`lordo.DILOCO_GRID`): the
defaults of `Policy.diloco` were chosen for 500-step intervals. The claims, at each H:
DiLoCo is within 1% of DDP, and DiLoCo beats local SGD (plain model averaging).

Bytes per worker are counted by the compiled step itself (`step.comm_report()`); they do
not depend on the seed. `--quick`: 2 workers, 16 steps of a one-layer model, H = 8 only.
"""

from __future__ import annotations

import argparse

from . import harness
from .harness import Config
from .lordo import LR, LRS, add_figures, add_run_arguments, claim, diloco_sweep, run, setup_of, tuned_over, \
    within


def configs(every: list[int], sweep: tuple[dict, ...]) -> list[Config]:
    rows = [Config("ddp", {"policy": "ddp", "lr": LR}, sweep=sweep)]
    rows += [Config(f"local_sgd H={h}", {"policy": "local_sgd", "sync_every": h, "lr": LR}, "ddp", sweep)
             for h in every]
    return rows + [Config(f"diloco H={h}", {"policy": "diloco", "sync_every": h, "lr": LR, "outer_lr": 0.7,
                                            "outer_momentum": 0.9}, "ddp", diloco_sweep(sweep)) for h in every]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--every", type=int, nargs="+", default=[8, 32], help="sync intervals H")
    harness.add_arguments(parser, compiler="inductor")
    args = parser.parse_args(argv)
    setup = setup_of(args, every=[8])
    seeds, tuning_seeds = harness.seeds_of(args)
    sweep = harness.lr_sweep(args, LRS)
    comparison = configs(args.every, sweep)
    rows = harness.compare(comparison, lambda config, seed: run(config, seed, setup, args.workers), seeds,
                           tuning_seeds)
    add_figures(rows, comparison)
    for row in rows:
        row.update(outer_lr=row["options"].get("outer_lr"), outer_momentum=row["options"].get("outer_momentum"))
    header = (f"tiny GPT ({rows[0]['runs'][0]['parameters']:,} parameters), {args.workers} gloo workers x "
              f"{args.batch} sequences of 128 bytes, {args.steps} steps, seeds {seeds}, "
              f"{tuned_over(sweep, tuning_seeds, diloco=True)}, compiler {args.compiler}")
    harness.report(rows, header, [("bytes_per_worker", "bytes/worker", ","), ("ratio_vs_ddp", "x fewer vs ddp", ".1f"),
                                  ("relative_diff", "rel. diff", "+.2%"), ("outer_lr", "outer lr", "g"),
                                  ("outer_momentum", "outer mom.", "g")])
    by = {row["config"]: row for row in rows}
    lines = []
    for h in args.every:
        diloco, local = by[f"diloco H={h}"], by[f"local_sgd H={h}"]
        lines += [within(diloco, by["ddp"], "DDP"),
                  claim(f"{diloco['config']} beats local SGD (diloco - local_sgd)",
                        harness.paired(diloco["values"], local["values"]), "lower")]
    print("\n".join(lines))
    return harness.save(args.json, header, rows, args, claims=lines)


if __name__ == "__main__":
    main()
