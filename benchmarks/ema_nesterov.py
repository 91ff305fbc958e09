"""EMA-Nesterov against AdamW and a one-step (Nesterov) lookahead: validation loss, tiny GPT.

    python -m benchmarks.ema_nesterov [--quick] [--json PATH]

Every row trains the same tiny GPT (same seeds, steps, batches, AdamW with the warm-up and
cosine schedule of `lordo-compile train`). The lookahead rows wrap that AdamW in
`EMANesterov`: beta_t = `--beta` from the end of the learning-rate warm-up to
`--decay-start` x steps, 0 before and after. "EMA-Nesterov" keeps d as an EMA of the
updates (gamma = `--gamma`); "one-step lookahead" is gamma = 0, d = theta_t - theta_{t-1}.
Each row is the mean over `--seeds` runs (seeds 0, 1, ...: model init and batches);
`step_ms` is the smallest per-run median step time.
"""

from __future__ import annotations

import argparse

import torch

import lordo_compile as lc
from lordo_compile.experiment import RunConfig, train_tiny_gpt

from .common import print_table, write_json


def _rows(gamma: float) -> list[dict]:
    return [
        dict(config="AdamW", gamma=None),
        dict(config="EMA-Nesterov", gamma=gamma),
        dict(config="one-step lookahead", gamma=0.0),
    ]


def _policy(row: dict, beta: float, warmup: int, decay_start: int) -> lc.Policy:
    if row["gamma"] is None:
        return lc.Policy()
    return lc.Policy(ema_nesterov=lc.EMANesterov(beta=beta, gamma=row["gamma"], warmup_steps=warmup,
                                              decay_start=decay_start))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=2, help="runs per row (model, data): the loss is their mean")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--gamma", type=float, default=0.9, help="the EMA row's gamma")
    parser.add_argument("--decay-start", type=float, default=0.8, help="beta_t = 0 from this fraction of the run on")
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--quick", action="store_true", help="40 steps, aot_eager: a smoke run")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    steps = 40 if args.quick else args.steps
    compiler = "aot_eager" if args.quick else args.compiler
    warmup = RunConfig.warmup
    decay_start = int(args.decay_start * steps)
    rows = []
    for spec in _rows(args.gamma):
        losses, times = [], []
        for seed in range(args.seeds):
            config = RunConfig(steps=steps, batch_size=args.batch, compiler=compiler, seed=seed)
            run = train_tiny_gpt(_policy(spec, args.beta, warmup, decay_start), config)
            losses.append(run.val_loss)
            times.append(run.median_ms())
        rows.append(dict(config=spec["config"], gamma=spec["gamma"], val_loss=sum(losses) / len(losses),
                         val_losses=losses, step_ms=min(times)))
        print(f"  {spec['config']}: val loss {losses}, {rows[-1]['step_ms']:.1f} ms/step", flush=True)
    base = rows[0]
    for row in rows:
        row["gap_vs_adamw"] = row["val_loss"] - base["val_loss"]
        row["step_vs_adamw"] = row["step_ms"] / base["step_ms"]
    header = (f"tiny GPT, {steps} steps x {args.batch} sequences of 128 bytes, compiler {compiler}, "
              f"{torch.get_num_threads()} thread(s), mean of {args.seeds} seeds; lookahead beta {args.beta} for "
              f"steps {warmup} to {decay_start}")
    noise = max(max(r["val_losses"]) - min(r["val_losses"]) for r in rows)
    print(header)
    print_table(rows, [("config", "config", "<18"), ("val_loss", "val loss", ".4f"),
                       ("gap_vs_adamw", "vs AdamW", "+.4f"), ("step_ms", "step ms", ".1f"),
                       ("step_vs_adamw", "step vs AdamW", ".2f")])
    claim = _claim(rows, noise)
    print(claim)
    result = {"header": header, "steps": steps, "seeds": args.seeds, "beta": args.beta, "warmup_steps": warmup,
              "decay_start": decay_start, "rows": rows, "claim": claim, "seed_spread": noise}
    write_json(args.json, result)
    return result


def _claim(rows: list[dict], noise: float) -> str:
    adamw, ema, one_step = rows
    diffs = [
        [a - b for a, b in zip(row["val_losses"], adamw["val_losses"])] for row in (ema, one_step)
    ]
    return (f"EMA-Nesterov {ema['val_loss']:.4f} ({ema['gap_vs_adamw']:+.4f} vs AdamW, per seed "
            f"{', '.join(f'{d:+.4f}' for d in diffs[0])}); one-step lookahead {one_step['val_loss']:.4f} "
            f"({one_step['gap_vs_adamw']:+.4f}, per seed {', '.join(f'{d:+.4f}' for d in diffs[1])}); "
            f"seeds of one row spread up to {noise:.4f}")


if __name__ == "__main__":
    main()
