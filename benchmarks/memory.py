"""Persistent bytes per parameter of each policy on the tiny GPT, counted from the tensors held.

    python -m benchmarks.memory [--json PATH]

Each policy compiles the tiny GPT's AdamW step (aot_eager: what is held between steps does
not depend on the code generator), takes one step, and reads `step.memory_report()`: the
weights as stored (ECO's codes and scales instead of fp32), the optimizer's state and the
state passes declared (8- or 4-bit moments: codes, per-block scales and the two maps).
Gradients are not counted: they do not persist between steps. `vs AdamW` divides the
optimizer state by plain AdamW's (8 bytes of moments and a step counter per tensor).
Peak memory during a step is not measured here yet.
"""

from __future__ import annotations

import argparse

import torch

import lordo_compile as lc
from lordo_compile.experiment import RunConfig, train_tiny_gpt

from .common import print_table, write_json

POLICIES = {
    "AdamW": lc.Policy(),
    "AdamW 8-bit moments": lc.Policy.quantized_state(bits=8),
    "AdamW 4-bit moments": lc.Policy.quantized_state(bits=4),
    "GaLore r=16": lc.Policy.galore(16),
    "GaLore r=16 + 8-bit moments": lc.Policy(low_rank=lc.LowRank(rank=16), quantized_state=lc.QuantizedState()),
    "ECO fp8": lc.Policy.eco(format="fp8_e4m3"),
    "ECO fp8 + 8-bit moments": lc.Policy(eco=lc.ECO(format="fp8_e4m3"), quantized_state=lc.QuantizedState()),
}


def measure(policy: lc.Policy) -> dict:
    result = train_tiny_gpt(policy, RunConfig(steps=1, val_batches=0, eval_every=0, compiler="aot_eager"))
    report = result.step.memory_report()
    params = sum(p.numel() for p in result.model.parameters())
    return {"weight_bytes": report.weight_bytes, "state_bytes": report.state_bytes_after, "parameters": params,
            "persistent_bytes_per_param": (report.weight_bytes + report.state_bytes_after) / params}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows = [{"policy": name, "describe": policy.describe(), **measure(policy)} for name, policy in POLICIES.items()]
    adamw = rows[0]["state_bytes"]
    for row in rows:
        row["state_vs_adamw"] = row["state_bytes"] / adamw
    print(f"tiny GPT ({rows[0]['parameters']:,} parameters), AdamW, persistent bytes after one step; "
          f"torch {torch.__version__}")
    print_table(rows, [("policy", "policy", "<"), ("weight_bytes", "weights B", ","), ("state_bytes", "state B", ","),
                       ("persistent_bytes_per_param", "bytes/param", ".2f"), ("state_vs_adamw", "state vs AdamW", ".3f")])
    write_json(args.json, {"rows": rows})
    return rows


if __name__ == "__main__":
    main()
