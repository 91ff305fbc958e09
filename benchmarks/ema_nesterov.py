"""EMA-Nesterov against AdamW and a one-step (Nesterov) lookahead: validation loss, tiny GPT.

    python -m benchmarks.ema_nesterov [--steps N] [--batch B] [--beta 0.5] [--gamma 0.9] [--decay-start 0.8]
                                      [--seeds 3] [--tuning-seeds 1] [--lrs LR ...] [--compiler inductor]
                                      [--quick] [--json PATH]

Every row trains the same tiny GPT (per seed the same initialisation and batches, AdamW with
the warm-up and cosine schedule of `lordo-compile train`). The lookahead rows wrap that
AdamW in `EMANesterov`: beta_t = `--beta` from the end of the learning-rate warm-up to
`--decay-start` x steps, 0 before and after. "EMA-Nesterov" keeps d as an EMA of the
updates (gamma = `--gamma`); "one-step lookahead" is gamma = 0, d = theta_t - theta_{t-1}.
The loss is that on the whole held-out split.

Both lookahead rows are compared, seed by seed (benchmarks/harness.py), with AdamW (their
baseline): the claim is that the lookahead lowers the loss. Every row's learning rate is
tuned over the same sweep (`--lrs`, default `harness.LRS`) on the tuning seeds. `step ms`
is the smallest per-seed median step time (the one least disturbed by other jobs); `step
vs AdamW` divides it by AdamW's.
`--quick`: 40 steps, aot_eager, 2 seeds, no tuning.
"""

from __future__ import annotations

import argparse

import torch

import lordo_compile as lc
from lordo_compile.experiment import RunConfig, train_tiny_gpt

from . import harness


def configs(sweep: tuple[dict, ...], gamma: float, lr: float = harness.LR) -> list[harness.Config]:
    return [harness.Config("AdamW", {"lr": lr, "gamma": None}, None, sweep),
            harness.Config("EMA-Nesterov", {"lr": lr, "gamma": gamma}, "AdamW", sweep),
            harness.Config("one-step lookahead", {"lr": lr, "gamma": 0.0}, "AdamW", sweep)]


def _policy(gamma: float | None, beta: float, warmup: int, decay_start: int) -> lc.Policy:
    if gamma is None:
        return lc.Policy()
    return lc.Policy(ema_nesterov=lc.EMANesterov(beta=beta, gamma=gamma, warmup_steps=warmup,
                                              decay_start=decay_start))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=harness.STEPS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--gamma", type=float, default=0.9, help="the EMA row's gamma")
    parser.add_argument("--decay-start", type=float, default=0.8, help="beta_t = 0 from this fraction of the run on")
    harness.add_arguments(parser, compiler="inductor", jobs=True)
    args = parser.parse_args(argv)
    steps, compiler = (40, "aot_eager") if args.quick else (args.steps, args.compiler)
    seeds, tuning_seeds = harness.seeds_of(args)
    warmup = RunConfig.warmup
    decay_start = int(args.decay_start * steps)

    def run(config: harness.Config, seed: int) -> dict:
        setup = RunConfig(steps=steps, batch_size=args.batch, lr=config.options["lr"], val_batches=0,
                          compiler=compiler, seed=seed)
        result = train_tiny_gpt(_policy(config.options["gamma"], args.beta, warmup, decay_start), setup)
        return {"val_loss": result.val_loss, "step_ms": result.median_ms()}

    sweep = harness.lr_sweep(args, default=harness.LRS)
    rows = harness.compare(configs(sweep, args.gamma), run, seeds, tuning_seeds, jobs=args.jobs)
    for row in rows:
        row["step_ms"] = min(r["step_ms"] for r in row["runs"])
        row["step_vs_adamw"] = row["step_ms"] / rows[0]["step_ms"]
    header = (f"tiny GPT, {steps} steps x {args.batch} sequences of 128 bytes, compiler {compiler}, "
              f"{harness.threads_per_run(args.jobs)} thread(s) per run, {args.jobs} at a time, "
              f"seeds {seeds}, {harness.lr_words(sweep, tuning_seeds, harness.LR)}; "
              f"lookahead beta {args.beta} for steps {warmup} to {decay_start}")
    harness.report(rows, header, [("step_ms", "step ms", ".1f"), ("step_vs_adamw", "step vs AdamW", ".2f")])
    claims = [harness.claim_line(row) for row in rows if row["baseline"]]
    print("\n".join(claims))
    return harness.save(args.json, header, rows, args, steps=steps, compiler=compiler, warmup_steps=warmup,
                        decay_start=decay_start, claims=claims)


if __name__ == "__main__":
    main()
