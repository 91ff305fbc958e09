"""The claims table: every paper claim this project tests, our paired difference, the verdict.

    python -m benchmarks.claims [--markdown benchmarks/CLAIMS.md] [--results benchmarks/results]

Reads the full runs' JSON in --results (written by each benchmark's `--json`), recomputes
each claim's paired per-seed difference and its 95% interval from the rows' per-seed
values (`benchmarks.harness`), and gives ALGORITHMS.md section 10's verdict. A claim whose
JSON is missing, or was written before the harness (no per-seed values), is listed as not
run, with the command that runs it. A claim's "run with" is the command lines its JSON
records (each benchmark's own, partial runs' included), or, for a JSON written before they
were recorded, the command typed here. Nothing here trains.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from . import harness
from .common import print_table


@dataclass(frozen=True)
class Claim:
    """`terms`: the per-seed figure, a signed sum of rows' validation losses ((+1, "lordo r=8"),
    (-1, "low_rank_ddp r=8")). `better`: the side of zero (or of `tolerance` x the mean of
    row `relative_to`) the paper puts that figure on. `fewer_bytes`: (row, baseline, at
    least): the paper also claims the row sends that many times fewer bytes."""

    paper: str
    source: str
    command: str
    terms: tuple[tuple[int, str], ...]
    better: str = "lower"
    tolerance: float = 0.0
    relative_to: str | None = None
    fewer_bytes: tuple[str, str, float] | None = None


def _versus(config: str, baseline: str) -> tuple[tuple[int, str], ...]:
    return ((1, config), (-1, baseline))


LORDO = "python -m benchmarks.lordo --json benchmarks/results/lordo.json"


def _lordo_claims() -> list[Claim]:
    claims = []
    for rank in (8, 32):
        low_rank = f"low_rank_ddp r={rank}"
        claims += [Claim(f"LoRDO r={rank} is within 1% of low-rank DDP while sending >= 10x fewer bytes",
                         "lordo.json", LORDO, _versus(f"lordo r={rank}", low_rank), "lower", 0.01, low_rank,
                         (f"lordo r={rank}", low_rank, 10))]
    claims += [
        Claim("LoRDO's global projection beats a per-worker (local) one (r=8)", "lordo.json", LORDO,
              _versus("lordo local projection r=8", "lordo r=8"), "higher"),
        Claim("LoRDO's full-rank quasi-hyperbolic term helps (omega=1 drops it; r=8)", "lordo.json", LORDO,
              _versus("lordo omega=1 r=8", "lordo r=8"), "higher"),
        Claim("LoRDO's gap to low-rank DDP shrinks at small batch (r=8, batch 2 against 4 per worker)", "lordo.json", LORDO,
              ((1, "lordo r=8 batch=2"), (-1, "low_rank_ddp r=8 batch=2"), (-1, "lordo r=8"), (1, "low_rank_ddp r=8"))),
    ]
    return claims


SYNC = ("python -m benchmarks.sync --every 8 --compiler aot_eager --lrs 0.001 0.002 0.004 "
        "--json benchmarks/results/sync.json")
CAGE = "python -m benchmarks.cage --json benchmarks/results/cage.json"
ECO = "python -m benchmarks.eco --json benchmarks/results/eco.json"
# Quantized weights at AdamW's tuned lr: a tuning seed put the int8 and W3/W4 rows at 2e-3,
# where full-rank AdamW's seeds spread 0.1-0.4 nats (RESULTS.md, "Regime").
ECO_AT_ADAMW_LR = ("python -m benchmarks.eco --formats fp8_e4m3 int4 --lrs 0.001 --jobs 2 "
                   "--json benchmarks/results/eco_at_adamw_lr.json")
CAGE_AT_ADAMW_LR = ("python -m benchmarks.cage --lrs 0.001 --jobs 2 --only 'STE W4A4' 'CAGE W4A4' "
                    "--json benchmarks/results/cage_at_adamw_lr.json")
ROTATION = "python -m benchmarks.rotation --json benchmarks/results/rotation.json"
TWO_LEVEL = "python -m benchmarks.two_level --json benchmarks/results/two_level.json"
GALORE = "python -m benchmarks.low_rank --compiler aot_eager --json benchmarks/results/low_rank.json"


def _eco_claims(fmt: str, source: str, command: str, lr: str = "", row: str = "eco") -> list[Claim]:
    """ECO's two claims at one format: against master weights and against naive re-quantization
    (`row`: "eco", rounding to nearest, or "eco sr", stochastic rounding)."""
    name = "ECO with stochastic rounding" if row == "eco sr" else "ECO"
    return [Claim(f"{name} ({fmt}) is within 1% of master weights{lr}", source, command,
                  _versus(f"{row} {fmt}", f"master {fmt}"), "lower", 0.01, f"master {fmt}"),
            Claim(f"{name} ({fmt}) beats naive re-quantization{lr}", source, command,
                  _versus(f"{row} {fmt}", f"naive {fmt}"))] + (
        [Claim(f"ECO's error feedback helps beyond stochastic rounding ({fmt}: ECO against naive, both rounding "
               f"stochastically){lr}", source, command, _versus(f"eco sr {fmt}", f"naive sr {fmt}"))]
        if row == "eco sr" else [])


CLAIMS = [
    Claim("GaLore r=16 is within 1% of dense AdamW", "low_rank.json", GALORE, _versus("galore r=16", "dense"),
          "lower", 0.01, "dense"),
    Claim("GaLore r=64 is within 1% of dense AdamW", "low_rank.json", GALORE, _versus("galore r=64", "dense"),
          "lower", 0.01, "dense"),
    *_lordo_claims(),
    *[Claim(f"DiLoCo (H={h}) is within 1% of DDP", "sync.json", SYNC, _versus(f"diloco H={h}", "ddp"), "lower", 0.01,
            "ddp") for h in (8, 32)],
    # Tuned DDP chose 2e-3, where its seeds spread by 0.41 nats: DDP at DiLoCo's own inner lr.
    Claim("DiLoCo (H=8) is within 1% of DDP, both at DiLoCo's inner lr (1e-3)", "sync.json", SYNC,
          _versus("diloco H=8", "ddp lr=1e-3"), "lower", 0.01, "ddp lr=1e-3"),
    *[Claim(f"DiLoCo beats plain model averaging (local SGD) at H={h}", "sync.json", SYNC,
            _versus(f"diloco H={h}", f"local_sgd H={h}")) for h in (8, 32)],
    *[Claim(f"Two levels (DDP inside nodes of 2, {name} across them) beat flat {name} over 4 workers (H=8)",
            "two_level.json", TWO_LEVEL, _versus(f"{row} 2x2{rank} H=8", f"{row}{rank} H=8"))
      for name, row, rank in (("DiLoCo", "diloco", ""), ("LoRDO r=8", "lordo", " r=8"))],
    Claim("Two-level DiLoCo (2 x 2, H=8) is within 1% of DDP", "two_level.json", TWO_LEVEL,
          _versus("diloco 2x2 H=8", "ddp"), "lower", 0.01, "ddp"),
    Claim("Streaming DiLoCo (4 fragments, each all-reduce overlapping one step) is within 1% of DiLoCo (H=8)",
          "two_level.json", TWO_LEVEL, _versus("diloco F=4 tau=1 H=8", "diloco H=8"), "lower", 0.01, "diloco H=8"),
    Claim("CAGE at 3 bits reaches STE at 4 bits", "cage.json", CAGE, _versus("CAGE W3", "STE W4")),
    Claim("CAGE beats STE at W4A4 (both at AdamW's lr, 1e-3)", "cage_at_adamw_lr.json", CAGE_AT_ADAMW_LR,
          _versus("CAGE W4A4", "STE W4A4")),
    *_eco_claims("fp8_e4m3", "eco_at_adamw_lr.json", ECO_AT_ADAMW_LR, " (at AdamW's lr, 1e-3)"),
    *_eco_claims("fp8_e4m3", "eco_at_adamw_lr.json", ECO_AT_ADAMW_LR, " (at AdamW's lr, 1e-3)", "eco sr"),
    *_eco_claims("int8", "eco.json", ECO),
    *_eco_claims("int4", "eco_at_adamw_lr.json", ECO_AT_ADAMW_LR, " (at AdamW's lr, 1e-3)"),
    *_eco_claims("int4", "eco_at_adamw_lr.json", ECO_AT_ADAMW_LR, " (at AdamW's lr, 1e-3)", "eco sr"),
    Claim("EMA-Nesterov lowers AdamW's loss", "ema_nesterov.json",
          "python -m benchmarks.ema_nesterov --json benchmarks/results/ema_nesterov.json",
          _versus("EMA-Nesterov", "AdamW")),
    *[Claim(f"{bits}-bit optimizer moments (torchao, bitsandbytes) are within 1% of fp32 moments (AdamW)",
            "quantized_state.json", "python -m benchmarks.quantized_state --json benchmarks/results/quantized_state.json",
            _versus(f"AdamW {bits}-bit moments", "AdamW"), "lower", 0.01, "AdamW") for bits in (8, 4)],
    # The tuned run above chose 2e-3 for the quantized rows, where full-rank AdamW's seeds
    # spread 0.1-0.4 nats; at AdamW's own tuned lr the comparison is one of state alone.
    *[Claim(f"{bits}-bit optimizer moments are within 1% of fp32 moments (AdamW), both at AdamW's tuned lr",
            "quantized_state_at_adamw_lr.json", "python -m benchmarks.quantized_state --lrs 0.001 --compiler aot_eager "
            "--jobs 2 --json benchmarks/results/quantized_state_at_adamw_lr.json",
            _versus(f"AdamW {bits}-bit moments", "AdamW"), "lower", 0.01, "AdamW") for bits in (8, 4)],
    Claim("Adaptive rotation beats no rotation (W4A4)", "rotation.json", ROTATION, _versus("adaptive", "no rotation")),
    Claim("Adaptive rotation is no worse than always rotating (W4A4)", "rotation.json", ROTATION,
          _versus("adaptive", "always"), "lower", 0.01, "always"),
    Claim("DoCoM (top-k 1%) is within 1% of DDP", "gossip.json",
          "python -m benchmarks.gossip --json benchmarks/results/gossip.json", _versus("docom 1%", "ddp"), "lower",
          0.01, "ddp"),
]


def evaluate(claim: Claim, result: dict | None) -> dict:
    """The claim's row of the table: its paired difference, interval and verdict, or why not run."""
    only = ((result or {}).get("arguments") or {}).get("only")
    recorded = (result or {}).get("commands")
    # The command lines that wrote the JSON where it recorded them (harness.invoked), else the
    # claim's own, with the rows a partial run chose.
    command = ("; ".join(recorded) if recorded else
               claim.command + (" --only " + " ".join(f"'{name}'" for name in only) if only else ""))
    row = {"paper": claim.paper, "command": command, "source": claim.source}
    rows = {r.get("config"): r for r in (result or {}).get("rows", [])}
    missing = [name for _, name in claim.terms if "values" not in rows.get(name, {})]
    if result is None or missing:
        absent = [name for name in missing if name not in rows]
        why = ("no full run" if result is None else f"rows {absent} were not in the run" if absent else
               f"rows {missing} have no per-seed values (a run before the harness)")
        return {**row, "verdict": "not run", "why": why}
    values = [[sign * v for v in rows[name]["values"]] for sign, name in claim.terms]
    figure = [sum(per_seed) for per_seed in zip(*values)]
    paired = dict(zip(("diff_vs_baseline", "ci_low", "ci_high"), harness.paired_interval(figure)))
    tolerance = claim.tolerance * rows[claim.relative_to]["mean"] if claim.relative_to else 0.0
    verdict = harness.verdict(paired, claim.better, tolerance)
    row.update(paired, n_seeds=len(figure), tolerance=tolerance, verdict=verdict, header=result.get("header", ""),
               # The spread of what the claim compares against, not of another partial run's first row.
               seed_spread=max(rows[name].get("seed_spread", 0.0) for sign, name in claim.terms if sign < 0))
    edge = [name for _, name in claim.terms if rows[name].get("chosen_at_edge")]
    if edge:
        row["why"] = f"tuned lr at the sweep's end for {edge}"
    if claim.fewer_bytes:
        name, base, at_least = claim.fewer_bytes
        ratio = rows[base]["bytes_per_worker"] / rows[name]["bytes_per_worker"]
        row["fewer_bytes"] = ratio
        if ratio < at_least and verdict == "reproduced":
            row["verdict"] = "contradicted"
        row["why"] = "; ".join(filter(None, [row.get("why"), f"{ratio:.1f}x fewer bytes (claim: >= {at_least:g}x)"]))
    return row


