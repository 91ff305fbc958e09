"""Adaptive rotation (RoSTE) against no rotation and always rotating: W4A4 tiny GPT.

    python -m benchmarks.rotation [--quick] [--cage] [--json PATH]

Every row trains the same tiny GPT (by default 2 layers of width 128 on sequences of 64
bytes, so that the whole comparison fits ten minutes of a busy 2-core machine; same seeds,
steps, batches, AdamW with the warm-up and cosine schedule of `lordo-compile train`) with
every linear weight but the head and every linear layer's input fake-quantized to 4 bits
(per-row / per-token RMS-Gaussian scale), plain STE (CAGE's decoupled correction with its
defaults under `--cage`). The rows differ only in the rotation: none, the Hadamard
rotation on every layer (QuEST), or chosen per layer by quantization error at step 0 and
every `--every` steps. The validation loss is computed on the forward the step trains
(quantized weights and inputs, rotated as chosen); each row is the mean over `--seeds`
runs. For the adaptive row: how many layers rotate at the end and after each choice, and
how many choices changed between consecutive choice steps. `step_ms` is the smallest
per-run median time of the ordinary steps; `choose_ms` of the steps that also choose.
"""

from __future__ import annotations

import argparse

import lordo_compile as lc
from lordo_compile.experiment import RunConfig, train_tiny_gpt

from .common import print_table, write_json

ROWS = ("no rotation", "always", "adaptive")


def _policy(row: str, steps: int, every: int, cage: bool) -> lc.Policy:
    quant = dict(bits=4, activation_bits=4, quantizer="rms_gaussian")
    if row == "always":
        quant["hadamard"] = True
    elif row == "adaptive":
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
    parser.add_argument("--seeds", type=int, default=2, help="runs per row (model, data): the loss is their mean")
    parser.add_argument("--every", type=int, default=20, help="K: steps between the adaptive row's choices")
    parser.add_argument("--cage", action="store_true", help="CAGE's decoupled correction instead of plain STE")
    parser.add_argument("--compiler", default="aot_eager", choices=["inductor", "aot_eager"],
                        help="aot_eager by default: on 2 CPU cores Inductor's compile time dominates a run this short")
    parser.add_argument("--quick", action="store_true", help="20 steps, K 5, 1 seed, aot_eager: a smoke run")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    steps, every, seeds = (20, 5, 1) if args.quick else (args.steps, args.every, args.seeds)
    compiler = "aot_eager" if args.quick else args.compiler
    rows = []
    for name in ROWS:
        losses, times, choose_times, rotated, changes, counts = [], [], [], [], [], []
        for seed in range(seeds):
            history: list[dict[str, bool]] = []

            def record(i, loss, step, history=history, name=name):
                if name == "adaptive" and i % every == 0:
                    history.append(_choices(step))

            config = RunConfig(steps=steps, batch_size=args.batch, seq_len=args.seq, layers=args.layers,
                               width=args.width, compiler=compiler, seed=seed)
            run = train_tiny_gpt(_policy(name, steps, every, args.cage), config, on_step=record)
            losses.append(run.val_loss)
            times.append(run.median_ms())
            if history:
                choose_times.append(run.median_ms("choose_rotation"))
                rotated.append(sorted(layer for layer, on in history[-1].items() if on))
                changes.append(sum(a[k] != b[k] for a, b in zip(history, history[1:]) for k in a))
                counts.append([sum(choice.values()) for choice in history])
        row = dict(config=name, val_loss=sum(losses) / len(losses), val_losses=losses, step_ms=min(times))
        if rotated:
            row.update(layers=len(history[-1]), rotated_layers=[len(r) for r in rotated], rotated=rotated,
                       choice_changes=changes, rotated_per_choice=counts, choose_ms=min(choose_times))
        rows.append(row)
        print(f"  {name}: val loss {losses}, {row['step_ms']:.1f} ms/step"
              + (f", rotated {row['rotated_layers']} of {row['layers']} layers at the end, per choice {counts}, "
                 f"{changes} changes" if rotated else ""),
              flush=True)
    base = rows[0]["val_loss"]
    for row in rows:
        row["vs_no_rotation"] = row["val_loss"] - base
        row["rotated_text"] = (f"{'/'.join(map(str, row['rotated_layers']))} of {row['layers']}"
                               if "layers" in row else "")
    header = (f"tiny GPT ({args.layers} layers, width {args.width}), W4A4 {'CAGE' if args.cage else 'STE'}, "
              f"{steps} steps x {args.batch} sequences of {args.seq} bytes, compiler {compiler}, mean of {seeds} "
              f"seed(s), adaptive every {every} steps")
    print(header)
    print_table(rows, [("config", "rotation", "<11"), ("val_loss", "val loss", ".4f"),
                       ("vs_no_rotation", "vs none", "+.4f"), ("rotated_text", "rotated", ">10"),
                       ("step_ms", "step ms", ".1f"), ("choose_ms", "choose ms", ".1f")])
    spread = max(max(r["val_losses"]) - min(r["val_losses"]) for r in rows)
    print(f"seeds of one row spread up to {spread:.4f}")
    for row in rows:
        row.pop("rotated_text")
    result = {"header": header, "steps": steps, "seeds": seeds, "every": every, "cage": args.cage, "rows": rows,
              "seed_spread": spread}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
