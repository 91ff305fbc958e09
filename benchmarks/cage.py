"""CAGE against plain straight-through QAT: validation loss at 4 and 3 bits, tiny GPT.

    python -m benchmarks.cage [--quick] [--json PATH]

Every row trains the same tiny GPT (same seed, steps, batches, AdamW with the warm-up and
cosine schedule of `lordo-compile train`) with its linear weights fake-quantized per row
(RMS-Gaussian scale, Hadamard-rotated rows: QuEST's quantizer), except the full-precision
row. CAGE adds the decoupled correction with the paper's defaults (lambda 10, silence
ratio 0.8, linear ramp). The W4A4 rows also quantize every linear layer's input per token.
`step_ms` is the median step time; the overhead column compares CAGE with STE at the same
bits in this run.
"""

from __future__ import annotations

import argparse

import lordo_compile as lc
from lordo_compile.experiment import RunConfig, train_tiny_gpt

from .common import print_table, write_json


def _policy(row: dict, steps: int) -> lc.Policy:
    if row["bits"] is None:
        return lc.Policy()
    quant = dict(bits=row["bits"], quantizer="rms_gaussian", hadamard=True, activation_bits=row.get("activation_bits"))
    if row["cage"]:
        return lc.Policy.cage(total_steps=steps, **quant)
    return lc.Policy(fake_quant=lc.FakeQuant(**quant))


ROWS = [
    dict(config="fp32", bits=None, cage=False),
    # The same run again: how far two runs of one configuration land apart on this machine.
    dict(config="fp32 again", bits=None, cage=False),
    dict(config="STE W4", bits=4, cage=False),
    dict(config="CAGE W4", bits=4, cage=True),
    dict(config="STE W3", bits=3, cage=False),
    dict(config="CAGE W3", bits=3, cage=True),
    dict(config="STE W4A4", bits=4, cage=False, activation_bits=4),
    dict(config="CAGE W4A4", bits=4, cage=True, activation_bits=4),
]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--quick", action="store_true", help="40 steps, aot_eager: a smoke run")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    steps = 40 if args.quick else args.steps
    compiler = "aot_eager" if args.quick else args.compiler
    rows = []
    for spec in ROWS:
        config = RunConfig(steps=steps, batch_size=args.batch, compiler=compiler, eval_every=max(1, steps // 4))
        run = train_tiny_gpt(_policy(spec, steps), config)
        rows.append(dict(config=spec["config"], val_loss=run.val_loss, step_ms=run.median_ms()))
        print(f"  {spec['config']}: val loss {run.val_loss:.4f}, {rows[-1]['step_ms']:.1f} ms/step", flush=True)
    fp = rows[0]["val_loss"]
    by_name = {r["config"]: r for r in rows}
    for row in rows:
        row["gap_vs_fp"] = row["val_loss"] - fp
        ste = by_name.get(row["config"].replace("CAGE", "STE"))
        row["overhead_vs_ste"] = row["step_ms"] / ste["step_ms"] if row["config"].startswith("CAGE") else 1.0
    header = f"tiny GPT, {steps} steps x {args.batch} sequences of 128 bytes, compiler {compiler}"
    noise = abs(by_name["fp32 again"]["val_loss"] - fp)
    print(header)
    print_table(rows, [("config", "config", "<10"), ("val_loss", "val loss", ".4f"), ("gap_vs_fp", "gap vs fp", "+.4f"),
                       ("step_ms", "step ms", ".1f"), ("overhead_vs_ste", "step vs STE", ".2f")])
    w3, w4 = by_name["CAGE W3"]["gap_vs_fp"], by_name["STE W4"]["gap_vs_fp"]
    ste_w3 = by_name["STE W3"]["gap_vs_fp"]
    closed = (ste_w3 - w3) / (ste_w3 - w4) if ste_w3 != w4 else float("nan")
    claim = (f"CAGE W3 gap {w3:+.4f} vs STE W4 gap {w4:+.4f}: CAGE closes {closed:.0%} of the STE W3 -> W4 gap "
             f"({'reaches' if w3 <= w4 else 'does not reach'} STE W4)")
    claim += f"; two fp32 runs differ by {noise:.4f}"
    print(claim)
    result = {"header": header, "steps": steps, "rows": rows, "claim": claim, "run_to_run": noise}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
