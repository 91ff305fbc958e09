"""LoRDO against its baselines: bytes sent vs validation loss, 4 gloo workers, tiny GPT.

    python -m benchmarks.lordo --json benchmarks/results/lordo.json \\
        --plot benchmarks/results/lordo.png --markdown benchmarks/RESULTS.md [--quick]

Every row trains the same tiny GPT (same seed) for the same steps on the same number of
tokens, each worker on its own batches of CPython's bundled help text: DDP AdamW,
low-rank DDP, DiLoCo, and LoRDO (local projection, global with omega = 1, the default
omega < 1, and each compressed payload) at two ranks, plus a small-batch pair. Bytes are
counted by each compiled step (`step.comm_report()`); optimizer-state bytes by
`step.memory_report()`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import lordo_compile as lc
from lordo_compile.experiment import RunConfig, train_tiny_gpt
from lordo_compile.launch import run_workers
from lordo_compile.models import TinyGPT

from .common import print_table, write_json

SYNC_EVERY = 32
COLUMNS = [("label", "policy", "<36"), ("bytes_per_worker", "bytes/worker", ","),
           ("ratio_vs_ddp", "x fewer vs ddp", ".1f"), ("ratio_vs_low_rank_ddp", "x fewer vs lr-ddp", ".1f"),
           ("val_loss", "val loss", ".3f"), ("relative_gap", "gap vs lr-ddp", "+.2%"), ("state_bytes", "opt state B", ",")]


def _rows(ranks: list[int], small_batch: int) -> list[dict]:
    """Each LoRDO row changes one knob from the defaults (`lc.LoRDO`), the "lordo" row has none."""
    rows = [dict(policy="ddp", rank=None, make="ddp"), dict(policy="diloco", rank=None, make="diloco")]
    for rank in ranks:
        rows += [
            dict(policy="low_rank_ddp", rank=rank, make="low_rank_ddp"),
            dict(policy="lordo local projection", rank=rank, make="lordo", options=dict(projection="local")),
            dict(policy="lordo omega=1", rank=rank, make="lordo", options=dict(omega=1.0)),
            dict(policy="lordo", rank=rank, make="lordo", options={}),
            dict(policy="lordo payload=full", rank=rank, make="lordo", options=dict(payload="full")),
            dict(policy="lordo payload=low_rank", rank=rank, make="lordo", options=dict(payload="low_rank")),
        ]
    rows += [dict(policy="low_rank_ddp", rank=ranks[0], make="low_rank_ddp", batch=small_batch),
             dict(policy="lordo", rank=ranks[0], make="lordo", options={}, batch=small_batch)]
    return rows


def run_rows(rows: list[dict], workers: int, steps: int, batch: int, compiler: str) -> list[dict]:
    """Train every row with `workers` gloo workers; ratios and gaps are against the rows
    named "ddp" and "low_rank_ddp" (same rank and batch), where present."""
    for row in rows:
        result = run_workers(worker, workers, timeout=3600, args=(row, steps, batch, compiler))[0]
        row.update(result)
        row["label"] = _label(row)
        print(f"  {row['label']}: val loss {row['val_loss']:.3f}, {row['bytes_per_worker']:,} bytes", flush=True)
    ddp = next((r for r in rows if r["policy"] == "ddp"), None)
    for row in rows:
        candidates = [r for r in rows if r["policy"] == "low_rank_ddp" and r.get("batch") == row.get("batch")]
        base = ([r for r in candidates if r["rank"] == row["rank"]] or candidates)[0]
        sent = row["bytes_per_worker"] or 1
        if ddp is not None:
            row["ratio_vs_ddp"] = ddp["bytes_per_worker"] / sent
        row["ratio_vs_low_rank_ddp"] = base["bytes_per_worker"] / sent
        row["gap_vs_low_rank_ddp"] = row["val_loss"] - base["val_loss"]
        row["relative_gap"] = row["gap_vs_low_rank_ddp"] / base["val_loss"]
    return rows


def _policy(row: dict) -> lc.Policy:
    if row["make"] == "ddp":
        return lc.Policy.ddp()
    if row["make"] == "diloco":
        return lc.Policy.diloco(sync_every=SYNC_EVERY)
    if row["make"] == "low_rank_ddp":
        return lc.Policy.low_rank_ddp(rank=row["rank"], update_proj_gap=SYNC_EVERY)
    return lc.Policy.lordo(rank=row["rank"], sync_every=SYNC_EVERY, **row["options"])


def worker(rank: int, world: int, row: dict, steps: int, batch: int, compiler: str) -> dict:
    config = RunConfig(steps=steps, batch_size=row.get("batch", batch), compiler=compiler,
                       eval_every=max(1, steps // 8))
    started = time.perf_counter()
    run = train_tiny_gpt(_policy(row), config)
    return {"val_loss": run.val_loss, "bytes_per_worker": run.step.comm_report().bytes_sent,
            "state_bytes": run.step.memory_report().state_bytes_after, "curve": run.curve,
            "wall_s": time.perf_counter() - started}


def _label(row: dict) -> str:
    label = row["policy"] + (f" r={row['rank']}" if row["rank"] else "")
    return label + (f" batch={row['batch']}" if "batch" in row else "")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="sequences of 128 bytes per worker per step")
    parser.add_argument("--small-batch", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs=2, default=[8, 32])
    parser.add_argument("--compiler", default="aot_eager", choices=["aot_eager", "inductor"])
    parser.add_argument("--quick", action="store_true", help="32 steps, rank 8 only: a smoke run")
    parser.add_argument("--json")
    parser.add_argument("--plot", help="PNG of validation loss against bytes sent (needs matplotlib)")
    parser.add_argument("--markdown", help="write a results page (table, plot, command) here")
    parser.add_argument("--redraw", metavar="JSON", help="no training: redraw --plot/--markdown from a saved --json")
    args = parser.parse_args(argv)
    if args.redraw:
        return _redraw(args)
    steps = 32 if args.quick else args.steps
    ranks = [args.ranks[0], args.ranks[0]] if args.quick else args.ranks
    rows = run_rows(_rows(sorted(set(ranks)) if args.quick else ranks, args.small_batch), args.workers, steps,
                    args.batch, args.compiler)
    columns = COLUMNS
    header = (f"tiny GPT ({sum(p.numel() for p in TinyGPT().parameters()):,} parameters), {args.workers} gloo workers x {args.batch} sequences of 128 bytes, {steps} steps, "
              f"sync every {SYNC_EVERY}, compiler {args.compiler}")
    print(header)
    print_table(rows, columns)
    targets = _targets(rows, ranks)
    for line in targets:
        print(line)
    keep = ("policy", "rank", "label", "bytes_per_worker", "ratio_vs_ddp", "ratio_vs_low_rank_ddp", "val_loss",
            "gap_vs_low_rank_ddp", "relative_gap", "state_bytes", "curve", "wall_s", "batch")
    result = {"header": header, "steps": steps, "workers": args.workers, "sync_every": SYNC_EVERY,
              "rows": [{k: row[k] for k in keep if k in row} for row in rows], "targets": targets}
    write_json(args.json, result)
    if args.plot:
        _plot(rows, args.plot, header)
    if args.markdown:
        _markdown(args, rows, columns, header, targets)
    return result


def _redraw(args) -> dict:
    with open(args.redraw) as f:
        result = json.load(f)
    args.workers, args.steps, args.json = result["workers"], result["steps"], args.redraw
    if args.plot:
        _plot(result["rows"], args.plot, result["header"])
    if args.markdown:
        _markdown(args, result["rows"], COLUMNS, result["header"], result["targets"])
    return result


def _targets(rows: list[dict], ranks: list[int]) -> list[str]:
    """The issue's targets, checked on the default LoRDO row at each rank."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = []
    for rank in sorted(set(ranks)):
        default = next(r for r in rows if r["policy"] == "lordo" and r["rank"] == rank and "batch" not in r)
        fewer, gap = default["ratio_vs_low_rank_ddp"], default["relative_gap"]
        lines.append(
            f"r={rank}: default LoRDO sends {fewer:.1f}x fewer bytes than low-rank DDP (target >= 10x: "
            f"{verdict(fewer >= 10)}) at {gap:+.2%} validation loss (target within 1%: {verdict(gap <= 0.01)}); "
            f"{default.get('ratio_vs_ddp', float('nan')):.0f}x fewer than DDP (target >= 100x with a compressed "
            f"payload: {verdict(default.get('ratio_vs_ddp', 0) >= 100)})")
    return lines