def table(results: str) -> list[dict]:
    loaded: dict[str, dict | None] = {}
    for claim in CLAIMS:
        if claim.source not in loaded:
            path = os.path.join(results, claim.source)
            loaded[claim.source] = json.load(open(path)) if os.path.exists(path) else None
    return [evaluate(claim, loaded[claim.source]) for claim in CLAIMS]


def markdown(rows: list[dict]) -> str:
    lines = ["# Claims", "",
             "Generated by `python -m benchmarks.claims --markdown benchmarks/CLAIMS.md` from the JSON in "
             "`benchmarks/results/`; nothing here is typed by hand. Each figure is the mean per-seed difference "
             "of validation loss (nats per byte, whole held-out split) on paired seeds, with its 95% t interval; "
             "the verdict is ALGORITHMS.md section 10's: reproduced when the interval lies on the paper's side "
             "(of the tolerance, for \"within 1%\", which is 1% of the baseline's mean loss), contradicted when "
             "wholly on the other side, inconclusive otherwise. The regime each run used is in its JSON's "
             "`header` and in [the regime section](RESULTS.md#regime).", "",
             "| claim (paper) | ours: paired diff [95% interval] | seeds | verdict | notes | run with |", "|---|---|---|---|---|---|"]
    for row in rows:
        if row["verdict"] == "not run":
            figure, seeds = "", ""
        else:
            figure = f"{row['diff_vs_baseline']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]"
            seeds = str(row["n_seeds"])
            if row["tolerance"]:
                figure += f" (tolerance {row['tolerance']:.4f})"
        notes = "; ".join(filter(None, [row.get("why", ""), f"baseline seed spread {row['seed_spread']:.4f}"
                                        if "seed_spread" in row else ""]))
        lines.append(f"| {row['paper']} | {figure} | {seeds} | {row['verdict']} | {notes} | "
                     f"`{row['command']}` |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args(argv)
    rows = table(args.results)
    print_table(rows, [("paper", "claim", "<"), ("diff_vs_baseline", "diff", "+.4f"), ("ci_low", "95% low", "+.4f"),
                       ("ci_high", "95% high", "+.4f"), ("verdict", "verdict", "<"), ("why", "", "<")])
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
