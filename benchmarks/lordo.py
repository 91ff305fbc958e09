"""LoRDO against its baselines on paired seeds: validation loss and bytes sent, gloo workers, tiny GPT.

    python -m benchmarks.lordo --json benchmarks/results/lordo.json \\
        --plot benchmarks/results/lordo.png --markdown benchmarks/results/lordo.md [--seeds 3] [--quick]

Every configuration trains the same tiny GPT for the same steps, each worker on its own
batches of CPython's bundled help text, on the same seeds (a seed fixes the model and
every worker's batches: `benchmarks.harness`), at the peak learning rate its tuning seeds
chose from the same sweep (`LRS`, or --lrs). The rows, and the baseline each is compared with:

- "ddp": DDP AdamW, the reference;
- "diloco" and "low_rank_ddp r=R" (R in --ranks): against ddp. DiLoCo's outer learning rate
  and momentum are tuned with its learning rate (`DILOCO_GRID`);
- "lordo r=R" (the defaults of `lc.LoRDO`) and one knob changed from them: "lordo local
  projection r=R", "lordo omega=1 r=R" (no full-rank term), "lordo payload=full r=R",
  "lordo payload=low_rank r=R": against low-rank DDP at the same rank;
- "low_rank_ddp r=R batch=B" (a baseline itself: DDP runs at the other batch) and "lordo
  r=R batch=B" against it (R the first rank, B --small-batch): the small-batch pair.

The paper's claims, each a verdict on a paired 95% interval (`harness.verdict`):

- LoRDO is within 1% of low-rank DDP (the tolerance is 1% of low-rank DDP's mean loss,
  in nats) while sending >= 10x fewer bytes than it, and >= 100x fewer than DDP;
- the global projection beats the local one (local minus global > 0);
- the full-rank term helps (omega=1 minus the default > 0);
- LoRDO gains most at small batch (its gap to low-rank DDP is smaller at batch B);
- DiLoCo is within 1% of DDP.

Bytes per worker are counted by each compiled step (`step.comm_report()`), optimizer-state
bytes by `step.memory_report()`; neither depends on the seed, so both are the first
seed's. The curve (validation loss against bytes sent) is the mean over the seeds.
`--quick`: 2 workers, 16 steps of a one-layer model, sync every 8, the first rank only.
`--only NAME ...`: a partial run of the rows named (the full run is 16 rows of 6 runs of a
few minutes each on 2 cores); the claims table reads whichever rows the JSON holds.
`run` (and `policy`) also train the rows of `benchmarks.sync`, `benchmarks.lordo_sweep` and
`benchmarks.lordo_bytes`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
from dataclasses import replace

import torch

import lordo_compile as lc
from lordo_compile.experiment import RunConfig, train_tiny_gpt
from lordo_compile.launch import run_workers

from . import harness
from .harness import Config

SYNC_EVERY = 32
LR, LRS = harness.LR, harness.LRS
# DiLoCo's outer-step defaults were chosen for 500-step sync intervals; these are tuned per interval.
DILOCO_GRID = tuple({"outer_lr": lr, "outer_momentum": m} for lr in (0.5, 0.7, 1.0) for m in (0.5, 0.9))
TOLERANCE = 0.01  # "within 1%": a fraction of the baseline's mean loss
BYTES = [("bytes_per_worker", "bytes/worker", ","), ("ratio_vs_baseline", "x fewer vs base", ".1f"),
         ("relative_diff", "rel. diff", "+.2%")]
COLUMNS = BYTES + [("ratio_vs_ddp", "x fewer vs ddp", ".1f"), ("state_bytes", "opt state B", ",")]


def policy(options: dict, mesh=None) -> lc.Policy:
    """The policy a configuration's options name (`policy`, `sync_every`, `rank`, and `fields`:
    the preset's other arguments); `mesh`: two levels, the sync over its outer dimension."""
    kind, every, fields = options["policy"], options.get("sync_every"), options.get("fields", {})
    levels = {} if mesh is None else {"mesh": mesh}
    if kind == "ddp":
        return lc.Policy.ddp()
    if kind == "local_sgd":
        return lc.Policy.local_sgd(every, **levels, **fields)
    if kind == "diloco":
        return lc.Policy.diloco(every, outer_lr=options["outer_lr"], outer_momentum=options["outer_momentum"],
                                **levels, **fields)
    if kind == "low_rank_ddp":
        # Its projection is refreshed as often as LoRDO's (at each sync).
        return lc.Policy.low_rank_ddp(options["rank"], update_proj_gap=every)
    return lc.Policy.lordo(options["rank"], every, **levels, **fields)


