"""What 8- and 4-bit optimizer moments cost in loss: AdamW on the tiny GPT, paired seeds.

    python -m benchmarks.quantized_state [--only CONFIG ...] [--steps N] [--batch B] [--seeds 3]
                                         [--tuning-seeds 1] [--lrs LR ...] [--compiler inductor]
                                         [--jobs N] [--quick] [--json PATH]

Every row trains the same tiny GPT (per seed the same initialisation and batches, AdamW with
the warm-up and cosine schedule of `lordo-compile train`). "AdamW" holds its moments in
fp32; the other rows hold them through `QuantizedState` (torchao's maps and block sizes:
256 entries per scale at 8 bits, 128 at 4; moments under 4096 entries stay fp32). The loss
is that on the whole held-out split.

Each quantized row is compared, seed by seed (benchmarks/harness.py), with AdamW: the
claim of torchao's and bitsandbytes' 8-bit optimizers is that they train as fp32 state
does, within 1%. Every row's learning rate is tuned over the same sweep (`--lrs`, default
`harness.LRS`) on the tuning seeds. `--only NAME ...`: a partial run of the rows named; its
rows join those already in the --json of a run set up alike. Step times are not reported:
runs go side by side (`--jobs`), not round robin (`benchmarks.step_time` times steps).
`--quick`: 20 steps, aot_eager, 2 seeds, no tuning.
"""

from __future__ import annotations

import argparse

import lordo_compile as lc

from . import harness

BASELINE = "AdamW"
# The references' claim: a quantized moment trains as the fp32 one does.
TOLERANCE = 0.01


def configs(sweep: tuple[dict, ...], lr: float = harness.LR) -> list[harness.Config]:
    return [harness.Config(BASELINE, {"lr": lr, "bits": None}, None, sweep),
            harness.Config("AdamW 8-bit moments", {"lr": lr, "bits": 8}, BASELINE, sweep),
            harness.Config("AdamW 4-bit moments", {"lr": lr, "bits": 4}, BASELINE, sweep)]


def _policy(bits: int | None) -> lc.Policy:
    return lc.Policy() if bits is None else lc.Policy.quantized_state(bits=bits)


def claims(rows: list[dict]) -> list[str]:
    """Each quantized row against fp32 moments, where both ran (in one run or merged ones)."""
    base = {row["config"]: row for row in rows}.get(BASELINE)
    if base is None:
        return []
    return [harness.claim_line(harness.versus(rows, row["config"], BASELINE), tolerance=TOLERANCE * base["mean"],
                               label=f"{row['config']} within 1% of fp32 moments")
            for row in rows if row["config"] != BASELINE]


def main(argv=None) -> dict:
    args, steps, compiler = harness.tiny_gpt_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                                                      argv)
    every_config = configs(harness.lr_sweep(args, default=harness.LRS))
    rows, header = harness.compare_tiny_gpt(
        args, steps, compiler, every_config,
        lambda options: _policy(options["bits"]),
        lambda result: {"state_bytes": result.step.memory_report().state_bytes_after})
    for row in rows:
        row["state_bytes"] = row["runs"][0]["state_bytes"]
    harness.report(rows, header, [("state_bytes", "state B", ",")])
    print("\n".join(claims(rows)))
    return harness.save(args.json, header, rows, args, claims=claims, steps=steps, compiler=compiler,
                        configs=every_config)


if __name__ == "__main__":
    main()
