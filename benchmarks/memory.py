"""Memory of each policy on the tiny GPT: persistent bytes per parameter and measured peaks.

    python -m benchmarks.memory [--batch 1] [--block 128] [--compiler inductor] [--only POLICY ...] [--quick]
                                [--without CHOICE ...] [--json PATH]

Every row runs in a fresh process (`--one`), so that no row's allocations or compiled code
linger in another's figures: the tiny GPT's AdamW step, eagerly ("eager AdamW"), through
`torch.compile` of the whole step (PyTorch's recipe: a graph for the forward and backward,
one for `opt.step`), or through `lc.compile` with a policy. Each takes `WARMUP` steps, then
one measured step.

- `persistent_bytes_per_param`: what is held between steps, per parameter: the weights as
  stored (ECO's codes and scales instead of fp32) and the optimizer's and passes' state
  (8- or 4-bit moments: codes, per-block scales, the two maps), from `step.memory_report()`;
  for the peers, the parameters and `opt.state`. Gradients do not persist in any row: the
  step ends with `zero_grad()` (None), and ours frees them inside the graph.
- `peak_bytes`: the most CPU tensor memory live at once during the measured step, as the
  allocator saw it: the bytes of every tensor alive when the step starts (found through the
  garbage collector, each storage once) plus the highest running sum of the allocations and
  frees the profiler records during the step (`profile_memory=True`). It is measured, not
  added up from shapes; `peak_vs_eager` and `peak_vs_compile` divide it by the peers'.
- `peak_rss_bytes`: the process's resident peak (VmHWM) during the measured step, reset
  just before it; it includes the Python interpreter, torch's libraries and the compiled
  code (several hundred MB that no policy changes), so it is printed, not compared.
- `peak_during_step_bytes`: the peak less what was alive at the step's start; `peak_at`: when
  it happened, as a fraction of the step; `peak_op`: the op running then (the allocation's
  caller); `live_by_twentieths`: the running sum at each twentieth of the step.
- `gradient_bytes`: what the gradients would hold all at once (4 bytes per parameter);
  eager AdamW holds all of them when the backward ends, before `opt.step` reads them.

`--block`: bytes per sequence (128 by default). At a short block the activations are small
and the gradients dominate the peak, which shows what updating each weight as soon as its
gradient exists saves (docs/passes/quantized_state.md, "Where the peak is").

`--without`: an ablation; the policies' rows are measured with these of the lowering's
choices turned off (`lordo_compile.testing.LOWERING_CHOICES`), each row records them
(`without`), and `--json` keeps rows of different ablations apart.

`--json` merges: rows of another run of the same batch, block and compiler are kept unless
this run measures the same policy again (each row's ratios are against its own run's peers).
`--quick`: batch 1, aot_eager, the two peers and `Policy()` only.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import warnings
from typing import Sequence

import torch
from torch.profiler import ProfilerActivity, profile

import lordo_compile as lc
from lordo_compile.models import GPTConfig
from lordo_compile.testing import LOWERING_CHOICES, lowering_without

from .common import batches, gpt_step, print_table, write_json

WARMUP = 3
EIGHT_BIT = lc.QuantizedState(bits=8)
PEERS = ("eager AdamW", "torch.compile")
POLICIES = {
    "Policy()": lc.Policy(),
    "Policy(on_nonfinite=None)": lc.Policy(on_nonfinite=None),
    "8-bit moments": lc.Policy.quantized_state(bits=8),
    "4-bit moments": lc.Policy.quantized_state(bits=4),
    "GaLore r=16": lc.Policy.galore(16),
    "GaLore r=16 + 8-bit moments": dataclasses.replace(lc.Policy.galore(16), quantized_state=EIGHT_BIT),
    "ECO fp8": lc.Policy.eco(format="fp8_e4m3"),
    "ECO fp8 + 8-bit moments": dataclasses.replace(lc.Policy.eco(format="fp8_e4m3"), quantized_state=EIGHT_BIT),
    "LoRDO r=8": lc.Policy.lordo(8),
    "LoRDO r=8 + 8-bit moments": dataclasses.replace(lc.Policy.lordo(8), quantized_state=EIGHT_BIT),
    "DiLoCo H=32": lc.Policy.diloco(32),
    "DiLoCo H=32 + 8-bit moments": dataclasses.replace(lc.Policy.diloco(32), quantized_state=EIGHT_BIT),
}
QUICK = (*PEERS, "Policy()")


def _live_tensor_bytes() -> int:
    """Bytes of every CPU tensor the garbage collector can reach, each storage once."""
    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
            continue
        try:
            storage = obj.untyped_storage()
            address = storage.data_ptr()
        except (NotImplementedError, RuntimeError):  # fake or functional tensors left by tracing
            continue
        if address:
            storages[address] = max(storages.get(address, 0), storage.nbytes())
    return sum(storages.values())


def _peak_allocated(events) -> dict:
    """The highest running sum of the profiler's allocations and frees during the step; when
    it happened (fraction of the step's time); the innermost op running then; and the running
    sum at each twentieth of the step."""
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    ops = [e for e in events if e.name() != "[memory]"]
    start = min((e.start_ns() for e in memory), default=0)
    end = max((e.start_ns() for e in memory), default=1)
    marks = [start + (end - start) * k / 20 for k in range(1, 21)]
    live = peak = 0
    at, by_twentieths = start, []
    for event in memory:
        while len(by_twentieths) < 20 and event.start_ns() > marks[len(by_twentieths)]:
            by_twentieths.append(live)
        live += event.nbytes()
        if live > peak:
            peak, at = live, event.start_ns()
    by_twentieths += [live] * (20 - len(by_twentieths))
    running = [o for o in ops if o.start_ns() <= at <= o.end_ns()]
    innermost = min(running, key=lambda o: o.end_ns() - o.start_ns()).name() if running else None
    # The allocation itself is an aten::empty inside the op that asked for it.
    outer = [o.name() for o in sorted(running, key=lambda o: o.end_ns() - o.start_ns())
             if o.name() not in ("aten::empty", "aten::empty_strided")]
    return {"during_step": peak, "peak_at": (at - start) / max(end - start, 1),
            "peak_op": outer[0] if outer else innermost, "live_by_twentieths": by_twentieths}


def _rss_peak() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


def measure_one(name: str, batch: int, compiler: str, block: int = 128, without: Sequence[str] = ()) -> dict:
    """One row, in this process (which should run nothing else); `without`: lowering choices
    turned off (`lordo_compile.testing.lowering_without`)."""
    with lowering_without(*without):
        return {**_measure_one(name, batch, compiler, block), "without": sorted(without)}


def _measure_one(name: str, batch: int, compiler: str, block: int) -> dict:
    cfg = GPTConfig(block_size=block)
    model, opt, train_step = gpt_step(cfg)
    if name == "eager AdamW":
        step = train_step
    elif name == "torch.compile":
        step = torch.compile(train_step, backend=compiler)
    else:
        with warnings.catch_warnings():  # one process is one worker: nothing to send, which is the point here
            warnings.filterwarnings("ignore", message=".*no process group is initialized.*")
            step = lc.compile(train_step, POLICIES[name], compiler=compiler)
    data = batches(cfg, batch, WARMUP + 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no process group is initialized.*")
        for x, y in data[:WARMUP]:
            step(x, y)
    params = sum(p.numel() for p in model.parameters())
    if name in PEERS:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        state = sum(t.numel() * t.element_size() for held in opt.state.values() for t in held.values()
                    if isinstance(t, torch.Tensor))
    else:
        report = step.memory_report()
        weights, state = report.weight_bytes, report.state_bytes_after
    x, y = data[WARMUP]
    live = _live_tensor_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass  # not Linux: VmHWM then covers the whole process
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(x, y)
    during = _peak_allocated(prof.profiler.kineto_results.events())
    return {"policy": name, "parameters": params, "weight_bytes": weights, "state_bytes": state,
            "persistent_bytes_per_param": (weights + state) / params,
            "live_at_start_bytes": live, "peak_bytes": live + during["during_step"],
            "peak_during_step_bytes": during["during_step"], "peak_at": during["peak_at"],
            "peak_op": during["peak_op"], "live_by_twentieths": during["live_by_twentieths"],
            "peak_rss_bytes": _rss_peak(), "gradient_bytes": 4 * params}


def _fresh(name: str, batch: int, block: int, compiler: str, cache: str, without: Sequence[str]) -> dict:
    command = [sys.executable, "-m", "benchmarks.memory", "--one", name, "--batch", str(batch),
               "--block", str(block), "--compiler", compiler, *(["--without", *without] if without else [])]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        # The row is reported as failed, with its error, and the others still run.
        error = next((line for line in reversed(done.stderr.splitlines()) if "Error" in line), "exit code "
                     f"{done.returncode}")
        print(f"the row {name!r} failed in its process:\n{done.stderr[-3000:]}", file=sys.stderr)
        return {"policy": name, "without": sorted(without), "error": error.strip()}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--block", type=int, default=128, help="bytes per sequence")
    parser.add_argument("--compiler", default="inductor")
    parser.add_argument("--only", nargs="+", metavar="POLICY", help="these rows (and the peers) only")
    parser.add_argument("--quick", action="store_true")
    choices = sorted(LOWERING_CHOICES)
    parser.add_argument("--without", nargs="+", default=[], choices=choices, metavar="CHOICE",
                        help="an ablation: the policies' rows with these lowering choices turned off "
                             f"({', '.join(choices)})")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one, args.batch, args.compiler, args.block, args.without)))
        return []
    if args.quick:
        args.batch, args.compiler = 1, "aot_eager"
    names = list(QUICK if args.quick else (*PEERS, *POLICIES))
    if args.only:
        unknown = [name for name in args.only if name not in POLICIES]
        if unknown:
            raise ValueError(f"--only: unknown policies {unknown}; choose from {list(POLICIES)}")
        names = [*PEERS, *args.only]
    # One cache directory per run, empty at its start: no row reads code compiled by another run.
    cache = os.path.abspath(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"lordo_memory_{os.getpid()}"))
    # The peers have no lowering choices; they run as they are.
    rows = [_fresh(name, args.batch, args.block, args.compiler, cache, [] if name in PEERS else args.without)
            for name in names]
    eager, compiled = rows[0], rows[1]
    if "error" in eager or "error" in compiled:
        raise RuntimeError(f"a peer failed, so no row can be compared: {eager.get('error') or compiled.get('error')}")
    for row in rows:
        if "error" in row:
            continue
        row["peak_vs_eager"] = row["peak_bytes"] / eager["peak_bytes"]
        row["peak_vs_compile"] = row["peak_bytes"] / compiled["peak_bytes"]
        row["state_vs_adamw"] = row["state_bytes"] / eager["state_bytes"]
    print(f"tiny GPT ({eager['parameters']:,} parameters), AdamW, batch {args.batch}x{args.block}, {args.compiler}, "
          f"torch {torch.__version__}; each row in a fresh process, peak of one step after {WARMUP}"
          + (f"; the policies without {', '.join(args.without)}" if args.without else ""))
    print_table(rows, [("policy", "policy", "<"), ("persistent_bytes_per_param", "held B/param", ".2f"),
                       ("state_vs_adamw", "state vs AdamW", ".3f"), ("peak_bytes", "peak B", ","),
                       ("peak_vs_eager", "vs eager", ".3f"), ("peak_vs_compile", "vs compile", ".3f"),
                       ("peak_rss_bytes", "peak RSS B", ",")])
    for row in rows:
        if "error" in row:
            print(f"{row['policy']}: failed: {row['error']}")
    run = {"batch": args.batch, "block": args.block, "compiler": args.compiler, "warmup": WARMUP}
    write_json(args.json, {**run, "rows": _merged(args.json, run, rows)})
    return rows


def _merged(path: str | None, run: dict, rows: list[dict]) -> list[dict]:
    """`rows` after the rows of an earlier run in `path` with the same settings that this run
    did not measure again."""
    if not path or not os.path.exists(path):
        return rows
    with open(path) as f:
        earlier = json.load(f)
    if any(earlier.get(key, 128 if key == "block" else None) != value for key, value in run.items()):
        return rows
    def key(row: dict) -> tuple:
        return row["policy"], tuple(row.get("without", ()))

    measured = {key(row) for row in rows}
    kept = [row for row in earlier["rows"] if key(row) not in measured]
    order = list(dict.fromkeys([*PEERS, *POLICIES]))
    return sorted(kept + rows, key=lambda row: (order.index(row["policy"]), key(row)[1]))


if __name__ == "__main__":
    main()
