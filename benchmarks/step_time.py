"""Step time of the tiny GPT: lordo_compile against the strongest peers and the machine's matmul peak.

    python -m benchmarks.step_time [--steps 40] [--batch-sizes 16 1] [--modes default ...] [--first-calls 3]
                                   [--device cpu|cuda] [--quick] [--json PATH]

Peers, each a fresh model with the same initialisation on the same batches:
- "eager AdamW": torch.optim.AdamW as it comes (for-loop on CPU, foreach on CUDA);
- "eager fused AdamW": `AdamW(fused=True)`; its `opt.step()` is also timed on its own,
  which gives `update_share`, the optimizer's share of a step;
- "torch.compile recipe": PyTorch's: `torch.compile(model.loss)`, an eager
  `loss.backward()` (AOTAutograd's compiled backward), and a compiled `opt.step()`;
- "compiled autograd": the recipe with the backward traced by compiled autograd
  (`torch._dynamo.compiled_autograd`), where it runs; where it fails, the error is in the
  JSON (`compiled_autograd_error`) and the row is left out.
lordo rows: `Policy()` (deterministic kernels, the non-finite check), and at the first
batch size also `deterministic=False`, `on_nonfinite=None`, and on the CPU "lordo, scalars
inlined": `Policy()` compiled without `lowering.compute_scalars_once` (an ablation through
`lordo_compile.testing.lowering_without`; `scalars_once_gain` is `Policy()`'s time over its),
and "lordo, kernel groups unbounded": `Policy()` without `lowering.CPU_KERNEL_GROUP_ARGS`
(`kernel_group_bound_cost`, the same ratio).
`--modes` adds, for each mode other than "default", the recipe (with and without compiled
autograd) and `Policy()` compiled with that mode. The JSON is written after each batch size.

Per batch size every variant's timed steps go round robin (one step of each in turn, the
device synchronised around each), so a change in the machine's load hits all alike; ratios
are what to read. `best_peer` is the fastest peer, `ratio_vs_best_peer` lordo `Policy()`'s
time over its. Each variant's first call runs in a fresh Inductor cache (cold, dynamo
included). A first call varies by 10-20% from run to run on this machine, so at the first
batch size `Policy()` and the recipe make `--first-calls` cold first calls each, round robin
(dynamo reset before each; `first_calls_s`, the variants' first pass first), and
`first_call_ratio_vs_torch_compile` is the median of the paired ratios of the repeats
(`first_call_ratios`): in the first pass the recipe, compiled first, also pays the
process's one-time costs. At later batch sizes it is the first pass's pair.
`capture_fraction` is the share of lordo's first call spent in dynamo, role annotation and
passes (the rest is AOTAutograd + Inductor).

GFLOP/s: one step's model FLOPs (matmuls and attention, forward and backward, counted by
`torch.utils.flop_counter` on an eager step) over its time, against the machine's peak
measured in the same run: the best of 10 timed fp32 n x n matmuls (n = 1024 on CPU, 8192
on CUDA) with the same threads.

`--quick`: a smoke run (a 2-layer GPT of width 32, 4 steps, batch sizes 2 and 1, 2 first calls).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

import lordo_compile as lc
from lordo_compile.lowering import MODES, uses_cuda_graphs
from lordo_compile.models import GPTConfig, TinyGPT
from lordo_compile.testing import fresh_inductor_cache, lowering_without, training_step

from .common import QUICK_GPT, batches, median_ms, print_table, timing_arguments, write_json

RECIPE = "torch.compile recipe"
PEERS = ("eager AdamW", "eager fused AdamW", RECIPE, "compiled autograd")
LORDO = "lordo Policy()"
SCALARS_INLINED = "lordo, scalars inlined"
GROUPS_UNBOUNDED = "lordo, kernel groups unbounded"


class Clock:
    """Wall time that waits for the device first (a CUDA step returns before it has run)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def model_and_optimizer(cfg: GPTConfig, device: torch.device, **adamw):
    torch.manual_seed(0)
    model = TinyGPT(cfg).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, **adamw)


