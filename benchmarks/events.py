"""How a step with events runs: a graph per set of events, or one graph for every step.

    python -m benchmarks.events [--steps 20] [--rank 16] [--json PATH]

The tiny GPT with GaLore, whose projection refresh is an event. Three ways to run it,
each compiled by Inductor in a fresh cache:

- "graph per events" (what lordo_compile does): the ordinary step's graph and the refresh
  step's graph, compiled separately; a step runs the one its events ask for.
- "one graph, torch.cond": the refresh graph with each projection under
  `torch.cond(is_refresh, refresh, keep)`, one graph for every step.
- "one graph, computed always": the refresh graph computing the projection every step and
  keeping it only on refresh steps (`torch.where`).

Compile seconds are each way's total; step times are medians of the graphs called
directly (no dynamo guard or executor around them), round robin in one process, for an
ordinary step and a refresh step. Ratios to "graph per events" are what to read.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.fx as fx

import lordo_compile as lc
from lordo_compile.lowering import compile_phase
from lordo_compile.models import GPTConfig
from lordo_compile.ops.low_rank import projection_math
from lordo_compile.testing import fresh_inductor_cache

from .common import batches, gpt_step, print_table, write_json


def _predicated(pred, grad, previous, sketch, **options):
    def refresh(grad, previous, sketch):
        new, finite = projection_math(grad, previous, sketch, **options)
        # torch.cond needs both branches to return the same strides; the SVD's may be transposed.
        return new.contiguous(), finite

    def keep(grad, previous, sketch):
        return previous.clone(), torch.ones((), dtype=torch.bool, device=previous.device)

    return torch.cond(pred, refresh, keep, (grad, previous, sketch))


def _always(pred, grad, previous, sketch, **options):
    new, finite = projection_math(grad, previous, sketch, **options)
    return torch.where(pred, new, previous), finite | ~pred


def _one_graph(lowered: fx.GraphModule, how) -> fx.GraphModule:
    """The refresh graph with a last input `is_refresh` deciding whether projections change."""
    graph = fx.Graph()
    output = graph.graph_copy(lowered.graph, {})
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        pred = graph.placeholder("is_refresh")
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is projection_math:
            options = dict(node.kwargs)
            node.target = lambda p, g, prev, s, _options=options: how(p, g, prev, s, **_options)
            node.args = (pred, *node.args)
            node.kwargs = {}
    graph.output(output)
    return fx.GraphModule(lowered, graph)


def _compile(module: fx.GraphModule, inputs: list) -> tuple[object, float]:
    with fresh_inductor_cache():
        started = time.perf_counter()
        fn = compile_phase(module, inputs, "inductor", lambda graph: None)
        return fn, time.perf_counter() - started


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    cfg = GPTConfig()
    data = batches(cfg, args.batch_size, 2)
    _, _, train_step = gpt_step(cfg)
    # Captured and rewritten by lordo_compile; compiled below by each way in turn.
    step = lc.compile(train_step, lc.Policy.galore(rank=args.rank, update_proj_gap=10_000), compiler="aot_eager")
    step(*data[0])
    graphs = step.backend.executor.graphs
    ordinary = graphs[frozenset()]
    seen = {}
    build = ordinary.build

    def recording(call_args):
        seen["args"] = call_args
        return build(call_args)

    ordinary.build = recording
    step(*data[1])
    dynamo_args = list(seen["args"])
    runtime = step.backend.runtime
    lowered = {name: step.graphs[name]["lowered"].module for name in ("step", "refresh")}
    state = {name: runtime.inputs(graphs[frozenset() if name == "step" else frozenset({"refresh"})].state_names)
             for name in ("step", "refresh")}
    yes, no = torch.tensor(True), torch.tensor(False)

    step_fn, step_s = _compile(lowered["step"], dynamo_args + state["step"])
    refresh_fn, refresh_s = _compile(lowered["refresh"], dynamo_args + state["refresh"])
    ways = {
        "graph per events": (step_s + refresh_s,
                             lambda: step_fn(*dynamo_args, *state["step"]),
                             lambda: refresh_fn(*dynamo_args, *state["refresh"])),
    }
    failed = {}
    for name, how in (("one graph, torch.cond", _predicated), ("one graph, computed always", _always)):
        module = _one_graph(lowered["refresh"], how)
        try:
            fn, seconds = _compile(module, dynamo_args + state["refresh"] + [no])
        except Exception as error:  # a way Inductor cannot compile is a result of this benchmark, reported below
            failed[name] = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
            continue
        ways[name] = (seconds, lambda fn=fn: fn(*dynamo_args, *state["refresh"], no),
                      lambda fn=fn: fn(*dynamo_args, *state["refresh"], yes))

    times = {(name, kind): [] for name in ways for kind in ("ordinary", "refresh")}
    for i in range(args.steps + args.warmup):
        for name, (_, ordinary_call, refresh_call) in ways.items():
            for kind, call in (("ordinary", ordinary_call), ("refresh", refresh_call)):
                started = time.perf_counter()
                call()
                if i >= args.warmup:
                    times[(name, kind)].append(time.perf_counter() - started)

    ms = {key: statistics.median(values) * 1e3 for key, values in times.items()}
    base = "graph per events"
    rows = [{"way": name, "compile_s": seconds, "compile_ratio": seconds / ways[base][0],
             "ordinary_ms": ms[(name, "ordinary")], "ordinary_ratio": ms[(name, "ordinary")] / ms[(base, "ordinary")],
             "refresh_ms": ms[(name, "refresh")], "refresh_ratio": ms[(name, "refresh")] / ms[(base, "refresh")]}
            for name, (seconds, _, _) in ways.items()]
    print(f"tiny GPT, GaLore rank {args.rank}, batch {args.batch_size}x{cfg.block_size}, {torch.get_num_threads()} "
          f"threads, Inductor; median of {args.steps} round-robin calls of each graph")
    print_table(rows, [("way", "way", "<26"), ("compile_s", "compile s", ".1f"), ("compile_ratio", "vs", ".2f"),
                       ("ordinary_ms", "ordinary ms", ".1f"), ("ordinary_ratio", "vs", ".3f"),
                       ("refresh_ms", "refresh ms", ".1f"), ("refresh_ratio", "vs", ".3f")])
    for name, error in failed.items():
        print(f"{name}: Inductor could not compile it ({error})")
    result = {"rows": rows, "failed": failed, "rank": args.rank, "steps": args.steps,
              "threads": torch.get_num_threads(),
              "batch": [args.batch_size, cfg.block_size]}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
