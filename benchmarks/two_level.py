"""Two levels against one: DiLoCo and LoRDO on 4 gloo workers as 2 x 2, against their flat forms and DDP.

    python -m benchmarks.two_level [--every 8] [--rank 8] [--only CONFIG ...] [--seeds 3] [--quick]
        [--tuned-in JSON ...] [--slow-mbit 100] [--fast-gbit 100] [--latency-us 100]
        [--json PATH]

The 4 workers stand for two nodes of two: ranks {0, 1} and {2, 3} share a node's fast links
(a `DeviceMesh`'s inner dimension), and the two nodes are joined by a slow link. The rows
(ALGORITHMS.md section 9), each trained as `benchmarks.lordo`'s are, on paired seeds:

- "ddp": every gradient averaged over the 4 workers every step, all of it over the slow link;
- "diloco H=h", "lordo r=R H=h": flat, 4 replicas that sync every h steps over all 4
  workers; against ddp;
- "diloco 2x2 H=h", "lordo 2x2 r=R H=h": two levels, gradients averaged over the inner
  group (the node) every step, the sync every h steps over the outer group (across nodes):
  2 replicas of 2 workers; against their flat forms;
- "diloco F=4 tau=1 H=h": streaming DiLoCo, the model in 4 fragments at staggered steps,
  each fragment's all-reduce overlapping one local step; against flat DiLoCo.

Tuning, one sweep for all: "ddp" and "diloco H=h" take the learning rate (and DiLoCo's
outer lr and momentum) that another benchmark tuned for a row of the same name and options
on the same setup (--tuned-in, by default `benchmarks.sync`'s JSON; matched as
`time_to_loss.tuned_elsewhere` does), or are tuned here where none did; "lordo r=R H=h"
tunes its lr here over the sweep DDP was tuned over (`--lrs` where given), on the same
tuning seed, and "lordo 2x2 r=R H=h" takes it. The two-level and streaming rows are not
tuned apart from their flat form. The header and each row's `tuned_in` say where each
row's options came from.

Bytes per worker are counted by each compiled step per process group
(`step.comm_report().per_group()`): `slow_bytes` is what crossed the slow link (the outer
group's, or everything for a flat row). Modeled time to loss: each step's compute is the
flat form's graph time, measured alone on one worker under Inductor (`time_to_loss.compute_ms`),
plus the alpha-beta model's time for its collectives, those of the inner group at
--fast-gbit among 2 workers, the others at --slow-mbit (a flat ring of 4 spans both nodes,
so its slowest link sets its pace), latency --latency-us, after the step's compute (a
streaming row's sync, less the `delay` local steps it overlaps); the targets are DDP's final
mean validation loss and the lowest loss every row's mean curve reaches (`common_target`).
`--quick`: 16 steps of a one-layer model, H = 8, 2 seeds, no tuning (the 4 workers are
needed for two levels).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

from torch.distributed.device_mesh import init_device_mesh

from lordo_compile.experiment import RunConfig, train_tiny_gpt
from lordo_compile.launch import run_workers

from . import harness
from .common import print_table, write_json
from .harness import Config
from .lordo import add_figures, add_run_arguments, claim, diloco_sweep, policy, ratios, setup_of, within
from .time_to_loss import (RESULTS, clocked_curve, collective_seconds, common_target, compute_ms, mean_curve,
                           record_tuning, time_to, tuned_elsewhere)

INNER = 2  # workers per node


def flat_baselines(every: int, sweep: tuple[dict, ...]) -> list[Config]:
    """DDP and flat DiLoCo at placeholder options, each with the sweep it is tuned over where
    no other benchmark tuned it on this setup."""
    return [Config("ddp", {"policy": "ddp", "lr": harness.LR}, sweep=sweep),
            Config(f"diloco H={every}", {"policy": "diloco", "sync_every": every, "lr": harness.LR, "outer_lr": 0.7,
                                         "outer_momentum": 0.9}, "ddp", diloco_sweep(sweep))]


def configs(every: int, rank: int, ddp: Config, diloco: Config, sweep: tuple[dict, ...]) -> list[Config]:
    """Every row; the two-level and streaming DiLoCo rows take flat DiLoCo's options (its
    chosen ones where it is tuned here)."""
    flat_lordo = f"lordo r={rank} H={every}"
    after_diloco = diloco.name if diloco.sweep else None
    lordo = {"policy": "lordo", "rank": rank, "sync_every": every, "lr": harness.LR}
    return [ddp, diloco,
            Config(f"diloco 2x2 H={every}", {**diloco.options, "inner": INNER}, diloco.name,
                   tuned_after=after_diloco),
            Config(f"diloco F=4 tau=1 H={every}", {**diloco.options, "fields": {"fragments": 4, "delay": 1}},
                   diloco.name, tuned_after=after_diloco),
            Config(flat_lordo, lordo, "ddp", sweep),
            Config(f"lordo 2x2 r={rank} H={every}", {**lordo, "inner": INNER}, flat_lordo, tuned_after=flat_lordo)]


def worker(rank: int, world: int, options: dict, setup: RunConfig) -> dict:
    inner = options.get("inner")
    mesh = init_device_mesh("cpu", (world // inner, inner), mesh_dim_names=("outer", "inner")) if inner else None
    # Only rank 0's curve is kept, and evaluating holds no collective: the others skip it.
    result = train_tiny_gpt(policy(options, mesh), setup if rank == 0 else replace(setup, eval_every=0))
    report = result.step.comm_report()
    level = {mesh.get_group(1).group_name: "inner", mesh.get_group(0).group_name: "outer"} if mesh else {}
    # Each group is one level (a flat run's only group is the world).
    per_level = {level.get(group, "world"): sent for group, (_, sent) in report.per_group().items()}
    return {"val_loss": result.val_loss, "curve": result.curve, "graphs": result.graphs,
            "bytes_per_worker": report.bytes_sent, "bytes_per_level": per_level,
            "state_bytes": result.step.memory_report().state_bytes_after,
            "parameters": sum(p.numel() for p in result.model.parameters()),
            "collectives": {name: [(c.op, c.payload_bytes, level.get(c.group, "world")) for c in found]
                            for name, found in report.per_graph.items()}}


def comm_seconds(collectives: list, workers: int, latency: float, slow_bits: float, fast_bits: float) -> float:
    """The alpha-beta model's time for one graph's collectives: the inner group's over a fast
    link among INNER workers, the outer group's among the nodes and a flat group's among all
    workers over the slow link."""
    total = 0.0
    for op, payload, level in collectives:
        count = {"inner": INNER, "outer": workers // INNER}.get(level, workers)
        total += collective_seconds(op, payload, count, latency, (fast_bits if level == "inner" else slow_bits) / 8)
    return total


def time_to_loss(rows: list[dict], target: float, workers: int, latency: float, slow_bits: float,
                 fast_bits: float) -> list[dict]:
    """Per row, the modeled seconds to the validation loss `target` (or to its best loss, marked),
    and the ratio against DDP's where both reach it."""
    found = []
    for row in rows:
        # A streaming sync's all-reduce runs behind the `delay` local steps before its merge (the
        # cheapest graph's time: with 4 fragments and a delay every step of H = 8 syncs or merges).
        hidden = row["options"].get("fields", {}).get("delay", 0) * min(row["compute_ms"].values()) / 1e3
        comm = {graph: max(0.0, comm_seconds(c, workers, latency, slow_bits, fast_bits) - hidden)
                for graph, c in row["collectives"].items()}
        points = clocked_curve(row, comm, overlap=False)
        seconds, loss, reached = time_to(target, points)
        found.append({"config": row["config"], "seconds": seconds, "loss": loss, "reached": reached,
                      "total_s": points[-1][0], "slow_bytes": row["slow_bytes"], "points": points,
                      "note": "" if reached else f"not reached (best {loss:.4f})"})
    ddp = next((entry for entry in found if entry["config"] == "ddp"), None)
    for entry in found:
        entry["speedup_vs_ddp"] = (ddp["seconds"] / entry["seconds"]
                                   if ddp and entry["reached"] and ddp["reached"] else None)
    return found


