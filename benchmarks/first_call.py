"""Where a cold first call's time goes: lordo `Policy()` against PyTorch's compile recipe, by phase.

    python -m benchmarks.first_call [--repeats 3] [--quick] [--json PATH]
        [--warm | [--in-process] [--variants VARIANT ...]]

Variants, each a fresh tiny GPT with AdamW (batch 16x128), built as benchmarks.step_time builds them:
- "torch.compile recipe": `torch.compile(model.loss)`, eager `loss.backward()`, a compiled
  `opt.step()`;
- "lordo Policy()": the whole step as one graph, as shipped;
- "lordo, writes at the end": without `lowering.write_inputs_when_computed` (the state writes
  stay where AOTAutograd puts them, at the end of the graph);
- "lordo, scalars inlined": without `lowering.compute_scalars_once` (each bias correction
  inlined into the loops that read it);
- "lordo, fusion search 64": with Inductor's own `max_fusion_buffer_group_pairwise_attempts`
  (64) instead of `lowering.INDUCTOR_CONFIG`'s;
- "lordo, none of the three": the lowering before these choices;
- "lordo, kernel groups unbounded": without `lowering.CPU_KERNEL_GROUP_ARGS` (Inductor's own
  bound on a C++ function's arguments, 500, so fewer functions for the C++ compiler);
- "lordo, dtype rules per op": without `lowering.dtype_rules_built_once` (Inductor builds its
  dtype propagation rules again for each op it writes).
The last six turn those choices off for the call (`lordo_compile.testing.lowering_without`):
an ablation, not an option users have.

Every first call is cold: each in a new Python process with an empty Inductor cache directory,
as a job starts; the variants go round robin, `--repeats` times, and each figure is the median
over the repeats. A process's one-time costs so fall on every variant alike, and a variant's
figure does not depend on what ran before it. `--in-process`: all first calls in this one
process instead (dynamo reset and a fresh cache directory before each; the first variant pays
the process's one-time costs). `--variants` picks some of them (the recipe always runs: ratios
are to it). Phases are
Inductor's and AOTAutograd's own timers (`torch._dynamo.utils.compilation_time_metrics`), summed
over the graphs of a call (the recipe has three: the loss's forward and backward, and the
update): `aot_s` AOTAutograd and Inductor together, `lowering_s` Inductor's lowering of the aten
graph to its IR (`GraphLowering.run`), `scheduler_s` node creation and fusion
(`Scheduler.__init__`), `kernel_codegen_s` kernel source (`Scheduler.codegen`), `cpp_wait_s` the
wait for the C++ compiler's workers (`async_compile.wait`). `scheduler_nodes`: the nodes Inductor's
scheduler starts from, over the call's graphs; `cpp_functions`: the C++ functions the generated code
asks for (compiled, or loaded from the cache). `ratio_vs_recipe`: median of the paired ratios of
first-call seconds.

`--warm`: instead, the first call of a new process whose Inductor cache an earlier process
filled, as when a training job starts again (for the recipe and `Policy()`, round robin): each
repeat runs one process that compiles cold into a new cache directory, then one that compiles
again from it and is timed (`warm_s`; the filling process's call is `cold_s`). `ratio_vs_recipe`
is then the median of the paired ratios of warm first calls.

`--quick`: a smoke run (a 2-layer GPT of width 32, one repeat).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

import torch
from torch._dynamo.utils import compilation_time_metrics

import lordo_compile as lc
from lordo_compile.models import GPTConfig, TinyGPT
from lordo_compile.testing import counting_calls, counting_scheduler_nodes, fresh_inductor_cache, lowering_without

from .common import QUICK_GPT, batches, print_table, write_json
from .step_time import LORDO, RECIPE, lordo, recipe

PHASES = {"aot_s": "create_aot_dispatcher_function", "lowering_s": "GraphLowering.run",
          "scheduler_s": "Scheduler.__init__", "kernel_codegen_s": "Scheduler.codegen",
          "cpp_wait_s": "async_compile.wait"}


CPU = torch.device("cpu")


def lordo_policy(cfg: GPTConfig) -> Callable:
    return lordo(cfg, CPU, lc.Policy())


# Each variant: how to build its step, and the lowering choices it turns off.
VARIANTS = {
    RECIPE: (lambda cfg: recipe(cfg, CPU), ()),
    LORDO: (lordo_policy, ()),
    "lordo, writes at the end": (lordo_policy, ("write_inputs_when_computed",)),
    "lordo, scalars inlined": (lordo_policy, ("compute_scalars_once",)),
    "lordo, fusion search 64": (lordo_policy, ("INDUCTOR_CONFIG",)),
    "lordo, none of the three": (lordo_policy, ("write_inputs_when_computed", "compute_scalars_once", "INDUCTOR_CONFIG")),
    "lordo, kernel groups unbounded": (lordo_policy, ("CPU_KERNEL_GROUP_ARGS",)),
    "lordo, dtype rules per op": (lordo_policy, ("dtype_rules_built_once",)),
}


def counting_cpp_functions(counts: list[int]):
    """Inside, each C++ function Inductor hands its compiler appends 1 to `counts`."""
    from torch._inductor.async_compile import AsyncCompile

    return counting_calls(AsyncCompile, "cpp_pybinding", counts)


def first_call(cfg: GPTConfig, name: str, batch, fresh_cache: bool = True) -> dict:
    """The first call of the variant `name`'s step, by phase; with `fresh_cache`, from an empty
    Inductor cache, else from the one the process was given."""
    make, turned_off = VARIANTS[name]
    torch._dynamo.reset()
    compilation_time_metrics.clear()
    counts: list[int] = []
    functions: list[int] = []
    with lowering_without(*turned_off):
        step = make(cfg)
        with fresh_inductor_cache() if fresh_cache else contextlib.nullcontext(), counting_scheduler_nodes(counts), \
                counting_cpp_functions(functions):
            started = time.perf_counter()
            step(*batch)
            seconds = time.perf_counter() - started
    figures = {key: sum(compilation_time_metrics.get(timer, [0.0])) for key, timer in PHASES.items()}
    return {"first_call_s": seconds, **figures, "scheduler_nodes": sum(counts), "cpp_functions": len(functions)}


WARM_VARIANTS = (RECIPE, LORDO)


def in_new_process(name: str, cache: str, quick: bool) -> dict:
    """`first_call` of the variant `name` in a new Python process with the Inductor cache `cache`."""
    command = [sys.executable, "-m", "benchmarks.first_call", "--one", name, *(["--quick"] if quick else [])]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    if done.returncode:
        raise RuntimeError(f"the first call of {name!r} failed in its process:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def in_fresh_process(name: str, quick: bool) -> dict:
    """A cold first call of the variant `name` in a new process with an empty cache directory."""
    with tempfile.TemporaryDirectory(prefix="lordo-first-call-") as cache:
        return in_new_process(name, cache, quick)


def cold_then_warm(name: str, quick: bool) -> dict:
    """The first call of a new process whose cache an earlier new process filled (`warm_s`),
    with that earlier process's cold call (`cold_s`)."""
    with tempfile.TemporaryDirectory(prefix="lordo-first-call-") as cache:
        cold = in_new_process(name, cache, quick)
        warm = in_new_process(name, cache, quick)
    return {**warm, "cold_s": cold["first_call_s"], "warm_s": warm["first_call_s"]}


