"""GaLore + local SGD and GaLore + DiLoCo in 2 gloo processes (ALGORITHMS.md section 7).

Inner steps are GaLore (section 1) on each worker, with its own projection P refreshed
from its own gradient every GAP steps; every H steps the models are averaged (local SGD)
or the averaged pseudo-gradient takes DiLoCo's outer Nesterov step (section 2). Moments
and projections stay local. With GAP = 2 and H = 3, the 0-based steps 2 and 8 refresh P
and then sync, so the refreshed update is the one the sync averages.

The eager reference is `EagerGaLore` (tests/passes/test_low_rank.py) per worker, with
torch's PeriodicModelAverager (local SGD) or torch.optim.SGD on an anchor copy (DiLoCo)
after it, as tests/test_sync.py writes them.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

import lordo_compile as lc
from common import assert_close, named_parameters
from lordo_compile.launch import run_workers
from lordo_compile.models import MLP
from lordo_compile.testing import training_step
from test_low_rank import EagerGaLore

pytestmark = pytest.mark.distributed

RANK, GAP, H, STEPS = 4, 2, 3, 12  # refresh at 0, 2, 4, ...; sync after 2, 5, 8, 11
LR, WD, BETAS, EPS, SCALE = 1e-2, 0.1, (0.9, 0.999), 1e-8, 0.25
OUTER = dict(lr=0.7, momentum=0.9, nesterov=True)
CASES = [(outer, on_refresh) for outer in ("local_sgd", "diloco") for on_refresh in ("keep", "reproject")]
# net.0.weight is 32x16 and net.2.weight 32x32 (both tall: P is 16x4 and 32x4); net.4.weight
# (4x32, smaller side <= rank) stays dense.
LOW_RANK = ("net.0.weight", "net.2.weight")


def _problem(rank):
    torch.manual_seed(0)
    model = MLP((16, 32, 32, 4))
    # Each worker draws its own data, so each refreshes its own projection.
    generator = torch.Generator().manual_seed(100 + rank)
    batches = [(torch.randn(16, 16, generator=generator), torch.randn(16, 4, generator=generator))
               for _ in range(STEPS)]
    return model, batches


def _policy(outer, on_refresh):
    sync = lc.Sync(every=H) if outer == "local_sgd" else lc.Sync(
        every=H, outer_lr=OUTER["lr"], outer_momentum=OUTER["momentum"], nesterov=OUTER["nesterov"])
    return lc.Policy(low_rank=lc.LowRank(rank=RANK, update_proj_gap=GAP, scale=SCALE, method="svd",
                                         on_refresh=on_refresh), sync=sync)


def _compiled(rank, outer, on_refresh):
    model, batches = _problem(rank)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, betas=BETAS, eps=EPS)
    step = lc.compile(training_step(lambda x, y, m=model: F.mse_loss(m(x), y), opt), _policy(outer, on_refresh),
                      compiler="eager")
    for x, y in batches:
        step(x, y)
    state = step.state_dict()["runtime"]["tensors"]
    return {
        "params": named_parameters(model),
        "P": [state[f"low_rank.projection.{name}"] for name in LOW_RANK],
        "exp_avg": [state[f"low_rank.exp_avg.{name}"] for name in LOW_RANK],
        "graphs": sorted(step.graphs),
        "schedule": [step.backend.schedule.name_at(k) for k in range(STEPS)],
        "calls": dict(step.backend.runtime.calls),
        "bytes": step.comm_report().bytes_sent,
    }


def _eager(rank, world, outer, on_refresh):
    """Section 7: EagerGaLore's step on each worker, then the section 2 sync after steps H, 2H, ..."""
    model, batches = _problem(rank)
    inner = EagerGaLore(model, "svd", on_refresh, [None, None], low_rank=[model.net[0].weight, model.net[2].weight],
                        lr=LR, wd=WD, betas=BETAS, eps=EPS, rank=RANK, gap=GAP, scale=SCALE)
    averager = PeriodicModelAverager(period=H, warmup_steps=H - 1)
    anchor = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    outer_opt = torch.optim.SGD(anchor, **OUTER)
    for k, (x, y) in enumerate(batches):
        F.mse_loss(model(x), y).backward()
        inner.step(k)
        if outer == "local_sgd":
            # Before zero_grad: the averager skips parameters whose .grad is None.
            averager.average_parameters(model.parameters())
        inner.zero_grad()
        if outer == "diloco" and (k + 1) % H == 0:
            with torch.no_grad():
                for a, p in zip(anchor, model.parameters()):
                    delta = a - p  # positive along descent
                    dist.all_reduce(delta)
                    a.grad = delta / world
                outer_opt.step()
                outer_opt.zero_grad()
                for a, p in zip(anchor, model.parameters()):
                    p.copy_(a)
    return {
        "params": named_parameters(model),
        "P": [inner.state[w]["P"] for w in inner.low_rank],
        "exp_avg": [inner.state[w]["m"] for w in inner.low_rank],
        "spectral_gap": min(inner.spectral_gaps),
    }


def galore_sync_worker(rank, world):
    results = {}
    for outer, on_refresh in CASES:
        torch._dynamo.reset()
        results[outer, on_refresh] = {"compiled": _compiled(rank, outer, on_refresh),
                                      "reference": _eager(rank, world, outer, on_refresh)}
    return results


@pytest.fixture(scope="module")
def runs():
    return run_workers(galore_sync_worker, 2, timeout=600)


@pytest.mark.parametrize("case", CASES, ids=["-".join(case) for case in CASES])
def test_compiled_matches_galore_inner_steps_and_sync(runs, case):
    for result in runs:
        compiled, reference = result[case]["compiled"], result[case]["reference"]
        # Every refresh saw a gradient whose r leading singular vectors are well separated,
        # so the projections are determined (up to sign) and the comparison is exact.
        assert reference["spectral_gap"] > 1e-3
        assert_close(compiled["params"], reference["params"])
        for ours, theirs in zip(compiled["P"], reference["P"]):
            torch.testing.assert_close(ours.abs(), theirs.abs(), rtol=1e-4, atol=1e-5)
        for ours, theirs in zip(compiled["exp_avg"], reference["exp_avg"]):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=["-".join(case) for case in CASES])
def test_a_refresh_falls_on_a_sync_step(runs, case):
    compiled = runs[0][case]["compiled"]
    assert compiled["graphs"] == ["refresh", "refresh+sync", "step", "sync"]
    assert compiled["schedule"] == ["refresh", "step", "refresh+sync", "step", "refresh", "sync",
                                    "refresh", "step", "refresh+sync", "step", "refresh", "sync"]
    assert compiled["calls"] == {"refresh": 4, "step": 4, "refresh+sync": 2, "sync": 2}


@pytest.mark.parametrize("case", CASES, ids=["-".join(case) for case in CASES])
def test_projections_stay_local_and_models_agree_after_the_last_sync(runs, case):
    first, second = runs[0][case]["compiled"], runs[1][case]["compiled"]
    # Each worker's P comes from its own gradient, and nothing but the model is sent.
    assert not any(torch.allclose(a.abs(), b.abs()) for a, b in zip(first["P"], second["P"]))
    assert_close(second["params"], first["params"], rtol=0, atol=0)
    numel = sum(p.numel() for p in MLP((16, 32, 32, 4)).parameters())
    assert first["bytes"] == STEPS // H * numel * 4