def claims(rows: list[dict]) -> list[str]:
    """Each claim whose rows ran."""
    by = {row["config"]: row for row in rows}
    lines = []
    for row in rows:
        name, base = row["config"], by.get(row["baseline"] or "")
        if base is None:
            continue
        if "2x2" in name:
            lines.append(claim(f"two levels beat one ({name} - {base['config']})", row, "lower"))
            if "ddp" in by:
                lines.append(within(harness.versus(rows, name, "ddp"), by["ddp"], "DDP"))
        elif "F=" in name:
            lines.append(within(row, base, base["config"]))
        else:
            lines.append(within(row, base, "DDP"))
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--every", type=int, default=8, help="sync interval H")
    parser.add_argument("--rank", type=int, default=8, help="LoRDO's rank")
    parser.add_argument("--tuned-in", nargs="*", default=[os.path.relpath(os.path.join(RESULTS, "sync.json"))],
                        metavar="JSON", help="benchmark JSONs whose tuned options DDP and DiLoCo take on the same setup")
    parser.add_argument("--slow-mbit", type=float, default=100.0, help="the link between nodes, Mbit/s")
    parser.add_argument("--fast-gbit", type=float, default=100.0, help="the links inside a node, Gbit/s")
    parser.add_argument("--latency-us", type=float, default=100.0, help="every link's latency alpha")
    harness.add_arguments(parser, compiler="aot_eager", only=True)
    args = parser.parse_args(argv)
    if args.workers % INNER:
        parser.error(f"--workers {args.workers}: two levels of nodes of {INNER} need a multiple of {INNER}")
    setup = setup_of(args, every=8)
    args.workers = max(args.workers, 2 * INNER)  # a quick run's 2 workers would make one node
    setup = replace(setup, eval_every=max(1, args.steps // 8))
    seeds, tuning_seeds = harness.seeds_of(args)
    sweep = harness.lr_sweep(args, harness.LRS)
    (ddp, diloco), tuned_in = tuned_elsewhere(flat_baselines(args.every, sweep), args.tuned_in, args)
    if "ddp" in tuned_in and not args.lrs:
        # One sweep for all: LoRDO's is the one DDP was tuned over.
        sweep = tuple({"lr": tried["chosen"]["lr"]} for tried in tuned_in["ddp"][1]["tuning"])
        if diloco.sweep:
            diloco = replace(diloco, sweep=diloco_sweep(sweep))
    every_config = configs(args.every, args.rank, ddp, diloco, sweep)
    comparison = harness.select(every_config, args.only)
    # Compute time does not depend on the lr, nor on the levels (a two-level row's graphs are its flat form's).
    timing = replace(setup, eval_every=0, seed=seeds[0], steps=min(setup.steps, 4 * args.every + 2))
    flat_forms = {config.name: json.dumps({k: v for k, v in config.options.items() if k != "inner"}, sort_keys=True)
                  for config in comparison}
    timed = compute_ms({flat: json.loads(flat) for flat in flat_forms.values()}, timing,
                       "aot_eager" if args.quick else "inductor")
    compute = {name: timed[flat] for name, flat in flat_forms.items()}
    rows = harness.compare(comparison, lambda config, seed: run_workers(
        worker, args.workers, timeout=3600, args=(config.options, replace(setup, seed=seed, lr=config.options["lr"]))
    )[0], seeds, tuning_seeds)
    add_figures(rows, comparison)
    for row in rows:
        first = row["runs"][0]  # graphs, collectives and bytes do not depend on the seed
        row.update(graphs=first["graphs"], collectives=first["collectives"], bytes_per_level=first["bytes_per_level"],
                   slow_bytes=sum(sent for level, sent in first["bytes_per_level"].items() if level != "inner"),
                   compute_ms=compute[row["config"]], curve=mean_curve(row["runs"]))
        for run in row["runs"]:
            del run["graphs"], run["collectives"]
    tuning = record_tuning(rows, comparison, tuned_in, sweep, tuning_seeds)
    header = (f"tiny GPT ({rows[0]['runs'][0]['parameters']:,} parameters), {args.workers} gloo workers as "
              f"{args.workers // INNER} nodes of {INNER}, x {args.batch} sequences of 128 bytes, {args.steps} steps, "
              f"sync every {args.every}, seeds {seeds}, {tuning}, compiler {args.compiler}")
    harness.report(rows, header, [("slow_bytes", "B over slow link", ","), ("bytes_per_worker", "B/worker", ",")])
    print("\n".join(claims(rows)))
    result = harness.save(args.json, header, rows, args, claims=claims, configs=every_config, figures=ratios)
    network = (f"modeled: {args.slow_mbit:g} Mbit/s between nodes, {args.fast_gbit:g} Gbit/s inside, latency "
               f"{args.latency_us:g} us, communication after compute")
    link = (args.workers, args.latency_us * 1e-6, args.slow_mbit * 1e6, args.fast_gbit * 1e9)
    by = {row["config"]: row for row in result["rows"]}
    common, setter = common_target(result["rows"])
    result.update(network=network, common_target={"loss": common, "set_by": setter},
                  time_to_loss=time_to_loss(result["rows"], by["ddp"]["mean"], *link) if "ddp" in by else [],
                  time_to_common_loss=time_to_loss(result["rows"], common, *link))
    columns = [("config", "config", "<"), ("slow_bytes", "B over slow link", ","), ("seconds", "seconds", ".1f"),
               ("speedup_vs_ddp", "x faster than ddp", ".2f"), ("total_s", "whole run s", ".1f"), ("note", "", "<")]
    if result["time_to_loss"]:
        print(f"time to DDP's final validation loss ({by['ddp']['mean']:.4f}), {network}")
        print_table(result["time_to_loss"], columns)
    print(f"time to {common:.4f}, the lowest loss every row reaches ({setter}'s best), {network}")
    print_table(result["time_to_common_loss"], columns)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
