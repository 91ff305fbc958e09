"""Time to a target loss on a modeled network: DDP, low-rank DDP, DiLoCo and LoRDO on gloo workers.

    python -m benchmarks.time_to_loss [--workers 4] [--steps 640] [--rank 8] [--sync-every 8] [--seeds 3]
        [--tuned-in JSON ...] [--latency-us 100] [--overlap] [--plot PATH] [--json PATH] [--quick]

Three measurements, then the alpha-beta model of ALGORITHMS.md section 10:

1. Calibration: real gloo all-reduces among the --workers processes on this machine, timed
   per size, and the model's latency and bandwidth fitted to them (least squares on
   relative error). Each size's measured and modeled time are in the JSON: how far to
   trust the model.
2. Loss: each method trains on the workers on the paired seeds, as `benchmarks.lordo`'s
   rows do (its `policy`), evaluating every steps/16. Per step, the compiled step records
   which graph ran (which events), and per graph the collectives it issues (op, bytes).
   Each method runs at the options tuned for it where a benchmark already tuned them on
   this setup (--tuned-in: the first JSON with a tuned row of the same name and options,
   apart from the tuned ones, whose run had the same workers, steps, batch, seeds, tuning
   seeds and compiler; by default `benchmarks.sync`'s for DDP and DiLoCo,
   `benchmarks.two_level`'s for LoRDO at H = 8, `benchmarks.lordo`'s for low-rank DDP,
   whose projection is refreshed every `lordo.SYNC_EVERY` steps as there); a method
   tuned in none of them is tuned here, over the same sweep. The header and each row's
   `tuned_in` say which.
3. Compute: each method's step, compiled by Inductor whatever --compiler trains with (but
   aot_eager under --quick), runs alone (one worker, one thread, as each training worker
   has one), before any training, for four sync intervals, every method's step in one
   process, round robin; the median time of each graph, its first (compiling) call left
   out. A graph that runs once (the first step's) is charged the ordinary step's time.

The modeled wall-clock to step s is the sum over steps i <= s of compute(graph_i) and
comm(graph_i), where comm is the model's time for that graph's collectives over a link
of the given bandwidth and latency (--latency-us, the same for every link): a ring
all-reduce of b bytes over K workers 2(K-1)alpha + 2(K-1)/K b/beta, an all-gather
(K-1)(alpha + b/beta). Communication does not overlap compute (--overlap: a step takes
the longer of the two). Per link: the time each method needs to reach DDP's final
validation loss (mean curve over the seeds, interpolated between evaluations), or, marked
"not reached", the time to the best loss it reaches; and the time each needs to reach the
lowest loss every method reaches (`common_target`). The losses themselves are compared
on paired seeds as every benchmark here does (`benchmarks.harness`).
`--quick`: 2 workers, 16 steps of a one-layer model, sync every 8, 2 seeds, no tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from lordo_compile.experiment import RunConfig, tiny_gpt_run, train_tiny_gpt
from lordo_compile.launch import run_workers

from . import harness
from .common import print_table
from .harness import Config
from .lordo import LR, LRS, SYNC_EVERY, WITH_OUTER_STEP, add_run_arguments, diloco_sweep, policy, setup_of

LINKS = (("100 Mbit/s", 100e6), ("1 Gbit/s", 1e9), ("10 Gbit/s", 10e9), ("100 Gbit/s", 100e9))  # bits per second
CALIBRATION_BYTES = tuple(4 ** k for k in range(5, 13))  # 1 KiB .. 16 MiB
RESULTS = os.path.join(os.path.dirname(__file__), "results")
TUNED_IN = tuple(os.path.relpath(os.path.join(RESULTS, name)) for name in ("sync.json", "two_level.json", "lordo.json"))
TUNED_KEYS = ("lr", "outer_lr", "outer_momentum")
SAME_SETUP = ("workers", "steps", "batch", "seeds", "tuning_seeds", "compiler")


def collective_seconds(op: str, payload: int, workers: int, alpha: float, beta: float) -> float:
    """The alpha-beta model's time for one collective; `payload` bytes per worker, `beta` in bytes/s."""
    if op == "all_reduce":
        return 2 * (workers - 1) * alpha + 2 * (workers - 1) / workers * payload / beta
    if op == "all_gather_into_tensor":
        return (workers - 1) * (alpha + payload / beta)
    raise NotImplementedError(f"the alpha-beta model has no cost for collective {op!r}; add one to "
                              "benchmarks.time_to_loss.collective_seconds")


