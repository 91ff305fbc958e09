"""Low-rank optimizer state (GaLore) on the tiny GPT: bytes, step time, refresh time, loss.

    python -m benchmarks.low_rank [--steps 300] [--quick] [--json PATH]

Dense AdamW and low-rank AdamW at two ranks train for the same steps on the same data
(one process, same seed); a short run per projection method times the refresh phase.
State bytes come from `step.memory_report()` (counted from the tensors held).
"""

from __future__ import annotations

import argparse

import torch

import lordo_compile as lc
from lordo_compile.experiment import RunConfig, train_tiny_gpt

from .common import print_table, write_json


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--ranks", type=int, nargs=2, default=[16, 64])
    parser.add_argument("--gap", type=int, default=100, help="update_proj_gap of the training runs")
    parser.add_argument("--quick", action="store_true", help="60 steps, no code generation (aot_eager)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    steps = 60 if args.quick else args.steps
    compiler = "aot_eager" if args.quick else "inductor"
    config = RunConfig(steps=steps, compiler=compiler)

    rows = []
    runs = {"dense": lc.Policy()}
    for rank in args.ranks:
        runs[f"low-rank r={rank}"] = lc.Policy.galore(rank=rank, update_proj_gap=args.gap)
    for name, policy in runs.items():
        torch._dynamo.reset()
        run = train_tiny_gpt(policy, config)
        memory = run.step.memory_report()
        rows.append({"config": name, "val_loss": run.val_loss, "train_loss": run.train_loss,
                     "state_bytes": memory.state_bytes_after, "step_ms": run.median_ms("step"),
                     "refresh_ms": run.median_ms("refresh")})
        print(f"  {name}: val loss {run.val_loss:.3f}", flush=True)
    dense, low = rows[0], rows[1:]

    timing = RunConfig(steps=21, compiler=compiler)
    refresh = {}
    for method in ("svd", "randomized", "subspace"):
        torch._dynamo.reset()
        run = train_tiny_gpt(lc.Policy.galore(rank=args.ranks[0], update_proj_gap=5, method=method), timing)
        refresh[method] = {"refresh_ms": run.median_ms("refresh"), "step_ms": run.median_ms("step")}
        print(f"  refresh by {method}: {refresh[method]['refresh_ms']:.1f} ms", flush=True)

    print(f"tiny GPT, {steps} steps, batch {config.batch_size}x{config.seq_len}, compiler {compiler}, "
          f"update_proj_gap {args.gap}, scale 0.25")
    for row in rows:
        row["state_ratio"] = row["state_bytes"] / dense["state_bytes"]
        row["step_ratio"] = row["step_ms"] / dense["step_ms"]
    print_table(rows, [("config", "config", "<16"), ("state_bytes", "opt state B", ","),
                       ("state_ratio", "vs dense", ".3f"), ("step_ms", "step ms", ".1f"),
                       ("step_ratio", "vs dense", ".3f"), ("val_loss", "val loss", ".3f")])
    print(f"refresh step (rank {args.ranks[0]}), median ms: " +
          ", ".join(f"{m} {v['refresh_ms']:.1f}" for m, v in refresh.items()) +
          f"; ordinary step {refresh['svd']['step_ms']:.1f}")
    result = {
        "steps": steps,
        "compiler": compiler,
        "ranks": args.ranks,
        "state_bytes_dense": dense["state_bytes"],
        "state_bytes_low_rank": {str(r): row["state_bytes"] for r, row in zip(args.ranks, low)},
        "step_ms_dense": dense["step_ms"],
        "step_ms_low_rank": {str(r): row["step_ms"] for r, row in zip(args.ranks, low)},
        "loss_dense": dense["val_loss"],
        "loss_low_rank": {str(r): row["val_loss"] for r, row in zip(args.ranks, low)},
        "refresh_ms_by_method": {m: v["refresh_ms"] for m, v in refresh.items()},
        "rows": rows,
    }
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