def diloco_sweep(sweep: tuple[dict, ...]) -> tuple[dict, ...]:
    return tuple({**lr, **outer} for lr in sweep for outer in DILOCO_GRID)


def run(config: Config, seed: int, setup: RunConfig, workers: int) -> dict:
    """Train `config` from `seed` on `workers` gloo workers; rank 0's figures."""
    options = config.options
    setup = replace(setup, seed=seed, lr=options["lr"], batch_size=options.get("batch", setup.batch_size))
    return run_workers(worker, workers, timeout=3600, args=(options, setup))[0]


def worker(rank: int, world: int, options: dict, setup: RunConfig) -> dict:
    # Only rank 0's curve is kept, and evaluating holds no collective: the others skip it.
    result = train_tiny_gpt(policy(options), setup if rank == 0 else replace(setup, eval_every=0))
    return {"val_loss": result.val_loss, "bytes_per_worker": result.step.comm_report().bytes_sent,
            "state_bytes": result.step.memory_report().state_bytes_after, "curve": result.curve,
            "parameters": sum(p.numel() for p in result.model.parameters())}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=harness.STEPS)
    parser.add_argument("--batch", type=int, default=4,
                        help="sequences of 128 bytes per worker per step (4 workers x 4: the regime's 16)")


def setup_of(args: argparse.Namespace, **quick) -> RunConfig:
    """The run every configuration shares. `--quick` makes it a smoke run: 2 workers, 16
    steps of a one-layer model, aot_eager, and the benchmark's own `quick` argument values."""
    if args.quick:
        vars(args).update(workers=2, steps=16, compiler="aot_eager", **quick)
    return RunConfig(steps=args.steps, batch_size=args.batch, compiler=args.compiler, val_batches=0,
                     layers=1 if args.quick else RunConfig.layers)


def compare_on_workers(comparison: list[Config], setup: RunConfig, args: argparse.Namespace, sync: str,
                       diloco: str = "") -> tuple[list[dict], str]:
    """`harness.compare` of configurations trained on `args.workers` gloo workers, each row's
    figures added (`add_figures`), and the header its table prints (`sync`: how often the
    rows sync, `diloco`: how DiLoCo's outer step was tuned, as the header says them)."""
    seeds, tuning_seeds = harness.seeds_of(args)
    rows = harness.compare(comparison, lambda config, seed: run(config, seed, setup, args.workers), seeds,
                           tuning_seeds)
    add_figures(rows, comparison)
    header = (f"tiny GPT ({rows[0]['runs'][0]['parameters']:,} parameters), {args.workers} gloo workers x "
              f"{args.batch} sequences of 128 bytes, {args.steps} steps, {sync}, seeds {seeds}, "
              f"{harness.lr_words(harness.lr_sweep(args, LRS), tuning_seeds, LR, diloco)}, compiler {args.compiler}")
    return rows, header


WITH_OUTER_STEP = "DiLoCo's with its outer lr and momentum"


def add_figures(rows: list[dict], configs: list[Config]) -> None:
    """Each row's options, bytes, state bytes and mean curve, and its `ratios`."""
    for row, config in zip(rows, configs):
        first, curves = row["runs"][0], [r["curve"] for r in row["runs"]]
        row.update(options={**config.options, **row["chosen"]}, bytes_per_worker=first["bytes_per_worker"],
                   state_bytes=first["state_bytes"],
                   curve=[(step, sent, statistics.fmean(c[i][2] for c in curves))
                          for i, (step, sent, _) in enumerate(curves[0])])
    ratios(rows)


def ratios(rows: list[dict]) -> None:
    """Each row's ratios and relative difference against its baseline (and the "ddp" row,
    where there is one), set again when a partial run joins a saved JSON."""
    by_name = {row["config"]: row for row in rows}
    for row in rows:
        base, ddp, sent = by_name.get(row["baseline"]), by_name.get("ddp"), row["bytes_per_worker"] or 1
        row["ratio_vs_baseline"] = base["bytes_per_worker"] / sent if base else None
        row["relative_diff"] = row["diff_vs_baseline"] / base["mean"] if base else None
        row["ratio_vs_ddp"] = ddp["bytes_per_worker"] / sent if ddp else None