def time_all_reduces(rank: int, world: int, sizes: tuple[int, ...], repeats: int) -> list[float]:
    """Median seconds of a float32 all-reduce of each size (bytes), each call started together."""
    medians = []
    for size in sizes:
        tensor = torch.ones(size // 4)
        for _ in range(10):
            dist.all_reduce(tensor)
        samples = []
        for _ in range(repeats):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(tensor)
            samples.append(time.perf_counter() - started)
        medians.append(statistics.median(samples))
    return medians


def calibrate(workers: int, sizes: tuple[int, ...] = CALIBRATION_BYTES, repeats: int = 20) -> dict:
    """Loopback gloo all-reduces, measured, and the alpha and beta that fit them best."""
    measured = run_workers(time_all_reduces, workers, args=(sizes, repeats))[0]
    # t = a alpha + c b (1/beta), fitted on relative error (each equation divided by its t).
    a, c = 2 * (workers - 1), 2 * (workers - 1) / workers
    design = torch.tensor([[a / t, c * b / t] for b, t in zip(sizes, measured)], dtype=torch.float64)
    alpha, inverse_beta = torch.linalg.lstsq(design, torch.ones(len(sizes), 1, dtype=torch.float64)).solution[:, 0]
    alpha, beta = float(alpha), 1 / float(inverse_beta)
    rows = [{"bytes": b, "measured_ms": t * 1e3,
             "modeled_ms": collective_seconds("all_reduce", b, workers, alpha, beta) * 1e3} for b, t in zip(sizes, measured)]
    for row in rows:
        row["modeled_vs_measured"] = row["modeled_ms"] / row["measured_ms"]
    return {"workers": workers, "alpha_s": alpha, "beta_bytes_per_s": beta, "rows": rows}


def worker(rank: int, world: int, options: dict, setup: RunConfig) -> dict:
    # Only rank 0 evaluates (evaluating holds no collective).
    result = train_tiny_gpt(policy(options), setup if rank == 0 else replace(setup, eval_every=0))
    report = result.step.comm_report()
    return {"val_loss": result.val_loss, "curve": result.curve, "graphs": result.graphs,
            "bytes_per_worker": report.bytes_sent,
            "collectives": {name: [(c.op, c.payload_bytes) for c in found] for name, found in report.per_graph.items()}}


def compute_ms(methods: dict[str, dict], setup: RunConfig, compiler: str = "inductor") -> dict[str, dict[str, float]]:
    """Per method (name: options), the median ms of each graph of its step, one worker alone:
    every method's step in one process, round robin (one step of each in turn, so that the
    machine's drift falls on all alike), the first call of each graph left out."""
    alone = replace(setup, eval_every=0, compiler=compiler)
    timed = run_workers(_timing_worker, 1, timeout=3600, args=(methods, alone))[0]
    return {name: _graph_medians(graphs, seconds) for name, (graphs, seconds) in timed.items()}


def _graph_medians(graphs: list[str], seconds: list[float]) -> dict[str, float]:
    """A graph that ran once (the first step's) is charged the most frequent graph's time."""
    times: dict[str, list[float]] = {}
    for graph, took in zip(graphs, seconds):
        times.setdefault(graph, []).append(took)
    medians = {graph: statistics.median(values[1:]) * 1e3 for graph, values in times.items() if len(values) > 1}
    ordinary = max(times, key=lambda graph: len(times[graph]))
    return {graph: medians.get(graph, medians[ordinary]) for graph in times}


def _timing_worker(rank: int, world: int, methods: dict[str, dict], setup: RunConfig
                   ) -> dict[str, tuple[list[str], list[float]]]:
    runs = {name: tiny_gpt_run(policy(options), setup) for name, options in methods.items()}
    timed: dict[str, tuple[list[str], list[float]]] = {name: ([], []) for name in runs}
    for _ in range(setup.steps):
        for name, run in runs.items():
            _, seconds, graph = run.train_step()
            timed[name][0].append(graph)
            timed[name][1].append(seconds)
    return timed


def modeled_curve(row: dict, link_bits: float, latency: float, workers: int, overlap: bool) -> list[tuple[float, float]]:
    """(modeled seconds, mean validation loss) at each evaluation of the row's runs."""
    beta = link_bits / 8
    return clocked_curve(row, {graph: sum(collective_seconds(op, payload, workers, latency, beta) for op, payload in found)
                               for graph, found in row["collectives"].items()}, overlap)


def clocked_curve(row: dict, comm: dict[str, float], overlap: bool) -> list[tuple[float, float]]:
    """(modeled seconds, mean validation loss) at each evaluation of the row's runs, each step
    taking its graph's `compute_ms` and `comm` seconds (the longer of the two with `overlap`)."""
    untimed = set(row["graphs"]) - set(row["compute_ms"])
    if untimed:
        raise ValueError(f"{row['config']}: graphs {sorted(untimed)} ran in training but not in the timing run")
    elapsed, clock = 0.0, []
    for graph in row["graphs"]:
        compute = row["compute_ms"][graph] / 1e3
        elapsed += max(compute, comm[graph]) if overlap else compute + comm[graph]
        clock.append(elapsed)
    return [(clock[step - 1], loss) for step, _, loss in row["curve"]]


def time_to(target: float, points: list[tuple[float, float]]) -> tuple[float, float, bool]:
    """(seconds, loss, reached): when the curve first reaches `target` (linear between
    evaluations), or when it reaches its best loss."""
    for i, (seconds, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return seconds, loss, True
            before, previous = points[i - 1]
            return before + (seconds - before) * (previous - target) / (previous - loss), target, True
    seconds, loss = min(points, key=lambda point: point[1])
    return seconds, loss, False


def configs(rank: int, sync_every: int, sweep: tuple[dict, ...]) -> list[Config]:
    return [Config("ddp", {"policy": "ddp", "lr": LR}, sweep=sweep),
            Config(f"low_rank_ddp r={rank}", {"policy": "low_rank_ddp", "rank": rank, "sync_every": SYNC_EVERY,
                                              "lr": LR}, "ddp", sweep),
            Config(f"diloco H={sync_every}", {"policy": "diloco", "sync_every": sync_every, "lr": LR, "outer_lr": 0.7,
                                              "outer_momentum": 0.9}, "ddp", diloco_sweep(sweep)),
            Config(f"lordo r={rank} H={sync_every}", {"policy": "lordo", "rank": rank, "sync_every": sync_every,
                                                      "lr": LR}, "ddp", sweep)]


def tuned_elsewhere(comparison: list[Config], paths: list[str], args: argparse.Namespace
                    ) -> tuple[list[Config], dict[str, tuple[str, dict]]]:
    """The comparison with each configuration that one of `paths` tuned on this setup at the
    options chosen there (no sweep here); per configuration found, the file it came from and
    its row there (whose `tuning` holds the sweep it was tuned over)."""
    wanted = {config.name: config for config in comparison}

    def untuned(options: dict) -> dict:
        return {key: value for key, value in options.items() if key not in TUNED_KEYS}

    found: dict[str, tuple[str, dict]] = {}
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"--tuned-in {path}: no such file; name the benchmark JSONs that tuned these methods, "
                             "or give --tuned-in with no path to tune every method here")
        with open(path) as f:
            result = json.load(f)
        differs = [key for key in SAME_SETUP if result.get("arguments", {}).get(key) != getattr(args, key)]
        if differs:
            harness.progress(f"--tuned-in {path}: not this setup ({', '.join(differs)} differ); not used")
            continue
        for row in result["rows"]:
            config = wanted.get(row["config"])
            if (config and row["config"] not in found and row.get("tuning")
                    and untuned(row["options"]) == untuned(config.options)):
                found[row["config"]] = (os.path.basename(path), row)
    tuned = [replace(config, options=found[config.name][1]["options"], sweep=(), tuned_after=None)
             if config.name in found else config for config in comparison]
    return tuned, found


def record_tuning(rows: list[dict], comparison: list[Config], tuned_in: dict[str, tuple[str, dict]],
                  sweep: tuple[dict, ...], tuning_seeds: list[int]) -> str:
    """Sets each row's `tuned_in` and returns the header's words for it: the JSON its options
    came from, "here" where it was tuned in this run, for a row tuned after another that
    row's, and None where it was not tuned (its options as given)."""
    by_name = {config.name: config for config in comparison}

    def source(name: str) -> str | None:
        config = by_name[name]
        if name in tuned_in:
            return tuned_in[name][0]
        if config.tuned_after:
            return source(config.tuned_after)
        return "here" if config.sweep and tuning_seeds else None

    for row in rows:
        row["tuned_in"] = source(row["config"])
    tuned_here = [config.name for config in comparison if config.sweep]
    return "; ".join([f"{name} at {path}'s tuned options {row['chosen']}"
                      for name, (path, row) in tuned_in.items() if name in by_name]
                     + ([f"{', '.join(tuned_here)}: {harness.lr_words(sweep, tuning_seeds, LR, WITH_OUTER_STEP)}"]
                        if tuned_here else []))


def common_target(rows: list[dict]) -> tuple[float, str]:
    """The lowest validation loss every row's mean curve reaches, and the row that sets it: a
    target on which every row has a time (DDP's final loss may be one no other row reaches)."""
    best = {row["config"]: min(loss for _, _, loss in row["curve"]) for row in rows}
    worst = max(best, key=best.get)
    return best[worst], worst


def mean_curve(runs: list[dict]) -> list[tuple[int, int, float]]:
    return [(step, sent, statistics.fmean(run["curve"][i][2] for run in runs))
            for i, (step, sent, _) in enumerate(runs[0]["curve"])]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--sync-every", type=int, default=8, help="DiLoCo's and LoRDO's sync interval H")
    parser.add_argument("--tuned-in", nargs="*", default=list(TUNED_IN), metavar="JSON",
                        help="benchmark JSONs whose tuned options a method of the same name and setup takes")
    parser.add_argument("--latency-us", type=float, default=100.0, help="every link's latency alpha")
    parser.add_argument("--overlap", action="store_true", help="communication overlaps compute: a step takes the max")
    parser.add_argument("--plot", help="PNG of validation loss against modeled time, one panel per link")
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    setup = replace(setup_of(args, sync_every=8), eval_every=max(1, args.steps // 16))
    seeds, tuning_seeds = harness.seeds_of(args)
    sweep = harness.lr_sweep(args, LRS)
    comparison, tuned_in = tuned_elsewhere(configs(args.rank, args.sync_every, sweep), args.tuned_in, args)
    calibration = calibrate(args.workers)
    print(f"gloo all-reduce among {args.workers} processes on this machine, fitted: alpha "
          f"{calibration['alpha_s'] * 1e6:.1f} us, beta {calibration['beta_bytes_per_s'] * 8 / 1e9:.2f} Gbit/s")
    print_table(calibration["rows"], [("bytes", "bytes", ","), ("measured_ms", "measured ms", ".3f"),
                                      ("modeled_ms", "modeled ms", ".3f"), ("modeled_vs_measured", "modeled/measured", ".2f")])
    # Timed first, on an idle machine: compute time does not depend on the learning rates tuned below.
    timing_compiler = "aot_eager" if args.quick else "inductor"
    # Four sync intervals run every graph of a periodic schedule at least twice.
    timing = replace(setup, seed=seeds[0], steps=min(setup.steps, 4 * args.sync_every + 2))
    compute = compute_ms({config.name: config.options for config in comparison}, timing, timing_compiler)
    rows = harness.compare(comparison, lambda config, seed: run_workers(
        worker, args.workers, timeout=3600, args=(config.options, replace(setup, seed=seed, lr=config.options["lr"]))
    )[0], seeds, tuning_seeds)
    for row, config in zip(rows, comparison):
        first = row["runs"][0]  # graphs, collectives and bytes do not depend on the seed
        row.update(options={**config.options, **row["chosen"]}, graphs=first["graphs"],
                   collectives=first["collectives"], bytes_per_worker=first["bytes_per_worker"],
                   curve=mean_curve(row["runs"]), compute_ms=compute[config.name])
        for run in row["runs"]:
            del run["graphs"], run["collectives"]
    target = rows[0]["mean"]
    common, setter = common_target(rows)
    links = times_to(target, rows, args)
    common_links = times_to(common, rows, args)
    tuning = record_tuning(rows, comparison, tuned_in, sweep, tuning_seeds)
    header = (f"tiny GPT, {args.workers} gloo workers x {args.batch} sequences of 128 bytes, {args.steps} steps, "
              f"seeds {seeds}, {tuning}, compiler {args.compiler}; modeled links: latency {args.latency_us:g} us, "
              f"{'overlapped with' if args.overlap else 'after'} compute; target: DDP's final validation loss "
              f"{target:.4f}")
    harness.report(rows, header, [("bytes_per_worker", "bytes/worker", ",")])
    columns = [("link", "link", "<"), ("config", "config", "<"), ("seconds", "seconds", ".1f"),
               ("speedup_vs_ddp", "x faster than ddp", ".2f"), ("total_s", "whole run s", ".1f"), ("note", "", "<")]
    print(f"time to DDP's final validation loss {target:.4f} (modeled seconds)")
    print_table(links, columns)
    print(f"time to {common:.4f}, the lowest loss every method reaches ({setter}'s best; modeled seconds)")
    print_table(common_links, columns)
    if args.plot:
        _plot(links, rows, target, args.plot, header)
    return harness.save(args.json, header, rows, args, calibration=calibration, target=target,
                        time_to_loss=links, common_target={"loss": common, "set_by": setter},
                        time_to_common_loss=common_links)


def times_to(target: float, rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """Per link and row: the modeled seconds to `target` (or to the row's best loss, marked),
    the whole run's seconds, and the speedup against DDP where both reach it."""
    links = []
    for name, bits in LINKS:
        for row in rows:
            points = modeled_curve(row, bits, args.latency_us * 1e-6, args.workers, args.overlap)
            seconds, loss, reached = time_to(target, points)
            links.append({"link": name, "config": row["config"], "seconds": seconds, "loss": loss, "reached": reached,
                          "total_s": points[-1][0], "points": points})
        ddp = next(link for link in links if link["link"] == name and link["config"] == "ddp")
        for link in links[-len(rows):]:
            link["speedup_vs_ddp"] = ddp["seconds"] / link["seconds"] if link["reached"] and ddp["reached"] else None
            link["note"] = "" if link["reached"] else f"not reached (best {link['loss']:.4f})"
    return links


def _plot(links: list[dict], rows: list[dict], target: float, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey=True)
    for ax, (name, _) in zip(axes.flat, LINKS):
        for row in rows:
            link = next(l for l in links if l["link"] == name and l["config"] == row["config"])
            ax.plot(*zip(*link["points"]), marker="o", markersize=2, label=row["config"])
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("modeled wall-clock (s)")
        ax.set_ylabel("validation loss, mean over seeds")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
