"""Communication vs loss: ddp, local SGD and DiLoCo with 4 gloo workers on the tiny GPT.

    python -m benchmarks.sync [--workers 4] [--steps 256] [--quick] [--json PATH]

Each policy trains the same model from the same seed for the same steps, every worker on
its own batches (8 sequences each). Bytes are counted by the compiled step itself
(`step.comm_report()`); the validation loss is rank 0's model after the last step.
"""

from __future__ import annotations

import argparse
import time

import lordo_compile as lc
from lordo_compile.experiment import RunConfig, train_tiny_gpt
from lordo_compile.launch import run_workers

from .common import print_table, write_json


def _policy(name: str) -> lc.Policy:
    if name == "ddp":
        return lc.Policy.ddp()
    kind, every = name.split(" H=")
    if kind == "local_sgd":
        return lc.Policy.local_sgd(sync_every=int(every))
    return lc.Policy.diloco(sync_every=int(every))


def worker(rank: int, world: int, name: str, steps: int, compiler: str) -> dict:
    started = time.perf_counter()
    run = train_tiny_gpt(_policy(name), RunConfig(steps=steps, batch_size=8, compiler=compiler))
    report = run.step.comm_report()
    return {"val_loss": run.val_loss, "bytes_per_worker": report.bytes_sent, "collectives": report.collectives,
            "wall_s": time.perf_counter() - started, "compile_s": run.compile_seconds}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--every", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--quick", action="store_true", help="64 steps without code generation")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    steps, compiler = (64, "aot_eager") if args.quick else (args.steps, args.compiler)
    names = ["ddp"] + [f"{kind} H={h}" for kind in ("local_sgd", "diloco") for h in args.every]
    rows = []
    for name in names:
        results = run_workers(worker, args.workers, timeout=3600, args=(name, steps, compiler))
        row = {"policy": name, **results[0], "wall_s": max(r["wall_s"] for r in results)}
        rows.append(row)
        print(f"  {name}: val loss {row['val_loss']:.3f}, {row['bytes_per_worker']:,} bytes", flush=True)
    ddp = rows[0]
    for row in rows:
        row["bytes_ratio_vs_ddp"] = row["bytes_per_worker"] / ddp["bytes_per_worker"]
        row["loss_gap_vs_ddp"] = row["val_loss"] - ddp["val_loss"]
    print(f"tiny GPT, {args.workers} gloo workers x 8 sequences of 128 bytes, {steps} steps, compiler {compiler}")
    print_table(rows, [("policy", "policy", "<14"), ("bytes_per_worker", "bytes/worker", ","),
                       ("bytes_ratio_vs_ddp", "vs ddp", ".4f"), ("val_loss", "val loss", ".3f"),
                       ("loss_gap_vs_ddp", "gap vs ddp", "+.3f"), ("wall_s", "wall s", ".0f")])
    result = {"workers": args.workers, "steps": steps, "compiler": compiler,
              "policies": {row["policy"]: {k: v for k, v in row.items() if k != "policy"} for row in rows}}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
