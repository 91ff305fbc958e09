"""LoRDO's options and refusals, in one process (the 2-process parity is tests/test_lordo.py)."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lordo_compile as lc
from lordo_compile.ops.lordo import ldadam_carry_math
from lordo_compile.testing import capture, training_step


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), r"LoRDO.rank must be an int >= 1, got 0"),
        (dict(rank=4, sync_every=1), r"LoRDO.sync_every must be an int >= 2, got 1 \(every step would be low-rank DDP"),
        (dict(rank=4, omega=1.5), r"LoRDO.omega is out of range: 1.5"),
        (dict(rank=4, mu=0), r"LoRDO.mu is out of range: 0"),
        (dict(rank=4, outer_momentum=1.0), r"LoRDO.outer_momentum is out of range"),
        (dict(rank=4, full_rank_normalizer="max"),
         r"LoRDO.full_rank_normalizer must be one of \('column', 'rms', 'full', 'scalar'\)"),
        (dict(rank=4, full_rank_input="momentum"), r"LoRDO.full_rank_input must be one of \('gradient', 'error_fed'\)"),
        (dict(rank=4, weight_decay_at="never"), r"LoRDO.weight_decay_at must be one of \('before', 'after'\)"),
        (dict(rank=4, first_projection="random"),
         r"LoRDO.first_projection must be one of \('gradient', 'identity'\), got 'random'"),
        (dict(rank=4, on_refresh="rotate"),
         r"LoRDO.on_refresh must be one of \('keep', 'reproject', 'reset', 'ldadam'\), got 'rotate'"),
        (dict(rank=4, sync_optimizer_state=1), r"LoRDO.sync_optimizer_state must be True or False, got 1"),
        (dict(rank=4, sync_optimizer_state=True, projection="local"),
         r"sync_optimizer_state=True averages u, v.*use projection='global'"),
        (dict(rank=4, sync_optimizer_state=True, on_refresh="reset"),
         r"on_refresh='reset' then clears: use on_refresh='keep', 'reproject' or 'ldadam', or sync_optimizer_state=False"),
        (dict(rank=4, payload="fp4"), r"LoRDO.payload must be one of \('full', 'low_rank', 'int8'\)"),
        (dict(rank=4, payload="low_rank", projection="local"), r"payload='low_rank' sends Q\^T delta"),
        (dict(rank=4, nesterov=True), r"nesterov=True needs outer_momentum > 0"),
        (dict(rank=4, clip=-1.0), r"LoRDO.clip must be None or > 0"),
        (dict(rank=4, params=7), r"LoRDO.params must be None, a regex"),
        (dict(rank=4, sync_every=2, fragments=3), r"LoRDO.fragments must be an int in \[1, sync_every=2\]"),
        (dict(rank=4, fragments=0), r"LoRDO.fragments must be an int in \[1, sync_every=32\]"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lc.LoRDO(**kwargs)


def test_unknown_variant():
    with pytest.raises(ValueError, match=r"Policy.lordo variant must be one of \('default', 'authors'\), got 'paper'"):
        lc.Policy.lordo(rank=4, variant="paper")


def test_authors_variant_sets_what_their_code_does():
    """ALGORITHMS.md section 3, "What the authors' public research code does"; an option
    given with the variant overrides it."""
    option = lc.Policy.lordo(rank=4, variant="authors").lordo
    assert dict(omega=option.omega, mu=option.mu, normalizer=option.full_rank_normalizer,
                full_rank_input=option.full_rank_input, on_refresh=option.on_refresh,
                sync_optimizer_state=option.sync_optimizer_state, first_projection=option.first_projection,
                weight_decay_at=option.weight_decay_at, clip=option.clip, payload=option.payload,
                projection=option.projection, method=option.method, outer_lr=option.outer_lr,
                outer_momentum=option.outer_momentum, sync_every=option.sync_every) == dict(
        omega=0.97, mu=1.0, normalizer="scalar", full_rank_input="error_fed", on_refresh="ldadam",
        sync_optimizer_state=True, first_projection="identity", weight_decay_at="after", clip=None,
        payload="full", projection="global", method="svd", outer_lr=1.0, outer_momentum=0.0, sync_every=32)
    assert lc.Policy.lordo(rank=4, variant="authors", omega=0.9).lordo.omega == 0.9
    assert lc.Policy.lordo(rank=4).lordo == lc.LoRDO(rank=4)


@pytest.mark.parametrize("tall", [False, True])
def test_ldadam_carry_keeps_the_mean_squared_where_directions_merge(tall):
    """One step of a steady gradient g = (1, 1) in the coordinates of Q = (e1, e2): u = 0.1 g,
    v = 0.001 g^2, no variance. The new Q = ((e1 + e2), (e1 - e2)) / sqrt(2) sees (sqrt(2), 0):
    u = 0.1 (sqrt(2), 0) and v = 0.001 (2, 0), the square of the rotated mean, where rotating v
    alone by C*C would give 0.001 (1, 1)."""
    previous = torch.eye(2)
    new = torch.tensor([[1.0, 1.0], [1.0, -1.0]]) / 2**0.5
    u, v = torch.tensor([[0.1], [0.1]]), torch.tensor([[0.001], [0.001]])
    if tall:
        u, v = u.T, v.T
    u, v = ldadam_carry_math(u, v, torch.tensor(1.0), previous, new, torch.tensor(0.9, dtype=torch.float64),
                             torch.tensor(0.999, dtype=torch.float64), tall=tall)
    want_u, want_v = torch.tensor([[0.1 * 2**0.5], [0.0]]), torch.tensor([[0.002], [0.0]])
    torch.testing.assert_close((u.T, v.T) if tall else (u, v), (want_u, want_v), rtol=1e-6, atol=1e-9)


def test_ldadam_carry_permutes_the_moments_when_q_is_permuted():
    """A permutation of Q's columns permutes the moments and nothing else (C*C = C), for
    moments Adam can hold after 4 steps (v^ >= m^^2: a variance that is not negative)."""
    generator = torch.Generator().manual_seed(0)
    b1, b2 = 1 - 0.9**4, 1 - 0.999**4
    u = torch.randn(3, 5, generator=generator)
    v = b2 * ((u / b1) ** 2 + torch.rand(3, 5, generator=generator))
    previous = torch.linalg.qr(torch.randn(6, 3, generator=generator)).Q
    order = [2, 0, 1]
    new_u, new_v = ldadam_carry_math(u, v, torch.tensor(4.0), previous, previous[:, order],
                                     torch.tensor(0.9, dtype=torch.float64),
                                     torch.tensor(0.999, dtype=torch.float64), tall=False)
    torch.testing.assert_close((new_u, new_v), (u[order], v[order]), rtol=1e-6, atol=1e-7)


def test_identity_first_projection_has_no_init_event():
    """Q is the first r basis vectors until the first sync computes one: no collective at step 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt),
                      lc.Policy.lordo(rank=4, sync_every=3, first_projection="identity"), compiler="eager")
    projections = []
    for _ in range(3):
        step(torch.randn(4, 16), torch.randn(4, 4))
        projections.append(step.backend.runtime.tensors["lordo.projection.0.weight"].clone())
    assert sorted(step.backend.pipeline.final()) == ["step", "sync"]
    assert torch.equal(projections[0], torch.eye(16, 4)) and torch.equal(projections[1], torch.eye(16, 4))
    assert not torch.equal(projections[2], torch.eye(16, 4))


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


def test_fragments_sync_at_staggered_steps():
    """Two fragments of H = 4 (0.weight, 512 of the 676 entries; the rest) sync after steps 1, 5, ...
    and 3, 7, ..., each its own pseudo-gradients alone."""
    step, _, _ = _step(lc.Policy.lordo(rank=4, sync_every=4, fragments=2))
    assert [step.backend.schedule.name_at(k) for k in range(8)] == [
        "init", "sync.0", "step", "sync.1", "step", "sync.0", "step", "sync.1"]

    def synced(graph):
        return sorted(set(re.findall(r"pseudo_gradient_(\w+)", step.graphs[graph]["lordo:sync"].body)))

    assert synced("sync.0") == ["0_weight"] and synced("sync.1") == ["0_bias", "2_bias", "2_weight"]


def test_more_fragments_than_parameters_are_refused():
    with pytest.raises(ValueError, match=r"LoRDO.fragments=5 is more than the 4 parameters the step updates"):
        _step(lc.Policy.lordo(rank=4, sync_every=8, fragments=5))


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
