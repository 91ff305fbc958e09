"""Step time of GaLore on the tiny GPT: ours against dense AdamW and galore-torch's GaLoreAdamW.

    python -m benchmarks.galore_step [--rank 16] [--gap 10] [--steps 40] [--batch 16] [--quick] [--json PATH]

Five variants, each a fresh model with the same initialisation, on the same batches, timed
round robin (one step of each in turn) after `--warmup` untimed rounds:
- "eager AdamW": dense, torch.optim as it comes;
- "galore-torch GaLoreAdamW": galore-torch's own optimizer (proj_type "std"), eager;
- "lordo Policy()": dense, compiled (Inductor);
- "lordo GaLore": `Policy.galore(rank, update_proj_gap=gap)`, compiled;
- "lordo GaLore, gradient formed": the same without `passes.projection.project_from_factors`
  (each projected weight's gradient formed, then projected; `lowering_without`), an ablation.
Both GaLores project the same matrices (the transformer blocks' linear weights) with the
same rank, gap and scale 0.25, and refresh at the same steps (0, gap, 2 gap, ...): each
one's refresh steps are timed apart from its ordinary steps. `ordinary_vs_dense`: our
ordinary GaLore step over our dense step (the target is <= 1.0); `amortized_vs_dense`
adds the refresh's extra time spread over `--amortize-gap` steps (200, the preset's
default gap); `ratio_vs_galore_torch`: ours over galore-torch's, ordinary steps;
`from_factors_gain`: our ordinary GaLore step over the ablation's.
`--quick`: a smoke run (a 2-layer GPT of width 32, rank 4, 6 steps, refresh every 3).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lordo_compile as lc
from lordo_compile.models import GPTConfig, TinyGPT
from lordo_compile.testing import galore_torch_adamw, lowering_without, training_step

from .common import QUICK_GPT, batches, print_table, timing_arguments, write_json

LR, WD, SCALE = 1e-3, 0.1, 0.25
FORMED = "lordo GaLore, gradient formed"


def _model(cfg: GPTConfig) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(cfg)


def _projected(model: TinyGPT) -> list[torch.Tensor]:
    """What Policy.galore projects by default: nn.Linear weights, not embeddings or the head."""
    return [p for name, p in model.named_parameters() if name.startswith("blocks.") and p.dim() == 2]


def variants(cfg: GPTConfig, rank: int, gap: int) -> dict:
    """name -> (step, is_refresh(k) for 0-based call k or None where no step refreshes, the
    choices of `lowering_without` its first call turns off)."""
    dense = _model(cfg)
    eager = training_step(dense.loss, torch.optim.AdamW(dense.parameters(), lr=LR, weight_decay=WD))

    reference = _model(cfg)
    projected = _projected(reference)
    ids = {id(p) for p in projected}
    galore = galore_torch_adamw()(
        [{"params": [p for p in reference.parameters() if id(p) not in ids]},
         {"params": projected, "rank": rank, "update_proj_gap": gap, "scale": SCALE, "proj_type": "std"}],
        lr=LR, weight_decay=WD, no_deprecation_warning=True)
    galore_torch = training_step(reference.loss, galore)

    compiled = _model(cfg)
    ours_dense = lc.compile(training_step(compiled.loss, torch.optim.AdamW(compiled.parameters(), lr=LR,
                                                                           weight_decay=WD)), lc.Policy())
    def ours_galore():
        low = _model(cfg)
        return lc.compile(training_step(low.loss, torch.optim.AdamW(low.parameters(), lr=LR, weight_decay=WD)),
                          lc.Policy.galore(rank=rank, update_proj_gap=gap, scale=SCALE))

    def refreshes(k: int) -> bool:
        return k % gap == 0

    return {"eager AdamW": (eager, None, ()), "galore-torch GaLoreAdamW": (galore_torch, refreshes, ()),
            "lordo Policy()": (ours_dense, None, ()), "lordo GaLore": (ours_galore(), refreshes, ()),
            FORMED: (ours_galore(), refreshes, ("project_from_factors",))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--gap", type=int, default=10, help="update_proj_gap while timing (refreshes to time)")
    parser.add_argument("--amortize-gap", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    timing_arguments(parser, steps=40, warmup=2)
    args = parser.parse_args(argv)
    cfg = GPTConfig()
    if args.quick:
        cfg = QUICK_GPT
        args.rank, args.gap, args.steps, args.warmup, args.batch = 4, 3, 6, 1, 2
    data = batches(cfg, args.batch, args.steps + args.warmup + 1)
    steps_of = variants(cfg, args.rank, args.gap)
    first = {}
    for name, (step, _, turned_off) in steps_of.items():
        # The step's graphs are captured at its first call, with the lowerings its passes ask.
        with lowering_without(*turned_off):
            started = time.perf_counter()
            step(*data[0])
            first[name] = time.perf_counter() - started
    ordinary: dict[str, list[float]] = {name: [] for name in steps_of}
    refresh: dict[str, list[float]] = {name: [] for name in steps_of}
    for k, batch in enumerate(data[1:], start=1):
        for name, (step, refreshes, _) in steps_of.items():
            started = time.perf_counter()
            step(*batch)
            if k > args.warmup:
                (refresh if refreshes is not None and refreshes(k) else ordinary)[name].append(
                    time.perf_counter() - started)
    ms = {name: statistics.median(t) * 1e3 for name, t in ordinary.items()}
    refresh_ms = {name: statistics.median(t) * 1e3 for name, t in refresh.items() if t}
    ours, dense = "lordo GaLore", "lordo Policy()"
    amortized = ms[ours] + (refresh_ms[ours] - ms[ours]) / args.amortize_gap
    rows = [{"variant": name, "ms": ms[name], "ratio": ms[name] / ms[dense], "refresh": refresh_ms.get(name),
             "first": first[name]} for name in steps_of]
    print(f"tiny GPT, batch {args.batch}x{cfg.block_size}, GaLore rank {args.rank}, refresh every {args.gap} steps "
          f"while timing; medians of {args.steps} round-robin steps, {torch.get_num_threads()} threads")
    print_table(rows, [("variant", "variant", "<26"), ("ms", "ordinary ms", ".1f"), ("ratio", "vs lordo dense", ".3f"),
                       ("refresh", "refresh ms", ".1f"), ("first", "1st call s", ".1f")])
    result = {
        "ordinary_vs_dense": ms[ours] / ms[dense],
        "amortized_vs_dense": amortized / ms[dense],
        "amortize_gap": args.amortize_gap,
        "ratio_vs_galore_torch": ms[ours] / ms["galore-torch GaLoreAdamW"],
        "from_factors_gain": ms[ours] / ms[FORMED],
        "refresh_vs_galore_torch": refresh_ms[ours] / refresh_ms["galore-torch GaLoreAdamW"],
        "ms": ms, "refresh_ms": refresh_ms, "first_call_s": first,
        "rank": args.rank, "gap": args.gap, "batch": [args.batch, cfg.block_size], "threads": torch.get_num_threads(),
    }
    print(f"our GaLore: ordinary step {result['ordinary_vs_dense']:.3f}x our dense step, "
          f"{result['amortized_vs_dense']:.3f}x with the refresh amortized over {args.amortize_gap} steps; "
          f"{result['ratio_vs_galore_torch']:.3f}x galore-torch's ordinary step, "
          f"{result['refresh_vs_galore_torch']:.3f}x its refresh; {result['from_factors_gain']:.3f}x the step with "
          "each gradient formed before its projection")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
