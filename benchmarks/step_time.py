"""Step time of the tiny GPT: eager torch.optim vs plain torch.compile vs lordo_compile.

    python -m benchmarks.step_time [--steps 40] [--json PATH]

All three run in one process on the same batches; ratios are what to read (this
machine is noisy). `capture_fraction` is the share of lordo's first call spent in
dynamo tracing, role annotation and passes (the rest is AOTAutograd + Inductor).
"""

from __future__ import annotations

import argparse
import time

import torch

from lordo_compile.models import GPTConfig

from .common import batches, gpt_step, lordo_compile, median_ms, print_table, time_steps, write_json


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    cfg = GPTConfig()
    data = batches(cfg, args.batch_size, args.steps + args.warmup + 1)

    _, _, eager = gpt_step(cfg)
    eager_first, eager_times = time_steps(eager, data, args.warmup)

    _, _, plain = gpt_step(cfg)
    plain_compiled = torch.compile(plain)
    plain_first, plain_times = time_steps(plain_compiled, data, args.warmup)
    torch._dynamo.reset()

    _, _, ours = gpt_step(cfg)
    step = lordo_compile(ours)
    called = time.perf_counter()
    t0 = time.perf_counter()
    step(*data[0])
    lordo_first = time.perf_counter() - t0
    timings = step.backend.timings
    dynamo_s = timings["backend_entered"] - called
    capture_s = dynamo_s + timings["capture_and_passes_s"]
    _, lordo_times = time_steps(step, data[1:], args.warmup - 1)

    result = {
        "eager_ms": median_ms(eager_times),
        "torch_compile_ms": median_ms(plain_times),
        "lordo_ms": median_ms(lordo_times),
        "ratio_vs_torch_compile": median_ms(lordo_times) / median_ms(plain_times),
        "ratio_vs_eager": median_ms(lordo_times) / median_ms(eager_times),
        "torch_compile_first_call_s": plain_first,
        "lordo_first_call_s": lordo_first,
        "lordo_dynamo_s": dynamo_s,
        "lordo_roles_and_passes_s": timings["capture_and_passes_s"],
        "lordo_codegen_s": timings["codegen_s"],
        "capture_fraction": capture_s / lordo_first,
        "params": sum(p.numel() for p in gpt_step(cfg)[0].parameters()),
        "batch": [args.batch_size, cfg.block_size],
        "threads": torch.get_num_threads(),
    }
    rows = [
        {"variant": "eager torch.optim", "ms": result["eager_ms"], "ratio": result["eager_ms"] / result["torch_compile_ms"], "first": eager_first},
        {"variant": "torch.compile", "ms": result["torch_compile_ms"], "ratio": 1.0, "first": plain_first},
        {"variant": "lordo Policy()", "ms": result["lordo_ms"], "ratio": result["ratio_vs_torch_compile"], "first": lordo_first},
    ]
    print(f"tiny GPT, {result['params']:,} parameters, batch {args.batch_size}x{cfg.block_size}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")
    print_table(rows, [("variant", "variant", "<18"), ("ms", "ms/step", ".1f"),
                       ("ratio", "vs compile", ".3f"), ("first", "1st call s", ".1f")])
    print(f"lordo first call: dynamo {dynamo_s:.1f} s + roles/passes {timings['capture_and_passes_s']:.2f} s + "
          f"AOT/Inductor {timings['codegen_s']:.1f} s; capture_fraction {result['capture_fraction']:.3f}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
