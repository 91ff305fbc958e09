"""Bytes per sync of streaming DiLoCo or LoRDO (fragments) on the tiny GPT, 2 gloo workers;
with --timing, the time of sync steps against local steps, without and with overlap.

    python -m benchmarks.streaming [--policy diloco|lordo] [--fragments 1 2 4 8] [--payloads full int8]
        [--every 8] [--json PATH]
    python -m benchmarks.streaming --timing [--policy diloco|lordo] [--fragments 1 4] [--delays 0 1]
        [--rounds 4] [--batch 16] [--compiler aot_eager] [--json PATH]

For each payload (fp32 pseudo-gradients, or int8 codes with a scale per row) and fragment
count F: DiLoCo (or, with --policy lordo, LoRDO at rank --rank) with `fragments=F` runs two
periods of H steps (every fragment syncs twice), and `step.comm_report()` gives the bytes
each sync graph sends per worker and call. A graph that also computes LoRDO's first
projection (step 0, where a fragment syncs at once) is left out: its sync is counted where
it runs alone, in the second period.
`peak_sync_bytes` is the largest of them, `peak_vs_whole` its ratio to the full payload's
F = 1 single sync (the target is about 1/F: fragments are cut at parameter boundaries, so the largest
parameter bounds how even they can be). Measured from the compiled graphs' collectives, not
computed from shapes. aot_eager: bytes do not depend on the code generator.

--timing: each worker compiles DiLoCo (or LoRDO at rank --rank, its default int8 payload)
for every (fragments F, delay tau) pair and runs them
round robin, one period of H steps each per round (after two untimed periods, in which
every graph compiles, and a barrier), timing every call. Per configuration, against the
median local step ('step' graph) of all of them (with F = 4 and tau = 1 every step of a
period syncs or merges, so that one has none): the median step that starts a sync (`sync_vs_local`: with tau = 0 it waits for the
all-reduce; with tau >= 1 it only writes the payload and the runtime sends it) and, with
tau >= 1, the median step that merges (`merge_vs_local`: it waits for what is still in
flight). Rank 0's times; both workers share this machine's cores, the all-reduce's thread
included. `exposed_at_1gbit`: the alpha-beta model of `benchmarks.time_to_loss` for each
sync's measured collectives over a 1 Gbit/s link (latency 100 us, these 2 workers), minus
the tau local steps it overlaps, over the period's compute (H local steps).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import lordo_compile as lc
from lordo_compile.launch import run_workers
from lordo_compile.models import GPTConfig

from .common import batches, gpt_step, print_table, write_json
from .time_to_loss import collective_seconds


def streaming_policy(policy: str, every: int, fragments: int, rank: int, **options) -> lc.Policy:
    if policy == "lordo":
        return lc.Policy.lordo(rank, every, fragments=fragments, **options)
    return lc.Policy.diloco(every, fragments=fragments, **options)


def bytes_per_sync(rank: int, world: int, policy: str, fragments: list[int], payloads: list[str], every: int,
               low_rank: int) -> list[dict]:
    cfg = GPTConfig()
    rows = []
    for payload in payloads:
        for count in fragments:
            torch._dynamo.reset()
            _, _, train_step = gpt_step(cfg)
            step = lc.compile(train_step, streaming_policy(policy, every, count, low_rank, payload=payload),
                              compiler="aot_eager")
            for x, y in batches(cfg, 2, 2 * every, seed=rank):
                step(x, y)
            report = step.comm_report()
            syncs = {name: report.graph_bytes(name) // report.calls[name] for name in report.per_graph
                     if "sync" in name and "init" not in name and report.calls.get(name)}
            rows.append({"payload": payload, "fragments": count, "syncs": len(syncs),
                         "peak_sync_bytes": max(syncs.values()), "total_bytes": sum(syncs.values())})
    return rows


# A merge first runs in the second period (tau steps after the last fragment's sync): its graph compiles then.
WARMUP_PERIODS = 2


def round_robin(rank: int, world: int, policy: str, low_rank: int, pairs: list[tuple[int, int]], every: int,
                rounds: int, batch: int, compiler: str) -> list[dict]:
    cfg = GPTConfig()
    steps, times = [], {pair: {} for pair in pairs}
    for fragments, delay in pairs:
        _, _, train_step = gpt_step(cfg)
        steps.append(lc.compile(train_step, streaming_policy(policy, every, fragments, low_rank, delay=delay),
                                compiler=compiler))
    data = batches(cfg, batch, every, seed=rank)
    for round_ in range(-WARMUP_PERIODS, rounds):
        if round_ == 0:
            dist.barrier()
        for pair, step in zip(pairs, steps):
            for x, y in data:
                k = step.backend.runtime.step
                started = time.perf_counter()
                step(x, y)
                graph = step.backend.schedule.name_at(k)
                if round_ >= 0:
                    times[pair].setdefault(graph, []).append(time.perf_counter() - started)
    rows = []
    for (fragments, delay), step in zip(pairs, steps):
        report = step.comm_report()
        # Per sync graph, its collectives (LoRDO's first projection, at step 0, is not a sync's).
        rows.append({"fragments": fragments, "delay": delay, "times_s": times[(fragments, delay)],
                     "sync_collectives": [[(c.op, c.payload_bytes) for c in report.per_graph[name]]
                                          for name in report.per_graph
                                          if report.per_graph[name] and report.calls.get(name) and "init" not in name]})
    return rows


def timing_rows(results: list[dict], every: int, workers: int) -> list[dict]:
    """Each configuration's steps against the local step of every configuration (the same
    model and batch: where F fragments with tau >= 1 fill a period, a period has none)."""
    local = statistics.median(t for result in results for t in result["times_s"].get("step", []))
    rows = []
    for result in results:
        times = result.pop("times_s")
        syncs = [t for name, ts in times.items() if "sync" in name for t in ts]
        merges = [t for name, ts in times.items() if "merge" in name and "sync" not in name for t in ts]
        exposed = sum(max(0.0, sum(collective_seconds(op, size, workers, 100e-6, 1e9 / 8) for op, size in sync)
                          - result["delay"] * local) for sync in result.pop("sync_collectives"))
        rows.append({**result, "local_ms": local * 1e3, "sync_ms": statistics.median(syncs) * 1e3,
                     "sync_vs_local": statistics.median(syncs) / local,
                     "merge_ms": statistics.median(merges) * 1e3 if merges else None,
                     "merge_vs_local": statistics.median(merges) / local if merges else None,
                     "exposed_at_1gbit": exposed / (every * local)})
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="diloco", choices=["diloco", "lordo"], help="what streams")
    parser.add_argument("--rank", type=int, default=8, help="--policy lordo: its rank")
    parser.add_argument("--fragments", type=int, nargs="+")
    parser.add_argument("--every", type=int, default=8, help="H, steps between syncs of one fragment")
    parser.add_argument("--payloads", nargs="+", default=["full", "int8"], choices=["full", "int8", "low_rank"],
                        help="what a sync sends; ratios are to the first's F = 1")
    parser.add_argument("--timing", action="store_true", help="time sync steps against local steps")
    parser.add_argument("--delays", type=int, nargs="+", default=[0, 1], help="--timing: overlaps tau to time")
    parser.add_argument("--rounds", type=int, default=4, help="--timing: timed periods per configuration")
    parser.add_argument("--batch", type=int, default=16, help="--timing: sequences per step")
    parser.add_argument("--compiler", default="aot_eager", help="--timing: aot_eager or inductor")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if args.timing:
        return timing(args)
    if args.policy == "diloco" and "low_rank" in args.payloads:
        parser.error("--payloads low_rank is LoRDO's (--policy lordo)")
    args.fragments = args.fragments or [1, 2, 4, 8]
    if 1 not in args.fragments:
        args.fragments = [1, *args.fragments]
    rows = run_workers(bytes_per_sync, 2, timeout=1800,
                       args=(args.policy, args.fragments, args.payloads, args.every, args.rank))[0]
    whole = next(r for r in rows if r["fragments"] == 1 and r["payload"] == args.payloads[0])["peak_sync_bytes"]
    for row in rows:
        row["peak_vs_whole"] = row["peak_sync_bytes"] / whole
        row["one_over_fragments"] = 1 / row["fragments"]
    what = f"LoRDO r={args.rank}" if args.policy == "lordo" else "DiLoCo"
    print(f"tiny GPT, {what} every {args.every} steps, 2 gloo workers; bytes sent per worker over one period")
    print_table(rows, [("payload", "payload", "<"), ("fragments", "F", "d"), ("syncs", "syncs", "d"),
                       ("peak_sync_bytes", "peak B/sync", ","), ("peak_vs_whole", f"vs {args.payloads[0]} F=1", ".3f"), ("one_over_fragments", "1/F", ".3f"),
                       ("total_bytes", "B/period", ",")])
    write_json(args.json, {"policy": args.policy, "rank": args.rank if args.policy == "lordo" else None,
                           "every": args.every, "rows": rows})
    return rows


def timing(args) -> list[dict]:
    pairs = [(f, d) for f in args.fragments or [1, 4] for d in args.delays]
    results = run_workers(round_robin, 2, timeout=3600,
                          args=(args.policy, args.rank, pairs, args.every, args.rounds, args.batch, args.compiler))[0]
    rows = timing_rows(results, args.every, 2)
    what = f"LoRDO r={args.rank} (int8 payload)" if args.policy == "lordo" else "DiLoCo"
    print(f"tiny GPT, batch {args.batch}x128, {what} every {args.every} steps, 2 gloo workers, {args.compiler}; "
          f"{args.rounds} timed periods per configuration, round robin (rank 0)")
    print_table(rows, [("fragments", "F", "d"), ("delay", "tau", "d"), ("local_ms", "local ms", ".1f"),
                       ("sync_ms", "sync ms", ".1f"), ("sync_vs_local", "sync/local", ".3f"),
                       ("merge_ms", "merge ms", ".1f"), ("merge_vs_local", "merge/local", ".3f"),
                       ("exposed_at_1gbit", "exposed @1Gb/s", ".4f")])
    write_json(args.json, {"policy": args.policy, "rank": args.rank if args.policy == "lordo" else None,
                           "every": args.every, "batch": args.batch, "compiler": args.compiler,
                           "rounds": args.rounds, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