def round_robin(names: Sequence[str], repeats: int, measure: Callable[[str], dict], timed: str) -> list[dict]:
    """`measure` each variant in turn, `repeats` times; a row per variant, as `summarized`."""
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names:
            runs[name].append(measure(name))
            print(f"  repeat {repeat + 1}: {name} {runs[name][-1][timed]:.1f} s", flush=True)
    return summarized(runs, timed)


def summarized(runs: dict[str, list[dict]], timed: str) -> list[dict]:
    rows = []
    for name, calls in runs.items():
        row = {"variant": name, **{key: statistics.median(call[key] for call in calls) for key in calls[0]},
               "first_calls_s": [call[timed] for call in calls]}
        row["ratio_vs_recipe"] = statistics.median(
            call[timed] / recipe_call[timed] for call, recipe_call in zip(calls, runs[RECIPE]))
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--warm", action="store_true", help="first calls from a cache an earlier process filled")
    parser.add_argument("--in-process", action="store_true",
                        help="every cold first call in this process (default: each in a new one)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, metavar="VARIANT",
                        help="some of the variants (the recipe always runs): " + "; ".join(VARIANTS))
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    cfg, batch_size = (QUICK_GPT, 2) if args.quick else (GPTConfig(), 16)
    if args.quick:
        args.repeats = 1
    (batch,) = batches(cfg, batch_size, 1)
    if args.one:
        print(json.dumps(first_call(cfg, args.one, batch, fresh_cache=False)))
        return {}
    names = [RECIPE, *[name for name in VARIANTS if name != RECIPE and name in (args.variants or VARIANTS)]]
    if args.warm and (args.variants or args.in_process):
        parser.error("--warm times the recipe and Policy() in new processes already; "
                     "drop --variants and --in-process")
    if args.warm:
        rows = round_robin(WARM_VARIANTS, args.repeats, lambda name: cold_then_warm(name, args.quick), "warm_s")
    elif args.in_process:
        rows = round_robin(names, args.repeats, lambda name: first_call(cfg, name, batch), "first_call_s")
    else:
        rows = round_robin(names, args.repeats, lambda name: in_fresh_process(name, args.quick), "first_call_s")
    print(f"\ntiny GPT ({sum(p.numel() for p in TinyGPT(cfg).parameters()):,} parameters), batch {batch_size}x"
          f"{cfg.block_size}, AdamW, {torch.get_num_threads()} threads: "
          + ("first calls of a new process from a filled cache" if args.warm
             else "cold first calls in this process" if args.in_process else "cold first calls, each in a new process")
          + f", median of {args.repeats} round-robin repeats")
    extra = [("cold_s", "cold s", ".1f")] if args.warm else []
    print_table(rows, [("variant", "variant", "<26"), ("first_call_s", "1st call s", ".1f"), *extra,
                       ("ratio_vs_recipe", "vs recipe", ".3f"), ("aot_s", "AOT+Inductor s", ".1f"),
                       ("lowering_s", "lowering s", ".1f"), ("scheduler_s", "scheduler s", ".1f"),
                       ("kernel_codegen_s", "kernels s", ".1f"), ("cpp_wait_s", "C++ wait s", ".1f"),
                       ("scheduler_nodes", "sched. nodes", ".0f"), ("cpp_functions", "C++ functions", ".0f")])
    by_variant = {row["variant"]: row for row in rows}
    key = "warm_first_call_ratio_vs_torch_compile" if args.warm else "first_call_ratio_vs_torch_compile"
    result = {"rows": rows, "repeats": args.repeats, "batch": [batch_size, cfg.block_size], "warm": args.warm,
              "fresh_processes": not (args.warm or args.in_process),
              key: by_variant[LORDO]["ratio_vs_recipe"] if LORDO in by_variant else None, "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
