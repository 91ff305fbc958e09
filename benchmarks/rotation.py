"""Adaptive rotation (RoSTE) against no rotation and always rotating: W4A4 tiny GPT.

    python -m benchmarks.rotation [--steps N] [--batch B] [--layers L] [--width W] [--seq S] [--every K]
                                  [--cage] [--seeds 3] [--tuning-seeds 1] [--lrs LR ...]
                                  [--compiler aot_eager] [--quick] [--json PATH]

Every row trains the same tiny GPT (by default 2 layers of width 128 on sequences of 64
bytes, so that a comparison stays affordable on a busy 2-core machine; per seed the same
initialisation and batches, AdamW with the warm-up and cosine schedule of `lordo-compile
train`) with every linear weight but the head and every linear layer's input
fake-quantized to 4 bits (per-row / per-token RMS-Gaussian scale), plain STE (CAGE's
decoupled correction with its defaults under `--cage`). The rows differ only in the
rotation: none, the Hadamard rotation on every layer (QuEST), or chosen per layer by
quantization error at step 0 and every `--every` steps. The loss is that of the forward
the step trains (quantized weights and inputs, rotated as chosen) on the whole held-out split.

Each row is compared, seed by seed (benchmarks/harness.py), with "no rotation" (its
baseline); adaptive against always, RoSTE's other claim, is printed under the table from
the same paired seeds. Every row's learning rate is tuned over the same sweep (`--lrs`,
default 1.5e-3, 3e-3 and 6e-3 around `lordo-compile train`'s 3e-3) on the tuning seeds.

For the adaptive row: how many layers rotate at the end (per seed), and per run how many
after each choice and how many choices changed between consecutive choice steps. `step ms`
is the smallest per-seed median time of the ordinary steps, `choose ms` of the steps that
also choose. `--quick`: 20 steps, K 5, aot_eager, 2 seeds, no tuning.
"""

from __future__ import annotations

import argparse

import lordo_compile as lc
from lordo_compile.experiment import RunConfig, train_tiny_gpt

from . import harness


def configs(sweep: tuple[dict, ...], lr: float = 3e-3) -> list[harness.Config]:
    return [harness.Config("no rotation", {"lr": lr, "rotation": "none"}, None, sweep),
            harness.Config("always", {"lr": lr, "rotation": "always"}, "no rotation", sweep),
            harness.Config("adaptive", {"lr": lr, "rotation": "adaptive"}, "no rotation", sweep)]


def _policy(rotation: str, steps: int, every: int, cage: bool) -> lc.Policy:
    quant = dict(bits=4, activation_bits=4, quantizer="rms_gaussian")
    if rotation == "always":
        quant["hadamard"] = True
    elif rotation == "adaptive":
        quant["adaptive_rotation"] = lc.AdaptiveRotation(every=every)
    correction = lc.CAGE(total_steps=steps) if cage else None
    return lc.Policy(fake_quant=lc.FakeQuant(correction=correction, **quant))


def _choices(step: lc.CompiledStep) -> dict[str, bool]:
    prefix = "fake_quant.rotate."
    return {name.removeprefix(prefix): bool(value) for name, value in step.backend.runtime.tensors.items()
            if name.startswith(prefix)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--every", type=int, default=20, help="K: steps between the adaptive row's choices")
    parser.add_argument("--cage", action="store_true", help="CAGE's decoupled correction instead of plain STE")
    # aot_eager by default: on 2 CPU cores Inductor's compile time dominates a run this short.
    harness.add_arguments(parser, compiler="aot_eager", jobs=True)
    args = parser.parse_args(argv)
    steps, every, compiler = (20, 5, "aot_eager") if args.quick else (args.steps, args.every, args.compiler)
    seeds, tuning_seeds = harness.seeds_of(args)

    def run(config: harness.Config, seed: int) -> dict:
        rotation = config.options["rotation"]
        history: list[dict[str, bool]] = []

        def record(i, loss, step):
            if rotation == "adaptive" and i % every == 0:
                history.append(_choices(step))

        setup = RunConfig(steps=steps, batch_size=args.batch, seq_len=args.seq, layers=args.layers,
                          width=args.width, lr=config.options["lr"], val_batches=0, compiler=compiler, seed=seed)
        result = train_tiny_gpt(_policy(rotation, steps, every, args.cage), setup, on_step=record)
        figures = {"val_loss": result.val_loss, "step_ms": result.median_ms()}
        if history:
            figures.update(choose_ms=result.median_ms("choose_rotation"), layers=len(history[-1]),
                           rotated=sorted(layer for layer, on in history[-1].items() if on),
                           rotated_per_choice=[sum(choice.values()) for choice in history],
                           choice_changes=sum(a[k] != b[k] for a, b in zip(history, history[1:]) for k in a))
        return figures

    every_config = configs(harness.lr_sweep(args, default=(1.5e-3, 3e-3, 6e-3)))
    rows = harness.compare(every_config, run, seeds, tuning_seeds, jobs=args.jobs)
    for row in rows:
        runs = row["runs"]
        row["step_ms"] = min(r["step_ms"] for r in runs)
        if "layers" in runs[0]:
            row["choose_ms"] = min(r["choose_ms"] for r in runs)
            row["rotated_at_end"] = f"{'/'.join(str(len(r['rotated'])) for r in runs)} of {runs[0]['layers']}"
    header = (f"tiny GPT ({args.layers} layers, width {args.width}), W4A4 {'CAGE' if args.cage else 'STE'}, "
              f"{steps} steps x {args.batch} sequences of {args.seq} bytes, compiler {compiler}, adaptive every "
              f"{every} steps, seeds {seeds}, "
              f"{harness.lr_words(every_config[0].sweep, tuning_seeds, every_config[0].options['lr'])}")
    harness.report(rows, header, [("rotated_at_end", "rotated", ">10"), ("step_ms", "step ms", ".1f"),
                                  ("choose_ms", "choose ms", ".1f")])
    by_name = {row["config"]: row for row in rows}
    adaptive, always = by_name["adaptive"], by_name["always"]
    versus_always = harness.versus(rows, "adaptive", "always")
    claims = [harness.claim_line(row) for row in (always, adaptive, versus_always)]
    print("\n".join(claims))
    for figures in adaptive["runs"]:
        print(f"adaptive, seed {figures['seed']}: rotated {figures['rotated_per_choice']} layers after its choices, "
              f"{figures['choice_changes']} changes")
    return harness.save(args.json, header, rows, args, steps=steps, every=every, compiler=compiler,
                        adaptive_vs_always=versus_always, claims=claims)


if __name__ == "__main__":
    main()
