"""ECO against master weights and naive re-quantization: loss and bytes held, tiny GPT.

    python -m benchmarks.eco [--formats fp8_e4m3 int8 int4] [--only CONFIG ...] [--seeds 3] [--lrs ...]
                             [--jobs N] [--quick] [--json PATH]

Every row trains the same tiny GPT (AdamW with the warm-up and cosine schedule of
`lordo-compile train`) on the same paired seeds, with its linear weights quantized in one
of four ways: "master" keeps an fp32 weight and the forward reads its quantized copy;
"eco" keeps only the quantized weight and feeds the rounding error into Adam's first
moment, rounding to nearest; "eco sr" does the same with stochastic rounding (seeded by the
run's seed), which the paper reports matters; "naive" keeps only the quantized weight and
drops the error, and "naive sr" does so with stochastic rounding (against "eco sr": whether
the error feedback helps beyond the rounding). Validation loss is that of the quantized model, on the whole held-out
split. `bytes/param` is what persists between steps for the weights and the optimizer
(gradients excluded), over all parameters, from `step.memory_report()`.

Each row is compared, seed by seed, with one baseline: "eco <fmt>", "eco sr <fmt>",
"naive <fmt>" and "naive sr <fmt>" with "master <fmt>" (the gap to master weights), "master <fmt>" with fp32
(what quantizing costs at all). The paper's claims, per format: ECO is within 1% of master
weights, and ECO beats naive (read off the pairs "eco <fmt>" and "eco sr <fmt>" against
"naive <fmt>"). Every row's peak
learning rate is tuned over the same sweep (`--lrs`, default `harness.LRS`) on the
tuning seeds; the JSON's per-row `tuning` holds each rate's loss, where the paper's third
claim can be looked at (on the tuning seeds only, untested): naive's loss grows as the rate
shrinks (its error scales as 1/lr), ECO's does not. `--quick`: int8 only, 10 steps, aot_eager, 2 seeds, no tuning.
"""

from __future__ import annotations

import argparse

import lordo_compile as lc
from lordo_compile.experiment import RunConfig, train_tiny_gpt

from . import harness
from .harness import Config

FORMATS = ("fp8_e4m3", "int8", "int4")
LR = harness.LR


def configs(formats, sweep) -> list[Config]:
    rows = [Config("fp32", {"format": "fp32", "lr": LR}, sweep=sweep)]
    for fmt in formats:
        rows += [Config(f"master {fmt}", {"format": fmt, "mode": "master", "lr": LR}, "fp32", sweep),
                 Config(f"eco {fmt}", {"format": fmt, "mode": "eco", "lr": LR}, f"master {fmt}", sweep),
                 Config(f"eco sr {fmt}", {"format": fmt, "mode": "eco", "rounding": "stochastic", "lr": LR},
                        f"master {fmt}", sweep),
                 Config(f"naive {fmt}", {"format": fmt, "mode": "naive", "lr": LR}, f"master {fmt}", sweep),
                 Config(f"naive sr {fmt}", {"format": fmt, "mode": "naive", "rounding": "stochastic", "lr": LR},
                        f"master {fmt}", sweep)]
    return rows


def run(config: Config, seed: int, args: argparse.Namespace) -> dict:
    options = config.options
    policy = lc.Policy() if options["format"] == "fp32" else lc.Policy.eco(
        format=options["format"], mode=options["mode"], rounding=options.get("rounding", "nearest"), seed=seed)
    result = train_tiny_gpt(policy, RunConfig(steps=args.steps, batch_size=args.batch, warmup=args.warmup,
                                              lr=options["lr"], seed=seed, val_batches=0, compiler=args.compiler))
    memory = result.step.memory_report()
    params = sum(p.numel() for p in result.model.parameters())
    return {"val_loss": result.val_loss, "bytes_per_param": (memory.weight_bytes + memory.state_bytes_after) / params}


def claims(rows: list[dict]) -> list[str]:
    """Each claim whose rows ran (all, unless --only chose some)."""
    by_name = {row["config"]: row for row in rows}
    lines = []
    for fmt in FORMATS:
        master, naive = f"master {fmt}", f"naive {fmt}"
        for eco in (f"eco {fmt}", f"eco sr {fmt}"):
            if {master, eco} <= by_name.keys():
                lines.append(harness.claim_line(harness.versus(rows, eco, master), "lower",
                                                0.01 * by_name[master]["mean"], label=f"{eco} within 1% of master"))
            if {eco, naive} <= by_name.keys():
                lines.append(harness.claim_line(harness.versus(rows, eco, naive), "lower",
                                                label=f"{eco} beats naive ({eco} - naive)"))
        if {f"eco sr {fmt}", f"naive sr {fmt}"} <= by_name.keys():
            lines.append(harness.claim_line(harness.versus(rows, f"eco sr {fmt}", f"naive sr {fmt}"), "lower",
                                            label=f"eco sr {fmt} beats naive sr (eco sr - naive sr)"))
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=harness.STEPS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=30, help="warm-up steps of the lr schedule")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    harness.add_arguments(parser, compiler="inductor", jobs=True, only=True)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.compiler, args.formats = 10, "aot_eager", ["int8"]
    seeds, tuning_seeds = harness.seeds_of(args)
    sweep = harness.lr_sweep(args, default=harness.LRS)
    every_config = configs(args.formats, sweep)
    rows = harness.compare(harness.select(every_config, args.only),
                           lambda config, seed: run(config, seed, args), seeds, tuning_seeds, jobs=args.jobs)
    for row in rows:
        row["bytes_per_param"] = row["runs"][0]["bytes_per_param"]  # the same on every seed
    lr = harness.lr_words(sweep, tuning_seeds, LR)
    header = (f"tiny GPT, {args.steps} steps x {args.batch} sequences of 128 bytes, AdamW, {lr}, "
              f"{args.warmup} warm-up steps, seeds {seeds}, {args.compiler}")
    harness.report(rows, header, [("bytes_per_param", "bytes/param", ".2f")])
    print("\n".join(claims(rows)))
    return harness.save(args.json, header, rows, args, claims=claims, selecting=("formats",),
                        configs=every_config)


if __name__ == "__main__":
    main()
