"""ECO against master weights and naive re-quantization: loss and bytes held, tiny GPT.

    python -m benchmarks.eco [--quick] [--json PATH]

Every row trains the same tiny GPT (same seed, steps, batches, AdamW with the warm-up and
cosine schedule of `lordo-compile train`) with its linear weights quantized in one of
three ways: "master" keeps an fp32 weight and the forward reads its quantized copy;
"eco" keeps only the quantized weight and feeds the rounding error into Adam's first
moment; "naive" keeps only the quantized weight and drops the error. Validation loss is
that of the quantized model. `state_bytes_per_param` is what persists between steps for
the weights and the optimizer (gradients excluded), over all parameters, from
`step.memory_report()`. The learning-rate sweep repeats int8 at smaller peak rates: the
paper's claim is that naive's loss grows as the rate shrinks (its error scales as 1/lr)
while ECO's does not.
"""

from __future__ import annotations

import argparse

import lordo_compile as lc
from lordo_compile.experiment import RunConfig, train_tiny_gpt

from .common import print_table, write_json

FORMATS = ("fp8_e4m3", "int8", "int4")
MODES = ("master", "eco", "naive")


def _run(fmt: str, mode: str, lr: float, args) -> dict:
    policy = lc.Policy.eco(format=fmt, mode=mode) if fmt != "fp32" else lc.Policy()
    config = RunConfig(steps=args.steps, batch_size=args.batch, compiler=args.compiler, lr=lr, seed=args.seed,
                       warmup=args.warmup)
    run = train_tiny_gpt(policy, config)
    memory = run.step.memory_report()
    params = sum(p.numel() for p in run.model.parameters())
    row = dict(config=f"{fmt} {mode}" if fmt != "fp32" else "fp32", format=fmt, mode=mode, lr=lr,
               val_loss=run.val_loss, state_bytes_per_param=(memory.weight_bytes + memory.state_bytes_after) / params)
    print(f"  {row['config']} lr {lr:g}: val loss {row['val_loss']:.4f}, "
          f"{row['state_bytes_per_param']:.2f} bytes/param", flush=True)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--sweep", type=float, nargs="*", default=[1e-3, 3e-4], help="extra peak lrs for int8")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--seed", type=int, default=0, help="model init and batches")
    parser.add_argument("--warmup", type=int, default=30, help="warm-up steps of the lr schedule")
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--quick", action="store_true", help="30 steps, aot_eager, int8 only: a smoke run")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.compiler, args.formats, args.sweep = 30, "aot_eager", ["int8"], []
    steps = args.steps
    rows = [_run("fp32", "none", args.lr, args)]
    rows += [_run(fmt, mode, args.lr, args) for fmt in args.formats for mode in args.modes]
    sweep = [_run("int8", mode, lr, args) for lr in args.sweep for mode in args.modes]
    for row in rows + sweep:
        master = next((r for r in rows + sweep if r["format"] == row["format"] and r["mode"] == "master"
                       and r["lr"] == row["lr"]), None)
        row["gap_vs_master"] = row["val_loss"] - master["val_loss"] if master else float("nan")
    header = (f"tiny GPT, {steps} steps x {args.batch} sequences of 128 bytes, AdamW peak lr {args.lr:g} after "
              f"{args.warmup} warm-up steps, seed {args.seed}, {args.compiler}")
    columns = [("config", "config", "<16"), ("val_loss", "val loss", ".4f"), ("gap_vs_master", "gap vs master", "+.4f"),
               ("state_bytes_per_param", "bytes/param", ".2f")]
    print(header)
    print_table(rows, columns)
    if sweep:
        print("int8, smaller peak learning rates:")
        print_table(sweep, [("lr", "lr", "g")] + columns)
    result = {"header": header, "steps": steps, "rows": rows, "lr_sweep": sweep}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
