"""Step time of the tiny GPT: eager torch.optim vs plain torch.compile vs lordo_compile.

    python -m benchmarks.step_time [--steps 40] [--json PATH]

Every variant runs in one process on the same batches, and the timed steps go round
robin (one step of each variant in turn), so a change in the machine's load hits all of
them alike; ratios to plain torch.compile are what to read. The lordo rows: `Policy()`
with the defaults (deterministic kernels, the non-finite check), then with
`deterministic=False`, then with `on_nonfinite=None` (no check). `capture_fraction` is the share
of lordo's first call spent in dynamo tracing, role annotation and passes (the rest is
AOTAutograd + Inductor).
"""

from __future__ import annotations

import argparse
import time

import torch

import lordo_compile as lc
from lordo_compile.models import GPTConfig

from .common import batches, gpt_step, median_ms, print_table, write_json


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    cfg = GPTConfig()
    data = batches(cfg, args.batch_size, args.steps + args.warmup + 1)

    variants: dict[str, object] = {"eager torch.optim": gpt_step(cfg)[2],
                                   "torch.compile": torch.compile(gpt_step(cfg)[2])}
    lordo = {
        "lordo Policy()": dict(policy=lc.Policy()),
        "deterministic=False": dict(policy=lc.Policy(), deterministic=False),
        "on_nonfinite=None": dict(policy=lc.Policy(on_nonfinite=None)),
    }
    for name, options in lordo.items():
        variants[name] = lc.compile(gpt_step(cfg)[2], options.pop("policy"), **options)

    first: dict[str, float] = {}
    timings = {}
    for name, step in variants.items():
        called = time.perf_counter()
        step(*data[0])
        first[name] = time.perf_counter() - called
        if name == "lordo Policy()":
            backend = step.backend
            timings = dict(backend.timings, dynamo_s=backend.timings["backend_entered"] - called)

    times: dict[str, list[float]] = {name: [] for name in variants}
    for i, batch in enumerate(data[1:]):
        for name, step in variants.items():
            t0 = time.perf_counter()
            step(*batch)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    ms = {name: median_ms(t) for name, t in times.items()}
    capture_s = timings["dynamo_s"] + timings["capture_and_passes_s"]
    result = {
        "eager_ms": ms["eager torch.optim"],
        "torch_compile_ms": ms["torch.compile"],
        "lordo_ms": ms["lordo Policy()"],
        "lordo_nondeterministic_ms": ms["deterministic=False"],
        "lordo_unchecked_ms": ms["on_nonfinite=None"],
        "ratio_vs_torch_compile": ms["lordo Policy()"] / ms["torch.compile"],
        "ratio_vs_eager": ms["lordo Policy()"] / ms["eager torch.optim"],
        "deterministic_cost": ms["lordo Policy()"] / ms["deterministic=False"],
        "nonfinite_check_cost": ms["lordo Policy()"] / ms["on_nonfinite=None"],
        "torch_compile_first_call_s": first["torch.compile"],
        "lordo_first_call_s": first["lordo Policy()"],
        "lordo_dynamo_s": timings["dynamo_s"],
        "lordo_roles_and_passes_s": timings["capture_and_passes_s"],
        "lordo_codegen_s": timings["codegen_s"],
        "capture_fraction": capture_s / first["lordo Policy()"],
        "params": sum(p.numel() for p in gpt_step(cfg)[0].parameters()),
        "batch": [args.batch_size, cfg.block_size],
        "threads": torch.get_num_threads(),
    }
    rows = [{"variant": name, "ms": ms[name], "ratio": ms[name] / ms["torch.compile"], "first": first[name]}
            for name in variants]
    print(f"tiny GPT, {result['params']:,} parameters, batch {args.batch_size}x{cfg.block_size}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} round-robin steps")
    print_table(rows, [("variant", "variant", "<20"), ("ms", "ms/step", ".1f"),
                       ("ratio", "vs compile", ".3f"), ("first", "1st call s", ".1f")])
    print(f"lordo first call: dynamo {timings['dynamo_s']:.1f} s + roles/passes {timings['capture_and_passes_s']:.2f} s + "
          f"AOT/Inductor {timings['codegen_s']:.1f} s; capture_fraction {result['capture_fraction']:.3f}")
    print(f"deterministic kernels cost {result['deterministic_cost']:.3f}x; "
          f"the non-finite check costs {result['nonfinite_check_cost']:.3f}x")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
