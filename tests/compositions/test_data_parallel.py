"""Optimizer-side rewrites under data parallelism and local SGD, on 2 gloo workers.

- DDP (or low-rank DDP) + X on 2 workers equals X alone in one process on both workers'
  batches at once: the gradient of the mean loss over the joint batch is the mean of the
  workers' gradients, and every worker applies it to the same weights. (Low-rank DDP is
  GaLore whose projection comes from that mean gradient: X alone is then GaLore + X. With
  CAGE's coupled form the refresh would differ: low-rank DDP projects while it combines,
  before the correction is added, where GaLore's refresh reads the corrected gradient; the
  decoupled form, CAGE's default, is tested.)
- Local SGD + X equals X alone on each worker with its parameters averaged after every
  H-th step (`dist.all_reduce` in the test): with outer lr 1 and no momentum the anchor is
  the average, and X's own state (CAGE's counter, EMA-Nesterov's direction) stays local.

X alone is the compiled rewrite, whose eager math the pass tests check (tests/passes/).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import lordo_compile as lc
from common import assert_close, named_parameters
from lordo_compile.launch import run_workers
from lordo_compile.testing import training_step

pytestmark = pytest.mark.distributed

STEPS, H, GAP = 8, 3, 2
# CAGE's correction and the rotation choice together: one fake-quantization pass.
CAGE = lc.FakeQuant(bits=4, correction=lc.CAGE(total_steps=STEPS, silence_ratio=0.0),
                    adaptive_rotation=lc.AdaptiveRotation(every=GAP))
EMA = lc.EMANesterov(beta=0.5, gamma=0.9)
GALORE = lc.LowRank(rank=4, update_proj_gap=GAP)
# name: (the rewrites alone, how workers combine). Each case puts every rewrite of its row in
# one policy, so one run shows each pair with the workers' combination.
CASES = {
    "ddp+galore+cage+rotation+ema_nesterov": (lc.Policy(low_rank=GALORE, fake_quant=CAGE, ema_nesterov=EMA), "ddp"),
    "low_rank_ddp+cage+rotation+eco+ema_nesterov": (
        lc.Policy(low_rank=GALORE, fake_quant=CAGE, eco=lc.ECO(format="int8"), ema_nesterov=EMA), "low_rank_ddp"),
    "local_sgd+cage+rotation+ema_nesterov": (lc.Policy(fake_quant=CAGE, ema_nesterov=EMA), "local_sgd"),
}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _batches(rank):
    generator = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(8, 16, generator=generator), torch.randn(8, 4, generator=generator)) for _ in range(STEPS)]


def _run(policy, batches, average_every=None):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler="eager")
    for k, (x, y) in enumerate(batches):
        step(x, y)
        if average_every and (k + 1) % average_every == 0:
            with torch.no_grad(), step.materialized():
                for p in model.parameters():
                    dist.all_reduce(p)
                    p /= dist.get_world_size()
    with step.materialized():
        return named_parameters(model), sorted(step.graphs)


def _combined(alone, how):
    if how == "ddp":
        return lc.Policy(**{**alone.__dict__, "data_parallel": lc.DataParallel()})
    if how == "low_rank_ddp":
        fields = {**alone.__dict__, "low_rank": None,
                  "low_rank_ddp": lc.LowRankDDP(low_rank=alone.low_rank)}
        return lc.Policy(**fields)
    return lc.Policy(**{**alone.__dict__, "sync": lc.Sync(every=H)})


def worker(rank, world):
    results = {}
    mine = _batches(rank)
    joint = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(_batches(0), _batches(1))]
    for name, (alone, how) in CASES.items():
        torch._dynamo.reset()
        composed, graphs = _run(_combined(alone, how), mine)
        torch._dynamo.reset()
        if how == "local_sgd":
            expected, _ = _run(alone, mine, average_every=H)
        else:
            expected, _ = _run(alone, joint)
        results[name] = (composed, expected, graphs)
    return results


@pytest.fixture(scope="module")
def results():
    return run_workers(worker, 2, timeout=600)


@pytest.mark.parametrize("name", list(CASES))
def test_the_rewrite_under_the_workers_combination_equals_its_definition(results, name):
    for rank in range(2):
        composed, expected, graphs = results[rank][name]
        assert_close(composed, expected, msg=f"rank {rank}")
    if CASES[name][1] != "local_sgd":
        assert_close(results[1][name][0], results[0][name][0], rtol=0, atol=0)
    if CASES[name][1] == "local_sgd":
        assert "sync" in results[0][name][2]
