"""benchmarks/harness.py: paired seeds, the t interval, learning-rate tuning on disjoint seeds."""

import argparse

import pytest
import torch

from benchmarks.harness import (Config, add_arguments, claim_line, compare, paired_interval, seeds_of, select, verdict,
                                versus)


def test_the_interval_is_students_t_on_the_paired_differences():
    # differences 1, 2, 3: mean 2, sample sd 1, t(0.975; 2) = 4.303
    mean, low, high = paired_interval([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert (low, high) == pytest.approx((2 - 4.303 / 3 ** 0.5, 2 + 4.303 / 3 ** 0.5), abs=1e-9)


def test_differences_are_paired_by_seed():
    # Seeds move both configurations by the same large amount; the difference is 0.01 on
    # every seed, so a paired interval is exactly that while unpaired means would be noise.
    offsets = {0: 0.0, 1: 0.5, 2: -0.3}

    def run(config, seed):
        return {"val_loss": 2.0 + offsets[seed] + config.options["extra"]}

    rows = compare([Config("base", {"extra": 0.0}), Config("other", {"extra": 0.01}, baseline="base")], run,
                   seeds=[0, 1, 2], log=lambda line: None)
    base, other = rows
    assert base["seed_spread"] == pytest.approx(0.8) and base["diff_vs_baseline"] is None
    assert other["diff_vs_baseline"] == pytest.approx(0.01)
    assert other["ci_low"] == pytest.approx(0.01) and other["ci_high"] == pytest.approx(0.01)
    assert [r["seed"] for r in other["runs"]] == [0, 1, 2] and other["n_seeds"] == 3


def test_the_learning_rate_is_chosen_on_the_tuning_seeds_only():
    seen = []

    def run(config, seed):
        lr = config.options["lr"]
        seen.append((seed, lr))
        # On the tuning seed lr 0.1 is best; a choice that peeked at the reported seeds would take 0.3.
        best = 0.1 if seed >= 1000 else 0.3
        return {"val_loss": 1.0 + abs(lr - best)}

    sweep = ({"lr": 0.1}, {"lr": 0.2}, {"lr": 0.3})
    (row,) = compare([Config("tuned", {"lr": 0.2}, sweep=sweep)], run, seeds=[0, 1], tuning_seeds=[1000],
                     log=lambda line: None)
    assert row["lr"] == 0.1 and row["chosen"] == {"lr": 0.1} and row["chosen_at_edge"]
    assert [t["chosen"] for t in row["tuning"]] == list(sweep)
    assert sorted(seen) == [(0, 0.1), (1, 0.1), (1000, 0.1), (1000, 0.2), (1000, 0.3)]


def test_a_choice_inside_the_sweep_is_not_at_its_edge():
    run = lambda config, seed: {"val_loss": abs(config.options["lr"] - 0.2)}  # noqa: E731
    sweep = ({"lr": 0.1}, {"lr": 0.2}, {"lr": 0.3})
    (row,) = compare([Config("tuned", {"lr": 0.1}, sweep=sweep)], run, seeds=[0, 1], tuning_seeds=[1000],
                     log=lambda line: None)
    assert row["chosen"] == {"lr": 0.2} and not row["chosen_at_edge"]


def test_a_configuration_tuned_after_another_sweeps_only_its_own_options_from_that_ones_choice():
    seen = []

    def run(config, seed):
        lr, outer = config.options["lr"], config.options.get("outer", 1.0)
        seen.append((config.name, seed, lr, outer))
        return {"val_loss": abs(lr - 0.2) + abs(outer - 0.5)}

    lrs = ({"lr": 0.1}, {"lr": 0.2}, {"lr": 0.3})
    outer = ({"outer": 0.5}, {"outer": 0.7}, {"outer": 1.0})
    first, second = compare([Config("inner", {"lr": 0.1}, sweep=lrs),
                             Config("outer", {"lr": 0.1, "outer": 1.0}, "inner", outer, tuned_after="inner")],
                            run, seeds=[0, 1], tuning_seeds=[1000], log=lambda line: None)
    assert first["chosen"] == {"lr": 0.2} and second["chosen"] == {"lr": 0.2, "outer": 0.5}
    assert [t["chosen"] for t in second["tuning"]] == [{"lr": 0.2, **o} for o in outer]
    # 0.5 is the smallest outer value swept; lr 0.2 is inside the inner sweep.
    assert second["lr"] == 0.2 and second["chosen_at_edge"] and not first["chosen_at_edge"]
    tuning = [s for s in seen if s[1] == 1000]
    assert [s[0] for s in tuning] == ["inner"] * 3 + ["outer"] * 3  # the second stage waits for the first
    assert [s for s in seen if s[0] == "outer" and s[1] < 1000] == [("outer", 0, 0.2, 0.5), ("outer", 1, 0.2, 0.5)]


def test_tuning_after_a_missing_or_twice_tuned_configuration_is_refused():
    run = lambda config, seed: {"val_loss": 1.0}  # noqa: E731
    with pytest.raises(ValueError, match="'b' is tuned after 'a', which is not a configuration"):
        compare([Config("b", tuned_after="a")], run, seeds=[0, 1])
    with pytest.raises(ValueError, match="one stage"):
        compare([Config("a"), Config("b", tuned_after="a"), Config("c", tuned_after="b")], run, seeds=[0, 1])
    with pytest.raises(ValueError, match="need those rows too"):
        select([Config("a"), Config("b", tuned_after="a")], ["b"])


def test_bad_comparisons_are_refused():
    run = lambda config, seed: {"val_loss": 1.0}  # noqa: E731
    with pytest.raises(ValueError, match="baseline"):
        compare([Config("a", baseline="missing")], run, seeds=[0, 1])
    with pytest.raises(ValueError, match="at least 2 seeds"):
        compare([Config("a")], run, seeds=[0])
    with pytest.raises(ValueError, match="also reported"):
        compare([Config("a")], run, seeds=[0, 1], tuning_seeds=[1])
    with pytest.raises(ValueError, match="unique"):
        compare([Config("a"), Config("a")], run, seeds=[0, 1])


def test_verdicts():
    assert verdict({"ci_low": -0.03, "ci_high": -0.01}) == "reproduced"
    assert verdict({"ci_low": 0.01, "ci_high": 0.03}) == "contradicted"
    assert verdict({"ci_low": -0.01, "ci_high": 0.01}) == "inconclusive"
    # "within 1%": an interval below the tolerance reproduces it even if it is above zero.
    assert verdict({"ci_low": 0.001, "ci_high": 0.009}, tolerance=0.01) == "reproduced"


def test_quick_runs_use_two_seeds_and_no_tuning():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert seeds_of(parser.parse_args(["--quick"])) == ([0, 1], [])
    assert seeds_of(parser.parse_args([])) == ([0, 1, 2], [1000])
    with pytest.raises(ValueError, match="at least 2"):
        seeds_of(parser.parse_args(["--seeds", "1"]))


def test_without_tuning_seeds_the_options_are_used_as_given():
    (row,) = compare([Config("a", {"lr": 0.2}, sweep=({"lr": 0.1}, {"lr": 0.3}))],
                     lambda config, seed: {"val_loss": config.options["lr"]}, seeds=[0, 1], log=lambda line: None)
    assert row["lr"] == 0.2 and row["tuning"] == [] and row["mean"] == 0.2


def test_a_sweep_of_one_value_is_used_without_tuning_runs_and_the_header_says_so():
    from benchmarks.harness import lr_words

    trained = []

    def run(config, seed):
        trained.append(seed)
        return {"val_loss": config.options["lr"]}

    for tuning_seeds in ([], [1000]):
        trained.clear()
        (row,) = compare([Config("a", {"lr": 0.2}, sweep=({"lr": 0.4},))], run, seeds=[0, 1],
                         tuning_seeds=tuning_seeds, log=lambda line: None)
        assert (row["lr"], row["mean"], row["tuning"], trained) == (0.4, 0.4, [], [0, 1])
        assert lr_words(({"lr": 0.4},), tuning_seeds, 0.2) == "peak lr 0.4 (one value given: not tuned)"
    assert lr_words(({"lr": 0.1}, {"lr": 0.3}), [], 0.2) == "peak lr 0.2 (not tuned)"
    assert lr_words(({"lr": 0.1}, {"lr": 0.3}), [1000], 0.2, "outer") == "peak lr tuned over [0.1, 0.3] (outer) on seeds [1000]"


def test_the_whole_validation_split_is_every_held_out_byte_once():
    from lordo_compile.data import ByteBatches

    data = ByteBatches(block_size=8, data=torch.arange(100, dtype=torch.uint8))  # held out: 90..99
    batches = data.val_split(batch_size=1)
    assert [x.tolist() for x, _ in batches] == [[list(range(90, 98))]]
    assert [y.tolist() for _, y in batches] == [[list(range(91, 99))]]


def test_a_pair_outside_the_baselines_is_paired_by_seed_too():
    values = {"a": [1.0, 2.0, 3.0], "b": [1.5, 2.5, 3.5]}
    rows = [{"config": name, "values": v} for name, v in values.items()]
    row = versus(rows, "a", "b")
    assert (row["diff_vs_baseline"], row["ci_low"], row["ci_high"]) == pytest.approx((-0.5, -0.5, -0.5))
    assert claim_line(row) == "a vs b: diff -0.5000 [-0.5000, -0.5000]: reproduced"


def test_runs_in_parallel_processes_give_the_rows_of_runs_one_after_another():
    # A closure over local state: forked workers must call it as it is, and the rows must
    # come back in configuration and seed order whichever run finishes first.
    offsets = {0: 0.0, 1: 0.5, 2: -0.3, 1000: 0.2}

    def run(config, seed):
        return {"val_loss": offsets[seed] + abs(config.options["lr"] - 0.2) + config.options["extra"],
                "threads": torch.get_num_threads()}

    sweep = ({"lr": 0.1}, {"lr": 0.2}, {"lr": 0.3})
    configs = [Config("base", {"lr": 0.1, "extra": 0.0}, sweep=sweep),
               Config("other", {"lr": 0.1, "extra": 0.01}, "base", sweep)]

    def strip(rows):
        return [{k: v for k, v in row.items() if k != "runs"} for row in rows]

    sequential = compare(configs, run, seeds=[0, 1, 2], tuning_seeds=[1000], log=lambda line: None)
    parallel = compare(configs, run, seeds=[0, 1, 2], tuning_seeds=[1000], log=lambda line: None, jobs=2)
    assert strip(parallel) == strip(sequential)
    assert parallel[1]["chosen"] == {"lr": 0.2} and parallel[1]["diff_vs_baseline"] == pytest.approx(0.01)
    assert all(r["threads"] == max(1, torch.get_num_threads() // 2) for r in parallel[0]["runs"])
    with pytest.raises(ValueError, match="jobs"):
        compare(configs, run, seeds=[0, 1], jobs=0)


def test_a_partial_run_keeps_the_named_configurations_and_drops_missing_baselines():
    from benchmarks.harness import select

    configs = [Config("ddp"), Config("low_rank"), Config("lordo", baseline="low_rank"),
               Config("diloco", baseline="ddp")]
    assert select(configs, None) == configs
    chosen = select(configs, ["lordo", "diloco", "low_rank"])
    assert [(c.name, c.baseline) for c in chosen] == [("low_rank", None), ("lordo", "low_rank"), ("diloco", None)]
    with pytest.raises(ValueError, match=r"--only \['lordo r=8'\].*it has \['ddp'"):
        select(configs, ["lordo r=8"])


def test_paired_seeds_of_a_multi_worker_run_read_disjoint_batches():
    from lordo_compile.experiment import batch_stream_seed

    streams = [batch_stream_seed(seed, rank) for seed in (0, 1, 2, 1000, 1001) for rank in range(8)]
    assert len(set(streams)) == len(streams)
    assert [batch_stream_seed(seed, 0) for seed in (0, 1, 1000)] == [0, 1, 1000]


def test_partial_runs_of_one_setup_share_a_json_and_others_are_refused(tmp_path):
    import argparse
    import json

    from benchmarks.harness import save

    path = str(tmp_path / "run.json")

    def args(only, lrs=None, formats=("int8",)):
        return argparse.Namespace(only=only, lrs=lrs, formats=list(formats), jobs=2, seeds=3, tuning_seeds=1,
                                  quick=False, json=path)

    def row(name, *values):
        return {"config": name, "baseline": None, "values": list(values)}

    def claims(rows):
        return [f"{r['config']}: {sum(r['values'])}" for r in rows]

    save(path, "h", [row("master", 1, 2), row("eco", 3, 4)], args(["master", "eco"]), claims=claims)
    save(path, "h", [row("naive", 5, 6), row("eco", 7, 8)], args(["naive", "eco"], formats=("fp8", "int8")),
         claims=claims, selecting=("formats",))
    merged = json.load(open(path))
    assert [(r["config"], r["values"]) for r in merged["rows"]] == [("master", [1, 2]), ("naive", [5, 6]),
                                                                     ("eco", [7, 8])]
    assert merged["arguments"]["only"] == ["master", "eco", "naive"]
    assert merged["arguments"]["formats"] == ["int8", "fp8"]
    assert merged["claims"] == ["master: 3", "naive: 11", "eco: 15"]
    with pytest.raises(ValueError, match=r"set up differently \(\['lrs'\]\).*another --json.*kept in .*unmerged"):
        save(path, "h", [row("naive", 0, 0)], args(["naive"], lrs=[1e-3]), claims=claims, selecting=("formats",))
    kept = json.load(open(tmp_path / "run.unmerged.json"))
    assert (kept["rows"], kept["arguments"]["lrs"], kept["claims"]) == ([row("naive", 0, 0)], [1e-3], ["naive: 0"])
    assert json.load(open(path)) == merged
    with pytest.raises(ValueError, match="formats"):
        save(path, "h", [row("naive", 0, 0)], args(["naive"], formats=("int4",)), claims=claims)
    json.dump({"rows": [row("master", 1, 2)]}, open(path, "w"))
    with pytest.raises(ValueError, match="a run before the harness"):
        save(path, "h", [row("naive", 0, 0)], args(["naive"]), claims=claims)
    save(path, "h", [row("naive", 0, 0)], args(None), claims=claims)
    assert [r["config"] for r in json.load(open(path))["rows"]] == ["naive"]


def test_a_partial_run_without_its_baseline_is_compared_with_it_in_the_merged_json(tmp_path):
    import argparse
    import json

    from benchmarks.harness import save

    path = str(tmp_path / "run.json")
    every_config = [Config("ddp"), Config("diloco", baseline="ddp"), Config("streaming", baseline="diloco")]

    def args(only):
        return argparse.Namespace(only=only, lrs=None, jobs=1, seeds=3, tuning_seeds=1, quick=False, json=path)

    def row(name, baseline, *values):
        return {"config": name, "baseline": baseline, "values": list(values), "diff_vs_baseline": None}

    save(path, "h", [row("ddp", None, 2.0, 2.5, 3.0), row("diloco", "ddp", 2.1, 2.5, 3.2)], args(["ddp", "diloco"]),
         configs=every_config)

    def figures(rows):
        by_name = {r["config"]: r for r in rows}
        for r in rows:
            r["baseline_first"] = by_name[r["baseline"]]["values"][0] if r["baseline"] else None

    # `select` dropped the baseline of a row whose baseline did not run.
    save(path, "h", [row("streaming", None, 2.2, 2.6, 3.0)], args(["streaming"]), configs=every_config,
         figures=figures)
    rows = {r["config"]: r for r in json.load(open(path))["rows"]}
    # Taken over the merged rows: diloco's row is not in the partial run.
    assert [rows[n]["baseline_first"] for n in ("ddp", "diloco", "streaming")] == [None, 2.0, 2.1]
    # Differences 0.1, 0.1, -0.2: mean 0, sd sqrt(0.03), half width t(2) * sd / sqrt(3) = 4.303 * 0.1.
    assert rows["streaming"]["baseline"] == "diloco"
    assert rows["streaming"]["diff_vs_baseline"] == pytest.approx(0.0, abs=1e-12)
    assert (rows["streaming"]["ci_low"], rows["streaming"]["ci_high"]) == pytest.approx((-0.4303, 0.4303), abs=1e-4)
    assert rows["ddp"]["baseline"] is None and rows["ddp"]["diff_vs_baseline"] is None
    # A baseline trained again (here: other figures) changes the differences against it.
    save(path, "h", [row("diloco", None, 2.2, 2.6, 3.0)], args(["diloco"]), configs=every_config)
    rows = {r["config"]: r for r in json.load(open(path))["rows"]}
    assert rows["diloco"]["diff_vs_baseline"] == pytest.approx(0.1)
    assert rows["streaming"]["diff_vs_baseline"] == pytest.approx(0.0, abs=1e-12)
    assert rows["streaming"]["ci_high"] == pytest.approx(0.0, abs=1e-12)


def test_the_json_records_the_command_lines_that_wrote_it(tmp_path, monkeypatch):
    import argparse
    import json
    import shlex
    import sys
    import types

    from benchmarks.claims import Claim, evaluate
    from benchmarks.harness import save

    path = str(tmp_path / "run.json")
    started_as = types.ModuleType("__main__")
    started_as.__spec__ = types.SimpleNamespace(name="benchmarks.eco")
    monkeypatch.setitem(sys.modules, "__main__", started_as)

    def run(name, argv):
        monkeypatch.setattr(sys, "argv", ["/somewhere/benchmarks/eco.py", *argv])
        args = argparse.Namespace(only=[name], lrs=None, jobs=1, seeds=2, tuning_seeds=1, quick=False, json=path)
        save(path, "h", [{"config": name, "baseline": None, "values": [2.0, 2.5]}], args)
        return json.load(open(path))

    run("master", ["--only", "master", "--json", path])
    result = run("eco", ["--only", "eco", "--json", path])
    assert result["commands"] == [f"python -m benchmarks.eco --only master --json {shlex.quote(path)}",
                                  f"python -m benchmarks.eco --only eco --json {shlex.quote(path)}"]
    claim = Claim("c", "run.json", "typed by hand", ((1, "eco"), (-1, "master")))
    assert evaluate(claim, result)["command"] == "; ".join(result["commands"])
    # A run not started as a benchmark module records nothing, and the merged list is no longer whole.
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    result = run("naive", [])
    assert result["commands"] is None
    assert evaluate(claim, result)["command"] == "typed by hand --only 'master' 'eco' 'naive'"
