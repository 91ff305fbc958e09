"""CAGE against plain straight-through QAT: validation loss at 4 and 3 bits, tiny GPT.

    python -m benchmarks.cage [--only CONFIG ...] [--steps N] [--batch B] [--seeds 3] [--tuning-seeds 1]
                              [--lrs LR ...] [--compiler inductor] [--jobs N] [--quick] [--json PATH]

Every row trains the same tiny GPT (per seed the same initialisation and batches, AdamW with
the warm-up and cosine schedule of `lordo-compile train`) with its linear weights
fake-quantized per row (RMS-Gaussian scale, Hadamard-rotated rows: QuEST's quantizer),
except the full-precision row. CAGE adds the decoupled correction with the paper's defaults
(lambda 10, silence ratio 0.8, linear ramp). The W4A4 rows also quantize every linear
layer's input per token. The loss is that of the quantized model on the whole held-out split.

Each row is compared, seed by seed (benchmarks/harness.py), with the one baseline the
paper's claims read it against:

- STE W4 and STE W4A4 against fp32: what quantizing costs (expected: higher);
- STE W3 against STE W4: the 3-to-4-bit gap that CAGE W3 is to close (expected: higher);
- CAGE W4 against STE W4 and CAGE W4A4 against STE W4A4: CAGE beats STE at the same bits;
- CAGE W3 against STE W4: the paper's claim, CAGE at 3 bits reaches STE at 4 (expected: lower).

Every row's learning rate is tuned over the same sweep (`--lrs`, default `harness.LRS`) on
the tuning seeds. `--only NAME ...`: a partial run of the rows named (a claim's two rows);
its rows join those already in the --json of a run set up alike. Step times are not
reported here: runs go side by side (`--jobs`), not round robin. `--quick`: 20 steps,
aot_eager, 2 seeds, no tuning.
"""

from __future__ import annotations

import argparse

import lordo_compile as lc

from . import harness

# The side of its baseline each row should land on: quantizing (and fewer bits) costs loss,
# CAGE wins some of it back.
EXPECTED = {"STE W4": "higher", "STE W3": "higher", "STE W4A4": "higher",
            "CAGE W4": "lower", "CAGE W3": "lower", "CAGE W4A4": "lower"}


def configs(sweep: tuple[dict, ...], lr: float = harness.LR) -> list[harness.Config]:
    def config(name, baseline=None, bits=None, activation_bits=None, cage=False):
        options = dict(lr=lr, bits=bits, activation_bits=activation_bits, cage=cage)
        return harness.Config(name, options, baseline, sweep)

    return [
        config("fp32"),
        config("STE W4", "fp32", bits=4),
        config("CAGE W4", "STE W4", bits=4, cage=True),
        config("STE W3", "STE W4", bits=3),
        config("CAGE W3", "STE W4", bits=3, cage=True),
        config("STE W4A4", "fp32", bits=4, activation_bits=4),
        config("CAGE W4A4", "STE W4A4", bits=4, activation_bits=4, cage=True),
    ]


def _policy(options: dict, steps: int) -> lc.Policy:
    if options["bits"] is None:
        return lc.Policy()
    quant = dict(bits=options["bits"], quantizer="rms_gaussian", hadamard=True,
                 activation_bits=options["activation_bits"])
    if options["cage"]:
        return lc.Policy.cage(total_steps=steps, **quant)
    return lc.Policy(fake_quant=lc.FakeQuant(**quant))


def claims(rows: list[dict]) -> list[str]:
    """Each row against its baseline, where both ran (all, unless --only chose some)."""
    ran = {row["config"] for row in rows}
    return [harness.claim_line(harness.versus(rows, row["config"], row["baseline"]), better=EXPECTED[row["config"]],
                               label=f"{row['config']} vs {row['baseline']} (expected {EXPECTED[row['config']]})")
            for row in rows if row["baseline"] in ran]


def main(argv=None) -> dict:
    args, steps, compiler = harness.tiny_gpt_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                                                      argv)
    every_config = configs(harness.lr_sweep(args, default=harness.LRS))
    rows, header = harness.compare_tiny_gpt(args, steps, compiler, every_config,
                                            lambda options: _policy(options, steps))
    harness.report(rows, header)
    print("\n".join(claims(rows)))
    return harness.save(args.json, header, rows, args, claims=claims, steps=steps, compiler=compiler,
                        configs=every_config)


if __name__ == "__main__":
    main()
