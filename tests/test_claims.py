"""benchmarks/claims.py and the alpha-beta model of benchmarks/time_to_loss.py: figures
against hand computation, verdicts on made-up per-seed values."""

import pytest

from benchmarks.claims import Claim, evaluate
from benchmarks.time_to_loss import collective_seconds, common_target, modeled_curve, time_to
from benchmarks.two_level import comm_seconds


def _result(**values):
    return {"header": "made up", "rows": [{"config": name, "values": v, "mean": sum(v) / len(v),
                                           "baseline": None, "seed_spread": max(v) - min(v),
                                           "bytes_per_worker": 1000 if name == "base" else 50}
                                          for name, v in values.items()]}


def test_a_within_one_percent_claim_reads_the_tolerance_off_the_baselines_mean():
    # per-seed differences 0.01, 0.01, 0.01: interval [0.01, 0.01]; 1% of 2.0 is 0.02
    result = _result(base=[2.0, 2.1, 1.9], new=[2.01, 2.11, 1.91])
    claim = Claim("new within 1% of base", "x.json", "cmd", ((1, "new"), (-1, "base")), "lower", 0.01, "base")
    row = evaluate(claim, result)
    assert row["diff_vs_baseline"] == pytest.approx(0.01) and row["tolerance"] == pytest.approx(0.02)
    assert row["verdict"] == "reproduced"
    strict = Claim("new beats base", "x.json", "cmd", ((1, "new"), (-1, "base")))
    assert evaluate(strict, result)["verdict"] == "contradicted"


def test_a_difference_of_gaps_is_summed_per_seed_before_its_interval():
    # gap at small batch: 0.1, 0.3; gap at large: 0.2, 0.2 -> per seed -0.1, +0.1: mean 0
    result = _result(a=[1.1, 1.3], b=[1.0, 1.0], c=[1.2, 1.2], d=[1.0, 1.0])
    claim = Claim("gap shrinks", "x.json", "cmd", ((1, "a"), (-1, "b"), (-1, "c"), (1, "d")))
    row = evaluate(claim, result)
    assert row["diff_vs_baseline"] == pytest.approx(0.0, abs=1e-12) and row["verdict"] == "inconclusive"
    assert row["ci_low"] == pytest.approx(-12.706 * 0.1414214 / 2 ** 0.5, rel=1e-4)


def test_a_bytes_claim_that_fails_contradicts_a_loss_claim_that_holds():
    result = _result(base=[2.0, 2.1], new=[2.0, 2.1])
    claim = Claim("new as good with 100x fewer bytes", "x.json", "cmd", ((1, "new"), (-1, "base")), "lower", 0.01,
                  "base", ("new", "base", 100))
    row = evaluate(claim, result)
    assert row["fewer_bytes"] == pytest.approx(20.0) and row["verdict"] == "contradicted"


def test_claims_without_per_seed_values_are_not_run():
    old = {"rows": [{"policy": "ddp", "val_loss": 2.5}]}
    claim = Claim("c", "x.json", "cmd", ((1, "a"), (-1, "b")))
    assert evaluate(claim, old)["verdict"] == "not run"
    assert evaluate(claim, None)["why"] == "no full run"


def test_a_claim_from_a_partial_run_says_which_rows_it_ran():
    result = {**_result(base=[2.0, 2.1], new=[2.0, 2.1]), "arguments": {"only": ["new", "base"]}}
    row = evaluate(Claim("c", "x.json", "python -m benchmarks.x", ((1, "new"), (-1, "base"))), result)
    assert row["command"] == "python -m benchmarks.x --only 'new' 'base'"


def test_the_alpha_beta_model_of_a_ring_all_reduce_and_an_all_gather():
    # 4 workers, 1 ms latency, 1 MB/s, 1 MB: ring 2*3*1e-3 + 2*(3/4)*1 = 1.506 s; gather 3*(1e-3 + 1) = 3.003 s
    assert collective_seconds("all_reduce", 10 ** 6, 4, 1e-3, 1e6) == pytest.approx(1.506)
    assert collective_seconds("all_gather_into_tensor", 10 ** 6, 4, 1e-3, 1e6) == pytest.approx(3.003)
    with pytest.raises(NotImplementedError, match="broadcast"):
        collective_seconds("broadcast", 1, 4, 1e-3, 1e6)