def _plot(rows: list[dict], path: str, title: str) -> None:
    """Validation loss against cumulative bytes, one line per row (points before the first
    byte is sent sit off a log axis and are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6.5))
    colors = plt.get_cmap("tab20").colors
    ranks = sorted({r["rank"] for r in rows if r.get("rank")})
    for i, row in enumerate(rows):
        curve = [(b, loss) for _, b, loss in row["curve"] if b > 0]
        style = ":" if "batch" in row else "--" if row.get("rank") and row["rank"] != ranks[0] else "-"
        ax.plot(*zip(*curve), style, color=colors[i % len(colors)], marker="o", markersize=3, label=row["label"])
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per worker (cumulative)")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _markdown(args, rows, columns, header, targets) -> None:
    flags = {"--workers": args.workers, "--steps": args.steps, "--batch": args.batch, "--compiler": args.compiler,
             "--json": args.json, "--plot": args.plot, "--markdown": args.markdown}
    command = "python -m benchmarks.lordo" + "".join(f" {k} {v}" for k, v in flags.items() if v is not None)
    command += " --quick" if args.quick else ""
    lines = ["# LoRDO results", "", "Regenerate this page, its plot and its JSON with:", "", "```bash", command,
             "```", "", header + f"; {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}.",
             "", "| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format(row[k], spec) if isinstance(row[k], (int, float)) else str(row[k]) for k, _, spec in columns]
        lines.append("| " + " | ".join(c.strip() for c in cells) + " |")
    lines += ["", "Targets (the paper's headline at this scale):", ""] + [f"- {t}" for t in targets]
    if args.plot:
        relative = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.markdown)))
        lines += ["", f"![validation loss against bytes sent]({relative})"]
    with open(args.markdown, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
