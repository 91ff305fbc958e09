"""Paired-seed comparisons, the way every loss claim here is tested (ALGORITHMS.md section 10).

A comparison is a list of `Config`s and a function that trains one of them with one seed
and returns its figures (at least `val_loss`). Every configuration
runs with the same seeds (a seed fixes the model's initialisation and the batch order, so
per seed every configuration sees the same model and the same data), and each row reports:

- `mean`: the mean validation loss over the seeds;
- `seed_spread`: the largest minus the smallest of them (how far seeds alone move a run);
- `diff_vs_baseline`, `ci_low`, `ci_high`: the mean per-seed difference against the row's
  baseline and its 95% interval (t with n - 1 degrees of freedom), the figure a claim reads.

A configuration with a `sweep` (several sets of option values: learning rates, or DiLoCo's
outer learning rate and momentum) is tuned first: each set trains on the tuning seeds
(disjoint from the reported ones), and the one with the lowest mean validation loss is
used for the reported seeds; the row records it (`chosen`, `tuning`, and `lr` when the
sweep sets one), and `chosen_at_edge` when it is the smallest or largest value swept.
Every configuration of a comparison should get the same sweep. A configuration `tuned_after`
another starts from the options tuning chose for that one and sweeps only its own: DiLoCo's
inner steps are local SGD's (an outer step of lr 1 without momentum is plain averaging), so
its inner lr is local SGD's and its own sweep is the outer step's, 6 runs where the product
of the two sweeps would be 18.

Runs are independent, so `compare(..., jobs=N)` (a benchmark's `--jobs N`) trains N at a
time, each in its own forked process with 1/N of the threads: on 2 cores, two one-thread
runs finish sooner than one two-thread run after another. `select` makes a partial run (a
benchmark's `--only`) of the configurations named.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import json
import math
import multiprocessing
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import torch

from .common import print_table, write_json

# Two-sided 95% quantiles of Student's t, t(0.975; df) for df = 1..30; beyond, the normal's.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
TUNING_SEED_OFFSET = 1000
# The regime every loss comparison runs in by default (benchmarks/RESULTS.md#regime, measured
# by `python -m benchmarks.regime`): the tiny GPT for 640 steps of 16 sequences of 128 bytes
# in all (640: a whole number of sync intervals of 8 and 32), peak learning rates swept around
# dense AdamW's best.
STEPS = 640
LR = 1e-3
LRS = (5e-4, 1e-3, 2e-3)


@dataclass(frozen=True)
class Config:
    """One configuration of a comparison. `options` is what the benchmark's run function
    reads (policy knobs, `lr`, batch size, ...); `baseline` names the configuration it is
    compared with (None: it is a baseline itself); `sweep` lists option sets to tune over
    (each merged into `options`; without tuning seeds, `options` is used as it is);
    `tuned_after` names the configuration whose chosen options it starts from, tuned first."""

    name: str
    options: dict = field(default_factory=dict)
    baseline: str | None = None
    sweep: tuple[dict, ...] = ()
    tuned_after: str | None = None

    def with_options(self, choice: dict) -> "Config":
        return replace(self, options={**self.options, **choice})


Run = Callable[[Config, int], dict]


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"a 95% interval needs at least 2 paired seeds, got {df + 1}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def paired_interval(differences: Sequence[float]) -> tuple[float, float, float]:
    """Mean of the per-seed differences and its 95% t interval."""
    n = len(differences)
    mean = statistics.fmean(differences)
    half = t975(n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return mean, mean - half, mean + half


def add_arguments(parser: argparse.ArgumentParser, *, seeds: int = 3, tuning_seeds: int = 1,
                  compiler: str = "aot_eager", jobs: bool = False, only: bool = False) -> None:
    """The arguments every comparison takes; `jobs`: also `--jobs` (for a benchmark whose run is
    one process: those that start worker processes use every core already); `only`: also
    `--only` (for a benchmark that prints only the claims whose rows ran)."""
    parser.add_argument("--seeds", type=int, default=seeds, help="paired seeds per configuration (0, 1, ...)")
    parser.add_argument("--tuning-seeds", type=int, default=tuning_seeds,
                        help=f"seeds for tuning ({TUNING_SEED_OFFSET}, ...: disjoint from the reported ones)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="learning rates every configuration is tuned over (default: each benchmark's sweep; "
                             "one value: every configuration trains at it, without tuning runs)")
    parser.add_argument("--compiler", default=compiler, choices=["inductor", "aot_eager"])
    if jobs:
        parser.add_argument("--jobs", type=int, default=1,
                            help="runs at a time, each in a forked process with its share of the threads")
    if only:
        parser.add_argument("--only", nargs="+", metavar="CONFIG",
                            help="train these rows only; a row whose baseline is left out is reported without one")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, 2 seeds, no tuning")
    parser.add_argument("--json", help="write the rows and the setup here")


def tiny_gpt_arguments(parser: argparse.ArgumentParser, argv=None, quick_steps: int = 20
                       ) -> tuple[argparse.Namespace, int, str]:
    """Parse a one-process tiny GPT comparison's arguments (--steps, --batch and the common
    ones, with --jobs and --only); returns them with the steps and compiler a run uses (a
    quick run: `quick_steps`, aot_eager)."""
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch", type=int, default=16)
    add_arguments(parser, compiler="inductor", jobs=True, only=True)
    args = parser.parse_args(argv)
    return args, *((quick_steps, "aot_eager") if args.quick else (args.steps, args.compiler))


def compare_tiny_gpt(args: argparse.Namespace, steps: int, compiler: str, configs: Sequence[Config],
                     policy_of: Callable[[dict], Any], figures: Callable[[Any], dict] | None = None
                     ) -> tuple[list[dict], str]:
    """`compare` of one-process tiny GPT runs (`train_tiny_gpt`, the arguments of
    `tiny_gpt_arguments`): each configuration trains the policy `policy_of(options)` at its
    options' lr; `figures(result)` adds a run's own figures to its validation loss. Returns
    the rows and the header that says how they were run."""
    from lordo_compile.experiment import RunConfig, train_tiny_gpt

    seeds, tuning_seeds = seeds_of(args)

    def run(config: Config, seed: int) -> dict:
        setup = RunConfig(steps=steps, batch_size=args.batch, lr=config.options["lr"], val_batches=0,
                          compiler=compiler, seed=seed)
        result = train_tiny_gpt(policy_of(config.options), setup)
        return {"val_loss": result.val_loss, **(figures(result) if figures else {})}

    rows = compare(select(configs, args.only), run, seeds, tuning_seeds, jobs=args.jobs)
    header = (f"tiny GPT, {steps} steps x {args.batch} sequences of 128 bytes, compiler {compiler}, "
              f"seeds {seeds}, {lr_words(configs[0].sweep, tuning_seeds, configs[0].options['lr'])}")
    return rows, header


def seeds_of(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """Reported and tuning seeds (a quick run: 2 and none)."""
    if args.quick:
        return [0, 1], []
    if args.seeds < 2:
        raise ValueError(f"--seeds {args.seeds}: an interval needs at least 2 paired seeds")
    return list(range(args.seeds)), [TUNING_SEED_OFFSET + i for i in range(args.tuning_seeds)]


def progress(line: str) -> None:
    """A line of a run's progress, written at once: full runs take hours, mostly with their
    output sent to a file, which Python would otherwise flush only at exit."""
    print(line, flush=True)


def compare(configs: Sequence[Config], run: Run, seeds: Sequence[int], tuning_seeds: Sequence[int] = (),
            log: Callable[[str], None] = progress, jobs: int = 1) -> list[dict]:
    """Train every configuration on every seed (after tuning it where it has a sweep) and
    return one row per configuration, baselines' differences included. `jobs` > 1 trains
    that many runs at a time, each in a forked process with its share of the threads (a
    run's figures do not depend on it, only the wall-clock does)."""
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names must be unique: {names}")
    unknown = [c.baseline for c in configs if c.baseline is not None and c.baseline not in names]
    if unknown:
        raise ValueError(f"baseline(s) {unknown} are not configurations of this comparison ({names})")
    _check_tuned_after(configs)
    if len(seeds) < 2:
        raise ValueError(f"a paired comparison needs at least 2 seeds, got {list(seeds)}")
    if set(seeds) & set(tuning_seeds):
        raise ValueError(f"tuning seeds {sorted(set(seeds) & set(tuning_seeds))} are also reported seeds")
    with _trainer(run, jobs, log) as train:
        tuned = [(config.with_options(chosen), chosen, tuning, at_edge)
                 for config, (chosen, tuning, at_edge) in zip(configs, _tune(configs, train, tuning_seeds, log))]
        reported = train([(config, seed) for config, *_ in tuned for seed in seeds])
    rows = []
    for index, (config, chosen, tuning, at_edge) in enumerate(tuned):
        runs = [{"seed": seed, **figures}
                for seed, figures in zip(seeds, reported[index * len(seeds):(index + 1) * len(seeds)])]
        for r in runs:
            log(f"  {config.name} seed {r['seed']}: val loss {r['val_loss']:.4f}")
        values = [r["val_loss"] for r in runs]
        rows.append({"config": config.name, "baseline": config.baseline, "lr": config.options.get("lr"),
                     "chosen": chosen, "tuning": tuning, "chosen_at_edge": at_edge,
                     "mean": statistics.fmean(values), "n_seeds": len(values),
                     "seed_spread": max(values) - min(values), "values": values, "runs": runs})
    by_name = {row["config"]: row for row in rows}
    for row in rows:
        base = by_name.get(row["baseline"])
        if base is None:
            row.update(diff_vs_baseline=None, ci_low=None, ci_high=None)
            continue
        row.update(zip(("diff_vs_baseline", "ci_low", "ci_high"),
                       paired_interval([a - b for a, b in zip(row["values"], base["values"])])))
    return rows


Train = Callable[[Sequence[tuple[Config, int]]], list[dict]]
# The run a forked worker calls: set before the pool forks, so `run` may be any closure.
_forked_run: Run | None = None


def _timed(run: Run, config: Config, seed: int) -> dict:
    started = time.perf_counter()
    figures = dict(run(config, seed))
    figures.setdefault("wall_s", time.perf_counter() - started)
    return figures


def threads_per_run(jobs: int) -> int:
    """The threads each of `jobs` runs side by side gets."""
    return max(1, torch.get_num_threads() // jobs)


def _in_worker(threads: int, config: Config, seed: int) -> dict:
    torch.set_num_threads(threads)
    return _timed(_forked_run, config, seed)


def _logged(log, config: Config, seed: int, figures: dict) -> dict:
    """A run's figures, once it is done, logged as it ends (a long batch is not silent)."""
    log(f"  done: {config.name} {config.options.get('lr', '')} seed {seed}: val loss {figures['val_loss']:.4f} "
        f"({figures['wall_s']:.0f} s)")
    return figures


@contextlib.contextmanager
def _trainer(run: Run, jobs: int, log=progress) -> Iterator[Train]:
    """A function that trains a list of (configuration, seed) and returns their figures in order."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if jobs == 1:
        yield lambda pairs: [_logged(log, config, seed, _timed(run, config, seed)) for config, seed in pairs]
        return
    global _forked_run
    _forked_run = run
    train_one = functools.partial(_in_worker, threads_per_run(jobs))

    def train(pool, pairs):
        futures = {pool.submit(train_one, config, seed): (config, seed) for config, seed in pairs}
        for done in concurrent.futures.as_completed(futures):
            _logged(log, *futures[done], done.result())
        return [future.result() for future in futures]

    try:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            yield functools.partial(train, pool)
    finally:
        _forked_run = None


def _check_tuned_after(configs: Sequence[Config]) -> None:
    names = {c.name: c for c in configs}
    for config in configs:
        first = names.get(config.tuned_after) if config.tuned_after else None
        if config.tuned_after and first is None:
            raise ValueError(f"{config.name!r} is tuned after {config.tuned_after!r}, which is not a configuration "
                             f"of this comparison ({list(names)}): run the two together")
        if first is not None and first.tuned_after:
            raise ValueError(f"{config.name!r} is tuned after {first.name!r}, which is itself tuned after "
                             f"{first.tuned_after!r}: one stage is supported")


def _tune(configs: Sequence[Config], train: Train, tuning_seeds: Sequence[int],
          log) -> list[tuple[dict, list[dict], bool]]:
    """Each configuration's chosen option set, its sweep's losses and whether the choice is at
    the sweep's edge. Configurations tuned after another train in a second batch."""
    found: dict[str, tuple[dict, list[dict], bool]] = {}
    for stage in ([c for c in configs if not c.tuned_after], [c for c in configs if c.tuned_after]):
        sweeps = {}
        for config in stage:
            start, _, start_at_edge = found.get(config.tuned_after, ({}, [], False))
            if len(config.sweep) >= 2 and tuning_seeds:
                sweeps[config.name] = ([{**start, **choice} for choice in config.sweep], start_at_edge)
            else:
                # A sweep of one (`--lrs X`) is the user's choice: it needs no tuning runs.
                given = {**start, **config.sweep[0]} if len(config.sweep) == 1 else start
                found[config.name] = (given, [], start_at_edge)
        pairs = [(config.with_options(choice), seed) for config in stage if config.name in sweeps
                 for choice in sweeps[config.name][0] for seed in tuning_seeds]
        figures = iter(train(pairs))
        for config in stage:
            if config.name not in sweeps:
                continue
            tuning = []
            choices, start_at_edge = sweeps[config.name]
            for choice in choices:
                losses = [next(figures)["val_loss"] for _ in tuning_seeds]
                tuning.append({"chosen": choice, "mean": statistics.fmean(losses), "values": losses})
                log(f"  {config.name} {choice} (tuning seeds): val loss {tuning[-1]['mean']:.4f}")
            chosen = min(tuning, key=lambda t: t["mean"])["chosen"]
            found[config.name] = (chosen, tuning, start_at_edge or _at_edge(config.sweep, chosen))
    return [found[config.name] for config in configs]


def _at_edge(sweep: Sequence[dict], chosen: dict) -> bool:
    """Whether tuning chose the smallest or largest value of a swept option (the best may lie beyond)."""
    for key in sweep[0]:
        values = sorted({choice[key] for choice in sweep})
        if len(values) > 2 and chosen[key] in (values[0], values[-1]):
            return True
    return False


def select(configs: Sequence[Config], names: Sequence[str] | None) -> list[Config]:
    """The configurations `names` lists, in the benchmark's order (all of them when `names` is
    empty): a partial run. A selected configuration whose baseline is not selected is
    reported without one (no difference, no interval)."""
    if not names:
        return list(configs)
    known = [c.name for c in configs]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"--only {unknown}: not configurations of this benchmark; it has {known}")
    missing = {c.name: c.tuned_after for c in configs if c.name in names and c.tuned_after
               and c.tuned_after not in names}
    if missing:
        raise ValueError(f"--only: {missing} (row: the row it is tuned after) need those rows too; add them")
    return [c if c.baseline is None or c.baseline in names else replace(c, baseline=None)
            for c in configs if c.name in names]


def lr_sweep(args: argparse.Namespace, default: Sequence[float]) -> tuple[dict, ...]:
    """The learning-rate sweep every configuration of a comparison gets: `--lrs`, or `default`."""
    return tuple({"lr": lr} for lr in (args.lrs or default))


def lr_words(sweep: Sequence[dict], tuning_seeds: Sequence[int], untuned: float, also: str = "") -> str:
    """A header's words for how the rows' peak lr was set: tuned over `sweep` on the tuning
    seeds (`also`: what was tuned with it), the one value `sweep` gives, or without tuning
    seeds the configurations' own, `untuned`."""
    lrs = [choice["lr"] for choice in sweep]
    if len(lrs) == 1:
        return f"peak lr {lrs[0]:g} (one value given: not tuned)"
    if not tuning_seeds:
        return f"peak lr {untuned:g} (not tuned)"
    return f"peak lr tuned over {lrs}{f' ({also})' if also else ''} on seeds {list(tuning_seeds)}"


def verdict(row: dict, better: str = "lower", tolerance: float = 0.0) -> str:
    """ALGORITHMS.md section 10: "reproduced" when the interval lies on the claim's side of
    `tolerance` (a claim that the row is at most `tolerance` worse, or better when 0),
    "contradicted" when it lies wholly on the other side, "inconclusive" otherwise."""
    low, high = row["ci_low"], row["ci_high"]
    if better == "lower":
        return "reproduced" if high <= tolerance else "contradicted" if low > tolerance else "inconclusive"
    return "reproduced" if low >= -tolerance else "contradicted" if high < -tolerance else "inconclusive"


COLUMNS = [("config", "config", "<"), ("lr", "lr", ".2g"), ("mean", "val loss", ".4f"),
           ("seed_spread", "seed spread", ".4f"), ("diff_vs_baseline", "diff vs base", "+.4f"),
           ("ci_low", "95% low", "+.4f"), ("ci_high", "95% high", "+.4f")]


def claim_line(row: dict, better: str = "lower", tolerance: float = 0.0, label: str | None = None) -> str:
    """"<config> vs <baseline>: diff +d [low, high]: <verdict>", the line each claim prints."""
    label = label or f"{row['config']} vs {row['baseline']}"
    return (f"{label}: diff {row['diff_vs_baseline']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]: "
            f"{verdict(row, better, tolerance)}")


def paired(values: Sequence[float], others: Sequence[float]) -> dict:
    """The per-seed differences `values - others` as `verdict` and `claim_line` read a row."""
    if len(values) != len(others):
        raise ValueError(f"paired values need one per seed on both sides, got {len(values)} and {len(others)}")
    differences = [a - b for a, b in zip(values, others)]
    return dict(zip(("diff_vs_baseline", "ci_low", "ci_high"), paired_interval(differences)))


def versus(rows: list[dict], name: str, other: str) -> dict:
    """A paired comparison of two configurations outside the baseline each row names
    (adaptive rotation against always rotating): a row-like dict for `claim_line`."""
    by_name = {row["config"]: row for row in rows}
    return {**paired(by_name[name]["values"], by_name[other]["values"]), "config": name, "baseline": other}


def report(rows: list[dict], header: str, extra: Sequence[tuple[str, str, str]] = ()) -> None:
    """The table every comparison prints, with the baselines' seed spread under it."""
    print(header)
    print_table(rows, COLUMNS + list(extra))
    for row in rows:
        if row["baseline"] is None:
            print(f"seed spread of baseline {row['config']}: {row['seed_spread']:.4f} nats over {row['n_seeds']} seeds")
    edge = [row["config"] for row in rows if row.get("chosen_at_edge")]
    if edge:
        print(f"tuning chose an end of the sweep for {edge}: their best value may lie beyond it")


# Arguments that choose which rows run, or how many at a time, and not what a row computes:
# runs that differ only in these can share one JSON (`save`).
SELECTING = ("only", "jobs")


def save(path: str | None, header: str, rows: list[dict], args: argparse.Namespace,
         claims: Sequence[str] | Callable[[list[dict]], list[str]] = (), selecting: Sequence[str] = (),
         configs: Sequence[Config] = (), figures: Callable[[list[dict]], None] | None = None, **setup) -> dict:
    """The JSON every comparison writes: its setup (the command's arguments), its rows, its
    claim lines (`claims`: the lines, or the function of the rows that gives them) and the
    command lines that wrote it (`commands`, see `invoked`).

    A partial run (`--only`) adds its rows to the JSON already at `path` when that one was run
    with the same arguments, apart from `SELECTING` and the benchmark's own `selecting` (which
    rows run); else it writes them to PATH's stem + `.unmerged.json` and raises. In the merge a
    row trained again replaces the earlier one, and the claims are those of the merged rows. Per seed a row's figures do not depend on which other rows ran, so the merged
    JSON holds what one run of all its rows would (the "only" it records is their union): every
    difference is taken again over the merged rows, and a row trained without its baseline
    (`select`) is compared with it once that one is there, its baseline named by the
    benchmark's whole list of configurations, `configs`; `figures` sets again, in place, the
    figures a row takes from other rows (its ratios to its baseline's bytes, say)."""
    def claim_lines(rows: list[dict]) -> list[str]:
        return claims(rows) if callable(claims) else list(claims)

    seeds, tuning_seeds = seeds_of(args)
    result = {"header": header, "arguments": {k: v for k, v in vars(args).items() if k != "json"},
              "seeds": seeds, "tuning_seeds": tuning_seeds, "rows": rows, **setup, "commands": invoked()}
    if path and getattr(args, "only", None) and os.path.exists(path):
        with open(path) as f:
            earlier = json.load(f)
        try:
            result = merged(earlier, result, (*SELECTING, *selecting), path, {c.name: c.baseline for c in configs})
        except ValueError as refused:
            # The rows can have taken an hour: they go beside the JSON they could not join.
            kept = os.path.splitext(path)[0] + ".unmerged.json"
            write_json(kept, {**result, "claims": claim_lines(rows)})
            raise ValueError(f"{refused}. This run's rows are kept in {kept}") from None
    if figures:
        figures(result["rows"])
    result["claims"] = claim_lines(result["rows"])
    write_json(path, result)
    return result


def invoked() -> list[str] | None:
    """The command line of the benchmark run now, as a user types it (`python -m
    benchmarks.NAME ...`), in a list: partial runs merged into one JSON add theirs. None when
    the comparison was not started as a benchmark module (a test, a notebook)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is None or not spec.name.startswith("benchmarks."):
        return None
    return [shlex.join(["python", "-m", spec.name, *sys.argv[1:]])]


def merged(earlier: dict, later: dict, selecting: Sequence[str], path: str = "the JSON",
           baselines: dict[str, str | None] | None = None) -> dict:
    """`later`'s rows added to `earlier`'s (see `save`; `baselines`: configuration name to its
    baseline's); a ValueError naming what differs when the two were not run alike."""
    def setup(result: dict) -> dict:
        return {k: v for k, v in result["arguments"].items() if k not in selecting}

    before, now = setup(earlier) if "arguments" in earlier else None, setup(later)
    if before != now or earlier.get("header") != later["header"]:
        differ = (sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
                  if before is not None else "no arguments recorded (a run before the harness)")
        raise ValueError(f"{path} holds a run set up differently ({differ or 'its header'}): a partial run "
                         f"(--only) adds its rows only to a JSON of the same setup; give another --json, or "
                         f"remove {path} to start a new one")
    names = [row["config"] for row in later["rows"]]
    rows = [row for row in earlier["rows"] if row["config"] not in names] + later["rows"]
    arguments = dict(later["arguments"])
    for key in selecting:
        first, then = earlier["arguments"].get(key), arguments.get(key)
        if isinstance(first, list) and isinstance(then, list):
            arguments[key] = first + [value for value in then if value not in first]
    if earlier["arguments"].get("only") is None:
        arguments["only"] = None  # the earlier run had every row
    # Unknown (None) once any run of the merge was not recorded: a partial list would pass for all of them.
    first, then = earlier.get("commands"), later.get("commands")
    commands = first + [c for c in then if c not in first] if first is not None and then is not None else None
    return {**earlier, **later, "arguments": arguments, "rows": compared(rows, baselines or {}),
            "commands": commands}


def compared(rows: list[dict], baselines: dict[str, str | None]) -> list[dict]:
    """`rows` with each one's paired difference against its baseline taken over these rows: its
    own, or where a partial run had none, the one `baselines` names."""
    by_name = {row["config"]: row for row in rows}
    found = []
    for row in rows:
        base = by_name.get(row["baseline"] or baselines.get(row["config"]) or "")
        found.append({**row, "baseline": base["config"], **paired(row["values"], base["values"])}
                     if base is not None else row)
    return found