def claim(text: str, row: dict, better: str = "lower", tolerance: float = 0.0) -> str:
    return (f"{text}: {row['diff_vs_baseline']:+.4f} nats [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]: "
            f"{harness.verdict(row, better, tolerance)}")


def within(row: dict, base: dict, name: str) -> str:
    return claim(f"{row['config']} within 1% of {name}", row, "lower", TOLERANCE * base["mean"])


def headline(row: dict, base: dict) -> str:
    """The paper's claim for a LoRDO row: within 1% of low-rank DDP (`base`) at >= 10x fewer
    bytes than it, and >= 100x fewer than DDP (where the comparison has it)."""
    targets = (("low-rank DDP", row["ratio_vs_baseline"], 10), ("DDP", row["ratio_vs_ddp"], 100))
    return "; ".join([within(row, base, "low-rank DDP")] + [
        f"{ratio:.1f}x fewer bytes than {name} (>= {target}x: {'met' if ratio >= target else 'NOT met'})"
        for name, ratio, target in targets if ratio is not None])


def configs(ranks: list[int], small_batch: int, sync_every: int, sweep: tuple[dict, ...]) -> list[Config]:
    def lordo(name: str, rank: int, base: str, **options) -> Config:
        return Config(name, {"policy": "lordo", "rank": rank, "sync_every": sync_every, "lr": LR, **options},
                      base, sweep)

    def low_rank_ddp(name: str, rank: int, base: str | None, **options) -> Config:
        return Config(name, {"policy": "low_rank_ddp", "rank": rank, "sync_every": sync_every, "lr": LR, **options},
                      base, sweep)

    rows = [Config("ddp", {"policy": "ddp", "lr": LR}, sweep=sweep),
            Config("diloco", {"policy": "diloco", "sync_every": sync_every, "lr": LR, "outer_lr": 0.7,
                              "outer_momentum": 0.9}, "ddp", diloco_sweep(sweep))]
    for rank in ranks:
        base = f"low_rank_ddp r={rank}"
        rows += [low_rank_ddp(base, rank, "ddp"),
                 lordo(f"lordo r={rank}", rank, base),
                 lordo(f"lordo local projection r={rank}", rank, base, fields={"projection": "local"}),
                 lordo(f"lordo omega=1 r={rank}", rank, base, fields={"omega": 1.0}),
                 lordo(f"lordo payload=full r={rank}", rank, base, fields={"payload": "full"}),
                 lordo(f"lordo payload=low_rank r={rank}", rank, base, fields={"payload": "low_rank"})]
    # No baseline for the small-batch low-rank DDP: DDP runs at the other batch size.
    small = f"r={ranks[0]} batch={small_batch}"
    return rows + [low_rank_ddp(f"low_rank_ddp {small}", ranks[0], None, batch=small_batch),
                   lordo(f"lordo {small}", ranks[0], f"low_rank_ddp {small}", batch=small_batch)]


