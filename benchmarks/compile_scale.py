"""How capture and compile time grow with model size: the tiny GPT at 2, 8 and 32 layers.

    python -m benchmarks.compile_scale [--layers 2 8 32] [--compiler inductor] [--json PATH]

`capture_s` is dynamo's trace of the whole step plus lordo's role annotation and passes;
`compile_s` is the whole first call (capture, AOTAutograd, code generation, one step), from an
empty Inductor cache.
Capture must grow no faster than linearly in the parameter count: the table shows
capture seconds per million parameters, which should stay flat or fall.
"""

from __future__ import annotations

import argparse
import time

import torch

from lordo_compile.models import GPTConfig
from lordo_compile.testing import fresh_inductor_cache

from .common import batches, gpt_step, lordo_compile, print_table, write_json


def measure(layers: int, compiler: str, batch_size: int) -> dict:
    torch._dynamo.reset()
    cfg = GPTConfig(n_layer=layers)
    model, _, train_step = gpt_step(cfg)
    (x, y), = batches(cfg, batch_size, 1)
    step = lordo_compile(train_step, compiler=compiler)
    with fresh_inductor_cache():
        called = time.perf_counter()
        step(x, y)
    compile_s = time.perf_counter() - called
    timings = step.backend.timings
    dynamo_s = timings["backend_entered"] - called
    params = sum(p.numel() for p in model.parameters())
    return {
        "layers": layers,
        "params": params,
        "nodes": len(step.graphs["step"]["captured"].train_graph.graph.nodes),
        "dynamo_s": dynamo_s,
        "roles_and_passes_s": timings["capture_and_passes_s"],
        "capture_s": dynamo_s + timings["capture_and_passes_s"],
        "codegen_s": timings["codegen_s"],
        "compile_s": compile_s,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager", "eager"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = []
    for layers in args.layers:
        row = measure(layers, args.compiler, args.batch_size)
        row["capture_s_per_mparam"] = row["capture_s"] / (row["params"] / 1e6)
        row["capture_fraction"] = row["capture_s"] / row["compile_s"]
        rows.append(row)
        print(f"  {layers} layers done in {row['compile_s']:.1f} s", flush=True)
    print(f"compiler {args.compiler}, {torch.get_num_threads()} threads")
    print_table(rows, [
        ("layers", "layers", "d"), ("params", "params", ","), ("nodes", "fx nodes", "d"),
        ("dynamo_s", "dynamo s", ".2f"), ("roles_and_passes_s", "roles+pass s", ".3f"),
        ("capture_s_per_mparam", "capture s/M", ".2f"), ("compile_s", "compile s", ".1f"),
        ("capture_fraction", "capture frac", ".3f"),
    ])
    first, last = rows[0], rows[-1]
    growth = (last["capture_s"] / first["capture_s"]) / (last["params"] / first["params"])
    print(f"capture grew {last['capture_s'] / first['capture_s']:.1f}x for {last['params'] / first['params']:.1f}x "
          f"parameters (ratio {growth:.2f}; <= 1 is linear or better)")
    result = {"compiler": args.compiler, "sizes": rows, "capture_growth_vs_params": growth}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
