"""Low-rank optimizer state (GaLore) on the tiny GPT: bytes, step time, refresh time, loss.

    python -m benchmarks.low_rank [--steps 300] [--ranks 16 64] [--seeds 3] [--lrs ...] [--quick] [--json PATH]

Dense AdamW ("dense", the baseline) and GaLore at two ranks ("galore r=16", "galore r=64",
each compared with dense) train for the same steps on the same paired seeds, one process;
every row's peak learning rate is tuned over the same sweep (`--lrs`, default
`harness.LRS`) on the tuning seeds (GaLore's `scale=0.25` makes its matrices take smaller
steps than dense AdamW at the same rate, so one shared rate would favour neither fairly). The
claim read off each GaLore row: its validation loss (whole held-out split) is within 1% of
dense AdamW's. State bytes come
from `step.memory_report()` (counted from the tensors held; the same on every seed); step
ms is the median ordinary step of a run, the median over seeds. A short run per projection
method then times the refresh step alone.
`--quick`: 10 steps, aot_eager, 2 seeds, no tuning.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import lordo_compile as lc
from lordo_compile.experiment import RunConfig, train_tiny_gpt

from . import harness
from .harness import Config



def run(config: Config, seed: int, args: argparse.Namespace) -> dict:
    options = config.options
    policy = lc.Policy.galore(rank=options["rank"], update_proj_gap=args.gap) if "rank" in options else lc.Policy()
    # Step times are compared across rows: each run compiles in a fresh dynamo.
    torch._dynamo.reset()
    result = train_tiny_gpt(policy, RunConfig(steps=args.steps, lr=options["lr"], seed=seed, val_batches=0,
                                              compiler=args.compiler))
    return {"val_loss": result.val_loss, "state_bytes": result.step.memory_report().state_bytes_after,
            "step_ms": result.median_ms("step")}


def refresh_times(rank: int, compiler: str) -> dict[str, float]:
    """Median refresh step (ms) by projection method: a refresh every 5 of 21 steps."""
    times = {}
    for method in ("svd", "randomized", "subspace"):
        torch._dynamo.reset()
        result = train_tiny_gpt(lc.Policy.galore(rank=rank, update_proj_gap=5, method=method),
                                RunConfig(steps=21, compiler=compiler))
        times[method] = result.median_ms("refresh")
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=harness.STEPS)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--gap", type=int, default=100, help="update_proj_gap of the training runs")
    harness.add_arguments(parser, compiler="inductor", jobs=True)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.compiler = 10, "aot_eager"
    seeds, tuning_seeds = harness.seeds_of(args)
    sweep = harness.lr_sweep(args, default=harness.LRS)
    configs = [Config("dense", {"lr": harness.LR}, sweep=sweep)]
    configs += [Config(f"galore r={rank}", {"rank": rank, "lr": harness.LR}, "dense", sweep) for rank in args.ranks]
    rows = harness.compare(configs, lambda config, seed: run(config, seed, args), seeds, tuning_seeds,
                           jobs=args.jobs)
    for row in rows:
        runs = row["runs"]  # state bytes do not depend on the seed
        row.update(state_bytes=runs[0]["state_bytes"], step_ms=statistics.median(r["step_ms"] for r in runs))
        row["state_ratio"] = row["state_bytes"] / rows[0]["state_bytes"]
        row["step_ratio"] = row["step_ms"] / rows[0]["step_ms"]
    lr = harness.lr_words(sweep, tuning_seeds, harness.LR)
    header = (f"tiny GPT, {args.steps} steps, batch 16x128, AdamW, {lr}, seeds {seeds}, {args.compiler}, "
              f"update_proj_gap {args.gap}, scale 0.25")
    harness.report(rows, header, [("state_bytes", "opt state B", ","), ("state_ratio", "vs dense", ".3f"),
                                  ("step_ms", "step ms", ".1f"), ("step_ratio", "vs dense", ".3f")])
    claims = [harness.claim_line(row, "lower", 0.01 * rows[0]["mean"], label=f"{row['config']} within 1% of dense")
              for row in rows[1:]]
    print("\n".join(claims))
    refresh = refresh_times(args.ranks[0], args.compiler)
    print(f"refresh step (rank {args.ranks[0]}), median ms: " + ", ".join(f"{m} {ms:.1f}" for m, ms in refresh.items()))
    return harness.save(args.json, header, rows, args, claims=claims, refresh_ms_by_method=refresh)


if __name__ == "__main__":
    main()