def eager_fused(cfg: GPTConfig, device: torch.device, update_times: list[Callable[[], float]]) -> Callable:
    """Eager fused AdamW; each step appends a function giving its `opt.step()`'s seconds (on a
    GPU from CUDA events, read after the timed loop: a synchronisation inside the step would
    slow this peer down)."""
    model, opt = model_and_optimizer(cfg, device, fused=True)

    def step(x, y):
        loss = model.loss(x, y)
        loss.backward()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            opt.step()
            end.record()
            update_times.append(lambda: start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - started
            update_times.append(lambda: elapsed)
        opt.zero_grad()
        return loss.detach()

    return step


def recipe(cfg: GPTConfig, device: torch.device, mode: str | None = None, compiled_autograd: bool = False) -> Callable:
    """PyTorch's way of compiling a training step: the model and `opt.step()` compiled apart."""
    model, opt = model_and_optimizer(cfg, device)
    loss_fn = torch.compile(model.loss, mode=mode)

    @torch.compile(mode=mode)
    def update():
        opt.step()

    def backward(loss):
        if not compiled_autograd:
            loss.backward()
            return
        from torch._dynamo import compiled_autograd as ca

        with ca._enable(torch.compile(mode=mode)):
            loss.backward()

    cuda_graphs = uses_cuda_graphs(mode, device)

    def step(x, y):
        if cuda_graphs:  # torch.compile's documented call for a training loop under CUDA graphs
            torch.compiler.cudagraph_mark_step_begin()
        loss = loss_fn(x, y)
        backward(loss)
        update()
        opt.zero_grad()
        return loss.detach()

    return step


def lordo(cfg: GPTConfig, device: torch.device, policy: lc.Policy, **options) -> Callable:
    model, opt = model_and_optimizer(cfg, device)
    return lc.compile(training_step(model.loss, opt), policy, **options)


def without_lowering_choice(step: Callable, choice: str) -> Callable:
    """`step`, compiled (at its first call) without one of the lowering's choices; the calls
    after it go straight to the compiled step."""
    compiled = False

    def call(*args):
        nonlocal compiled
        if compiled:
            return step(*args)
        with lowering_without(choice):
            out = step(*args)
        compiled = True
        return out
    return call


def step_flops(cfg: GPTConfig, device: torch.device, batch: tuple) -> int:
    model, _ = model_and_optimizer(cfg, device)
    with FlopCounterMode(display=False) as counter:
        model.loss(*batch).backward()
    return counter.get_total_flops()


def matmul_peak_gflops(device: torch.device, clock: Clock) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        started = clock()
        a @ b
        best = min(best, clock() - started)
    return 2 * n**3 / best / 1e9


def eager(cfg: GPTConfig, device: torch.device) -> Callable:
    model, opt = model_and_optimizer(cfg, device)
    return training_step(model.loss, opt)


def variants_at(cfg: GPTConfig, device: torch.device, first_section: bool, modes: list[str],
                update_times: list[Callable[[], float]]) -> dict[str, Callable]:
    variants = {
        "eager AdamW": eager(cfg, device),
        "eager fused AdamW": eager_fused(cfg, device, update_times),
        RECIPE: recipe(cfg, device),
        "compiled autograd": recipe(cfg, device, compiled_autograd=True),
        LORDO: lordo(cfg, device, lc.Policy()),
    }
    if first_section:
        variants["lordo deterministic=False"] = lordo(cfg, device, lc.Policy(), deterministic=False)
        variants["lordo on_nonfinite=None"] = lordo(cfg, device, lc.Policy(on_nonfinite=None))
        if device.type == "cpu":  # the choice only applies to CPU loops
            variants[SCALARS_INLINED] = without_lowering_choice(lordo(cfg, device, lc.Policy()), "compute_scalars_once")
            variants[GROUPS_UNBOUNDED] = without_lowering_choice(lordo(cfg, device, lc.Policy()), "CPU_KERNEL_GROUP_ARGS")
        for mode in modes:
            if mode != "default":
                variants[f"{RECIPE} [{mode}]"] = recipe(cfg, device, mode=mode)
                variants[f"compiled autograd [{mode}]"] = recipe(cfg, device, mode=mode, compiled_autograd=True)
                variants[f"{LORDO} [{mode}]"] = lordo(cfg, device, lc.Policy(), mode=mode)
    return variants


def section(cfg: GPTConfig, device: torch.device, clock: Clock, batch_size: int, args, first_section: bool,
            peak: float) -> tuple[dict, list[dict]]:
    """One batch size: first calls (cold), then round-robin timed steps; its figures and rows."""
    torch._dynamo.reset()
    data = [tuple(t.to(device) for t in batch)
            for batch in batches(cfg, batch_size, args.steps + args.warmup + 1)]
    update_times: list[Callable[[], float]] = []
    variants = variants_at(cfg, device, first_section, args.modes, update_times)
    first: dict[str, float] = {}
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}
    for name, step in list(variants.items()):
        called = clock()
        try:
            with fresh_inductor_cache():
                step(*data[0])
        except Exception as error:  # a peer that does not run here is reported, not fatal
            if name in (LORDO, "eager AdamW"):
                raise
            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            print(f"{name}: did not run here: {errors[name]}", flush=True)
            del variants[name]
            continue
        first[name] = clock() - called
        print(f"{name}: first call {first[name]:.1f} s", flush=True)
        if name == LORDO:
            backend = step.backend
            timings = dict(backend.timings, dynamo_s=backend.timings["backend_entered"] - called)
    update_times.clear()

    times: dict[str, list[float]] = {name: [] for name in variants}
    for i, batch in enumerate(data[1:]):
        for name, step in variants.items():
            started = clock()
            step(*batch)
            if i >= args.warmup:
                times[name].append(clock() - started)
    ms = {name: median_ms(t) for name, t in times.items()}
    first_calls = {RECIPE: [first[RECIPE]], LORDO: [first[LORDO]]}
    for _ in range(args.first_calls - 1 if first_section else 0):
        for name, build in ((RECIPE, lambda: recipe(cfg, device)), (LORDO, lambda: lordo(cfg, device, lc.Policy()))):
            torch._dynamo.reset()
            again = build()
            called = clock()
            with fresh_inductor_cache():
                again(*data[0])
            first_calls[name].append(clock() - called)
    # The variants' first pass leaves the process's one-time costs (Inductor's imports, its
    # compile workers) to the recipe, the first compiled variant; repeats pair like with like.
    repeats = slice(1, None) if len(first_calls[LORDO]) > 1 else slice(None)
    first_call_ratios = [ours / theirs
                         for ours, theirs in zip(first_calls[LORDO][repeats], first_calls[RECIPE][repeats])]
    clock()
    update_ms = median_ms([seconds() for seconds in update_times])
    peers = {name: ms[name] for name in PEERS if name in ms}
    best_peer = min(peers, key=peers.get)
    flops = step_flops(cfg, device, data[0])
    capture_s = timings["dynamo_s"] + timings["capture_and_passes_s"]
    figures = {
        "batch": [batch_size, cfg.block_size],
        "ms": ms,
        "first_call_s": first,
        "best_peer": best_peer,
        "best_peer_ms": peers[best_peer],
        "ratio_vs_best_peer": ms[LORDO] / peers[best_peer],
        "ratio_vs_torch_compile": ms[LORDO] / ms[RECIPE],
        "ratio_vs_eager": ms[LORDO] / ms["eager AdamW"],
        "first_call_ratio_vs_torch_compile": statistics.median(first_call_ratios),
        "first_calls_s": first_calls,
        "first_call_ratios": first_call_ratios,
        "update_share": update_ms / ms["eager fused AdamW"],
        "fused_update_ms": update_ms,
        "step_gflop": flops / 1e9,
        "lordo_gflops": flops / ms[LORDO] / 1e6,
        "best_peer_gflops": flops / peers[best_peer] / 1e6,
        "fraction_of_matmul_peak": flops / ms[LORDO] / 1e6 / peak,
        "lordo_dynamo_s": timings["dynamo_s"],
        "lordo_roles_and_passes_s": timings["capture_and_passes_s"],
        "lordo_codegen_s": timings["codegen_s"],
        "capture_fraction": capture_s / first[LORDO],
        "errors": errors,
    }
    if "lordo deterministic=False" in ms:
        figures["deterministic_cost"] = ms[LORDO] / ms["lordo deterministic=False"]
        figures["nonfinite_check_cost"] = ms[LORDO] / ms["lordo on_nonfinite=None"]
    if SCALARS_INLINED in ms:
        figures["scalars_once_gain"] = ms[LORDO] / ms[SCALARS_INLINED]
    if GROUPS_UNBOUNDED in ms:
        figures["kernel_group_bound_cost"] = ms[LORDO] / ms[GROUPS_UNBOUNDED]
    for mode in args.modes:
        against_default = {key: ms[f"{name} [{mode}]"] / ms[name]
                           for key, name in (("lordo_vs_default", LORDO), ("recipe_vs_default", RECIPE))
                           if f"{name} [{mode}]" in ms}
        peers_in_mode = [ms[f"{name} [{mode}]"] for name in PEERS if f"{name} [{mode}]" in ms]
        if f"{LORDO} [{mode}]" in ms and peers_in_mode:
            against_default["lordo_vs_best_peer_in_mode"] = ms[f"{LORDO} [{mode}]"] / min(peers_in_mode)
        if against_default:
            figures.setdefault("modes", {})[mode] = against_default
    rows = [{"variant": name, "ms": ms[name], "ratio": ms[name] / peers[best_peer], "first": first[name],
             "gflops": flops / ms[name] / 1e6} for name in variants]
    return figures, rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--modes", nargs="+", default=["default"], choices=MODES,
                        help="Inductor modes to time the recipe and Policy() with, besides the default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--first-calls", type=int, default=3,
                        help="cold first calls of Policy() and the recipe at the first batch size (round robin)")
    timing_arguments(parser, steps=40, warmup=5)
    args = parser.parse_args(argv)
    if args.first_calls < 1:
        parser.error(f"--first-calls must be at least 1, got {args.first_calls}")
    cfg = GPTConfig()
    if args.quick:
        cfg, args.steps, args.warmup, args.batch_sizes, args.first_calls = QUICK_GPT, 4, 1, [2, 1], 2
    device = torch.device(args.device)
    clock = Clock(device)
    peak = matmul_peak_gflops(device, clock)
    sections = []
    for i, batch_size in enumerate(args.batch_sizes):
        figures, rows = section(cfg, device, clock, batch_size, args, i == 0, peak)
        sections.append(figures)
        print(f"\ntiny GPT, batch {batch_size}x{cfg.block_size}, {device}, {torch.get_num_threads()} threads, "
              f"median of {args.steps} round-robin steps; {figures['step_gflop']:.2f} GFLOP per step")
        print_table(rows, [("variant", "variant", "<40"), ("ms", "ms/step", ".2f"),
                           ("ratio", "vs best peer", ".3f"), ("first", "1st call s", ".1f"),
                           ("gflops", "GFLOP/s", ".1f")])
        print(f"best peer: {figures['best_peer']}; lordo Policy() {figures['ratio_vs_best_peer']:.3f}x its step time, "
              f"first call {figures['first_call_ratio_vs_torch_compile']:.2f}x the recipe's; the fused update is "
              f"{figures['update_share']:.1%} of an eager fused step; lordo at {figures['fraction_of_matmul_peak']:.0%} "
              f"of the {peak:.0f} GFLOP/s matmul peak")
        for name, error in figures["errors"].items():
            print(f"{name}: did not run here: {error}")
        # After each batch size, so a run stopped by a time limit keeps what it measured.
        result = summary(sections, cfg, device, peak)
        write_json(args.json, result)
    main_section = sections[0]
    print(f"lordo first call: dynamo {main_section['lordo_dynamo_s']:.1f} s + roles/passes "
          f"{main_section['lordo_roles_and_passes_s']:.2f} s + AOT/Inductor {main_section['lordo_codegen_s']:.1f} s")
    return result


def summary(sections: list[dict], cfg: GPTConfig, device: torch.device, peak: float) -> dict:
    main_section = sections[0]
    return {
        **{key: main_section[key] for key in ("best_peer", "best_peer_ms", "ratio_vs_best_peer",
                                                  "first_call_ratio_vs_torch_compile", "ratio_vs_torch_compile",
                                                  "ratio_vs_eager", "update_share", "deterministic_cost",
                                                  "nonfinite_check_cost", "capture_fraction")},
        "lordo_ms": main_section["ms"][LORDO],
        "matmul_peak_gflops": peak,
        "sections": sections,
        "params": sum(p.numel() for p in TinyGPT(cfg).parameters()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    main()