def test_two_levels_pay_the_slow_link_for_what_crosses_nodes_and_the_fast_one_inside():
    # 4 workers as 2 nodes of 2, latency 1 ms, slow 8 Mbit/s (1 MB/s), fast 8 Gbit/s (1 GB/s), 1 MB each:
    # inner ring of 2: 2e-3 + 1e6/1e9 = 3 ms; outer ring of 2: 2e-3 + 1 s; a flat ring of 4 at the slow link's
    # pace: 6e-3 + 1.5 s
    megabyte = 10 ** 6
    assert comm_seconds([("all_reduce", megabyte, "inner")], 4, 1e-3, 8e6, 8e9) == pytest.approx(3e-3)
    assert comm_seconds([("all_reduce", megabyte, "outer")], 4, 1e-3, 8e6, 8e9) == pytest.approx(1.002)
    assert comm_seconds([("all_reduce", megabyte, "world")], 4, 1e-3, 8e6, 8e9) == pytest.approx(1.506)
    both = [("all_reduce", megabyte, "inner"), ("all_reduce", megabyte, "outer")]
    assert comm_seconds(both, 4, 1e-3, 8e6, 8e9) == pytest.approx(1.005)


def test_the_common_target_is_the_lowest_loss_every_row_reaches():
    rows = [{"config": "ddp", "curve": [(0, 0, 5.0), (8, 0, 1.8), (16, 0, 1.9)]},
            {"config": "diloco", "curve": [(0, 0, 5.0), (8, 0, 2.2), (16, 0, 2.1)]},
            {"config": "lordo", "curve": [(0, 0, 5.0), (8, 0, 2.0), (16, 0, 2.05)]}]
    # Best points 1.8, 2.1 and 2.0: every row reaches 2.1, diloco's best.
    assert common_target(rows) == (2.1, "diloco")


def test_time_to_a_loss_interpolates_between_evaluations_or_marks_the_best():
    points = [(1.0, 3.0), (2.0, 2.0), (3.0, 1.5)]
    assert time_to(2.5, points) == (pytest.approx(1.5), 2.5, True)
    assert time_to(3.5, points) == (1.0, 3.0, True)
    assert time_to(1.0, points) == (3.0, 1.5, False)


def test_the_committed_claims_table_is_what_the_committed_results_give():
    from pathlib import Path

    from benchmarks.claims import markdown, table

    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    assert (benchmarks / "CLAIMS.md").read_text() == markdown(table(str(benchmarks / "results"))), \
        "benchmarks/CLAIMS.md is stale: python -m benchmarks.claims --markdown benchmarks/CLAIMS.md"


def test_the_modeled_clock_adds_each_steps_compute_and_its_graphs_collectives():
    # 2 workers, no latency, 8 Mbit/s = 1 MB/s: the sync's 1 MB all-reduce takes 2 * (1/2) * 1 s = 1 s
    row = {"config": "made up", "graphs": ["step", "sync", "step", "sync"], "compute_ms": {"step": 10.0, "sync": 20.0},
           "collectives": {"step": [], "sync": [("all_reduce", 10 ** 6)]}, "curve": [(2, 0, 3.0), (4, 0, 2.0)]}
    after = modeled_curve(row, 8e6, 0.0, 2, overlap=False)
    assert after == [(pytest.approx(1.03), 3.0), (pytest.approx(2.06), 2.0)]
    overlapped = modeled_curve(row, 8e6, 0.0, 2, overlap=True)
    assert overlapped == [(pytest.approx(1.01), 3.0), (pytest.approx(2.02), 2.0)]
    with pytest.raises(ValueError, match="not in the timing run"):
        modeled_curve({**row, "compute_ms": {"step": 10.0}}, 8e6, 0.0, 2, overlap=False)