def claims(rows: list[dict]) -> list[str]:
    """Each claim whose rows ran (all of them, unless --only chose some, or partial runs with
    other --ranks were merged: the ranks and the small batch are the rows' own options)."""
    by = {row["config"]: row for row in rows}
    ranks = sorted({row["options"]["rank"] for row in rows if "rank" in row["options"] and "batch" not in row["options"]})
    small_batches = [row["options"] for row in rows if "batch" in row["options"] and "rank" in row["options"]]

    def ran(*names: str) -> bool:
        return all(name in by for name in names)

    def gap(name: str) -> list[float]:
        return [a - b for a, b in zip(by[f"lordo {name}"]["values"], by[f"low_rank_ddp {name}"]["values"])]

    lines = []
    for rank in ranks:
        lordo, low_rank = f"lordo r={rank}", f"low_rank_ddp r={rank}"
        if ran(lordo, low_rank):
            lines.append(headline(by[lordo], by[low_rank]))
        for variant, text in (("local projection", "the global projection beats the local one (local - global)"),
                              ("omega=1", "the full-rank term helps (omega=1 - default)")):
            if ran(lordo, f"lordo {variant} r={rank}"):
                lines.append(claim(f"r={rank}: {text}", harness.paired(by[f"lordo {variant} r={rank}"]["values"],
                                                                       by[lordo]["values"]), "higher"))
    for options in small_batches[:1]:
        small, large = f"r={options['rank']} batch={options['batch']}", f"r={options['rank']}"
        if ran(f"lordo {small}", f"low_rank_ddp {small}", f"lordo {large}", f"low_rank_ddp {large}"):
            lines.append(claim(f"LoRDO gains most at small batch (its gap to low-rank DDP at {small} - at {large})",
                               harness.paired(gap(small), gap(large)), "lower"))
    if ran("diloco", "ddp"):
        lines.append(within(by["diloco"], by["ddp"], "DDP"))
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--small-batch", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--sync-every", type=int, default=SYNC_EVERY)
    parser.add_argument("--plot", help="PNG of validation loss against bytes sent (needs matplotlib)")
    parser.add_argument("--markdown", help="write a results page (table, claims, plot, command) here")
    parser.add_argument("--redraw", metavar="JSON", help="no training: redraw --plot/--markdown from a saved --json")
    harness.add_arguments(parser, only=True)
    args = parser.parse_args(argv)
    if args.redraw:
        with open(args.redraw) as f:
            result = json.load(f)
        _draw(result, args.plot, args.markdown, args.redraw)
        return result
    # The plot's curve: 9 points.
    setup = replace(setup_of(args, sync_every=8, ranks=args.ranks[:1]), eval_every=max(1, args.steps // 8))
    every_config = configs(args.ranks, args.small_batch, args.sync_every, harness.lr_sweep(args, LRS))
    comparison = harness.select(every_config, args.only)
    rows, header = compare_on_workers(comparison, setup, args, f"sync every {args.sync_every}",
                                      diloco=WITH_OUTER_STEP)
    harness.report(rows, header, COLUMNS)
    print("\n".join(claims(rows)))
    # The rows' names carry their rank and batch, so partial runs with other --ranks share a JSON.
    result = harness.save(args.json, header, rows, args, selecting=("ranks", "plot", "markdown", "redraw"),
                          claims=claims, configs=every_config, figures=ratios)
    _draw(result, args.plot, args.markdown, args.json)
    return result


def _draw(result: dict, plot: str | None, markdown: str | None, json_path: str | None) -> None:
    if plot:
        _plot(result["rows"], plot, result["header"])
    if markdown:
        _markdown(result, markdown, plot, json_path)


def _plot(rows: list[dict], path: str, title: str) -> None:
    """Mean validation loss against cumulative bytes, one line per row (points before the
    first byte is sent sit off a log axis and are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6.5))
    colors = plt.get_cmap("tab20").colors
    ranks = sorted({row["options"]["rank"] for row in rows if "rank" in row["options"]})
    for i, row in enumerate(rows):
        if "curve" not in row:  # rows rebuilt from a run's printed log ("source") have none
            continue
        curve = [(sent, loss) for _, sent, loss in row["curve"] if sent > 0]
        rank = row["options"].get("rank")
        style = ":" if "batch" in row["options"] else "--" if rank not in (None, ranks[0]) else "-"
        ax.plot(*zip(*curve), style, color=colors[i % len(colors)], marker="o", markersize=3, label=row["config"])
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per worker (cumulative)")
    ax.set_ylabel("validation loss (nats per byte), mean over seeds")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _markdown(result: dict, path: str, plot: str | None, json_path: str | None) -> None:
    """The results page: the command that regenerates it, the table, the claims, the plot."""
    arguments = {**result["arguments"], "json": json_path, "plot": plot, "markdown": path, "redraw": None}
    def flag(key: str, value) -> str:
        values = value if isinstance(value, list) else [value]
        return f"--{key.replace('_', '-')}" + ("" if value is True else " " + shlex.join(map(str, values)))

    flags = [flag(key, value) for key, value in arguments.items() if value not in (None, False)]
    columns = harness.COLUMNS + COLUMNS
    lines = ["# LoRDO results", "", "Regenerate this page, its plot and its JSON with:", "", "```bash",
             " ".join(["python -m benchmarks.lordo", *flags]), "```", "",
             result["header"] + f"; {platform.machine()} CPU, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}.", "", "| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in result["rows"]:
        cells = ["" if row[k] is None else format(row[k], spec).strip() for k, _, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "`diff vs base` and its 95% interval are per-seed differences against the row's baseline "
              "(`benchmarks/harness.py`). Claims:", ""] + [f"- {line}" for line in result["claims"]]
    if plot:
        relative = os.path.relpath(plot, os.path.dirname(os.path.abspath(path)))
        lines += ["", f"![validation loss against bytes sent]({relative})"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
