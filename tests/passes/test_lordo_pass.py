"""LoRDO's options and refusals, in one process (the 2-process parity is tests/test_lordo.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lordo_compile as lc
from lordo_compile.testing import capture, training_step


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), r"LoRDO.rank must be an int >= 1, got 0"),
        (dict(rank=4, sync_every=1), r"LoRDO.sync_every must be an int >= 2, got 1 \(every step would be low-rank DDP"),
        (dict(rank=4, omega=1.5), r"LoRDO.omega is out of range: 1.5"),
        (dict(rank=4, mu=0), r"LoRDO.mu is out of range: 0"),
        (dict(rank=4, outer_momentum=1.0), r"LoRDO.outer_momentum is out of range"),
        (dict(rank=4, full_rank_normalizer="max"), r"LoRDO.full_rank_normalizer must be one of \('column', 'rms', 'full'\)"),
        (dict(rank=4, payload="fp4"), r"LoRDO.payload must be one of \('full', 'low_rank', 'int8'\)"),
        (dict(rank=4, payload="low_rank", projection="local"), r"payload='low_rank' sends Q\^T delta"),
        (dict(rank=4, nesterov=True), r"nesterov=True needs outer_momentum > 0"),
        (dict(rank=4, clip=-1.0), r"LoRDO.clip must be None or > 0"),
        (dict(rank=4, params=7), r"LoRDO.params must be None, a regex"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lc.LoRDO(**kwargs)


def _step(policy, make_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = make_optimizer(model)
    return capture(training_step(lambda x, y: F.mse_loss(model(x), y), opt), torch.randn(4, 16),
                   torch.randn(4, 4), policy=policy), opt, model


def test_events_schedule_and_released_state():
    step, opt, model = _step(lc.Policy.lordo(rank=4, sync_every=3))
    assert sorted(step.graphs) == ["init", "step", "sync"]
    assert [step.backend.schedule.name_at(k) for k in range(7)] == [
        "init", "step", "sync", "step", "step", "sync", "step"]
    assert opt.state[model[0].weight]["exp_avg"].numel() == 0
    kinds = {site.op.name for site in step.graphs["step"]["lordo"].train_graph.updates()}
    assert kinds == {"lordo_adamw", "adamw"}


def test_only_adamw_is_lordos_inner_optimizer():
    with pytest.raises(ValueError, match=r"LoRDO's inner step is AdamW, this parameter is updated by lordo.sgd"):
        _step(lc.Policy.lordo(rank=4), lambda m: torch.optim.SGD(m.parameters(), lr=0.1))


@pytest.mark.parametrize("other", [lc.Policy.galore(rank=4).low_rank, lc.Sync(every=2)])
def test_lordo_does_not_compose_with_low_rank_or_sync(other):
    field = "low_rank" if isinstance(other, lc.LowRank) else "sync"
    policy = lc.Policy(lordo=lc.LoRDO(rank=4), **{field: other})
    with pytest.raises(ValueError, match=r"'lordo' and '(low_rank|sync)'|'(low_rank|sync)' and 'lordo'"):
        _step(policy)


def test_one_worker_low_rank_ddp_is_galore():
    """With one worker, averaging is the identity: low-rank DDP must be GaLore exactly."""
    results = []
    for policy in (lc.Policy.low_rank_ddp(rank=4, update_proj_gap=3), lc.Policy.galore(rank=4, update_proj_gap=3)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        step = lc.compile(training_step(lambda x, y, m=model: F.mse_loss(m(x), y), opt), policy, compiler="eager")
        generator = torch.Generator().manual_seed(0)
        for _ in range(7):
            step(torch.randn(4, 16, generator=generator), torch.randn(4, 4, generator=generator))
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
