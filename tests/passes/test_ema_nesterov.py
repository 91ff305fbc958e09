"""EMA-Nesterov against ALGORITHMS.md section 6 written out eagerly around each base optimizer:

    theta+ = A(theta + beta_t d),   d <- gamma d + (1 - gamma)(theta+ - theta),

beta_t = beta for warmup_steps <= t < decay_start (0-based t), else 0.
"""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lordo_compile as lc
from common import ADAM_ATOL, assert_close, compare, named_parameters
from lordo_compile.testing import training_step

STEPS, LR, WD = 16, 1e-2, 0.1
# Both ends of the schedule inside the run: off for steps 0-2, on for 3-11, off from 12.
SCHEDULED = dict(beta=0.6, gamma=0.8, warmup_steps=3, decay_start=12)
ONE_STEP = dict(beta=0.5, gamma=0.0, warmup_steps=0, decay_start=None)


def beta_at(t, beta, warmup_steps, decay_start, **_):
    on = t >= warmup_steps and (decay_start is None or t < decay_start)
    return beta if on else 0.0


class EagerLookahead:
    """The model holds theta. A step moves it to theta + beta_t d, runs the base step there
    (forward, backward, update: `run`), and updates d from where the base update took it
    (`updated`, by default the parameters after `run`)."""

    def __init__(self, params, beta, gamma, warmup_steps, decay_start):
        self.params = list(params)
        self.schedule = dict(beta=beta, warmup_steps=warmup_steps, decay_start=decay_start)
        self.gamma = gamma
        self.d = [torch.zeros_like(p) for p in self.params]

    def step(self, t, run, updated=None):
        beta = beta_at(t, **self.schedule)
        with torch.no_grad():
            theta = [p.detach().clone() for p in self.params]
            for p, d in zip(self.params, self.d):
                p.copy_(p + beta * d)
        loss = run()
        new = updated() if updated is not None else [p.detach().clone() for p in self.params]
        self.d = [self.gamma * d + (1 - self.gamma) * (n - th) for d, n, th in zip(self.d, new, theta)]
        return loss


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=generator), torch.randn(8, 4, generator=generator)) for _ in range(STEPS)]


OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=WD),
    "adam": lambda params: torch.optim.Adam(params, lr=LR, weight_decay=WD),
    "sgd nesterov": lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9, nesterov=True, weight_decay=WD),
}
ATOL = {"adamw": ADAM_ATOL, "adam": ADAM_ATOL, "sgd nesterov": 1e-6}
# d is a difference of weights about 20 times its size, and carries their rounding.
D_ATOL = 1e-5


def _compiled(options, optimizer="adamw", compiler="aot_eager", **policy):
    model = _model()
    opt = OPTIMIZERS[optimizer](model.parameters())
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt),
                      lc.Policy(ema_nesterov=lc.EMANesterov(**options), **policy), compiler=compiler)
    losses = [float(step(x, y)) for x, y in _batches()]
    return model, opt, step, losses


def _eager(options, optimizer="adamw"):
    model = _model()
    opt = OPTIMIZERS[optimizer](model.parameters())
    lookahead = EagerLookahead(model.parameters(), **options)

    def run(x, y):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    losses = [lookahead.step(t, lambda x=x, y=y: run(x, y)) for t, (x, y) in enumerate(_batches())]
    return model, lookahead, losses


def _directions(step, names):
    state = step.state_dict()["runtime"]["tensors"]
    return {name: state[f"ema_nesterov.direction.{name}"] for name in names}


NAMES = ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")


@pytest.mark.parametrize("options, optimizer", [(SCHEDULED, name) for name in OPTIMIZERS] + [(ONE_STEP, "adamw")],
                         ids=[f"ema scheduled, {name}" for name in OPTIMIZERS] + ["one-step, adamw"])
def test_matches_eager_lookahead(options, optimizer):
    model, _, step, losses = _compiled(options, optimizer)
    reference, eager, expected = _eager(options, optimizer)
    assert_close(named_parameters(model), named_parameters(reference), atol=ATOL[optimizer])
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert_close(_directions(step, NAMES), dict(zip(NAMES, eager.d, strict=True)), rtol=1e-4, atol=D_ATOL)
    without, _, _ = _eager(dict(options, beta=0.0), optimizer)
    assert not compare(named_parameters(model), named_parameters(without), rtol=0, atol=1e-3).ok, "no lookahead"
    assert int(step.state_dict()["runtime"]["tensors"]["ema_nesterov.step"]) == STEPS


def test_beta_zero_throughout_is_the_base_step_exactly():
    """Warm-up longer than the run: theta + 0 d is theta, so the run is plain AdamW bit for
    bit, while d still follows the updates (the lookahead would start from a warm d)."""
    model, _, step, _ = _compiled(dict(SCHEDULED, warmup_steps=STEPS, decay_start=None))
    plain = _model()
    opt = torch.optim.AdamW(plain.parameters(), lr=LR, weight_decay=WD)
    base = lc.compile(training_step(lambda x, y: F.mse_loss(plain(x), y), opt), lc.Policy(), compiler="aot_eager")
    for x, y in _batches():
        base(x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    assert all(d.abs().max() > 0 for d in _directions(step, NAMES).values())


def test_beta_schedule_at_its_boundaries():
    from lordo_compile.ops.ema_nesterov import ema_nesterov_beta

    for t in range(STEPS):
        got = ema_nesterov_beta(torch.tensor(t), beta=0.6, warmup_steps=3, decay_start=12)
        assert got.dtype == torch.float32 and float(got) == pytest.approx(beta_at(t, **SCHEDULED)), t
    assert float(ema_nesterov_beta(torch.tensor(10**6), beta=0.6, warmup_steps=3, decay_start=-1)) == \
        pytest.approx(0.6)


def test_composes_with_galore():
    """GaLore's projected AdamW as A: the projection refreshes (steps 0, 12, 24) see the
    gradient at the lookahead point."""
    import test_low_rank as galore

    low_rank = lc.LowRank(rank=galore.RANK, update_proj_gap=galore.GAP, scale=galore.SCALE)
    model = galore._model()
    opt = torch.optim.AdamW(model.parameters(), lr=galore.LR, weight_decay=galore.WD, betas=galore.BETAS,
                            eps=galore.EPS)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt),
                      lc.Policy(low_rank=low_rank, ema_nesterov=lc.EMANesterov(**SCHEDULED)), compiler="aot_eager")
    for x, y in galore._batches():
        step(x, y)

    reference = galore._model()
    base = galore.EagerGaLore(reference, "svd", "keep", [None, None])
    lookahead = EagerLookahead(reference.parameters(), **SCHEDULED)

    def run(k, x, y):
        F.mse_loss(reference(x), y).backward()
        base.step(k)
        base.zero_grad()

    for k, (x, y) in enumerate(galore._batches()):
        lookahead.step(k, lambda k=k, x=x, y=y: run(k, x, y))
    assert_close(named_parameters(model), named_parameters(reference))


def test_composes_with_lordos_inner_step(monkeypatch):
    """One worker, a sync every 4 steps with DiLoCo's outer step (so the anchor a sync
    resets to is not the inner step's result): A is LoRDO's inner step; d follows the
    inner updates, and the reset to the anchor is not one of them."""
    import test_lordo as lordo

    monkeypatch.setattr(lordo, "_mean", lambda t, world: t.clone())
    options = {**lordo.DEFAULTS, **lordo.VARIANTS["outer=nesterov"]}
    model, batches = lordo.lordo_problem(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lordo.LR, weight_decay=lordo.WD, betas=lordo.BETAS,
                            eps=lordo.EPS)
    policy = lc.Policy(lordo=lc.LoRDO(rank=lordo.RANK, sync_every=lordo.H, **options),
                       ema_nesterov=lc.EMANesterov(**SCHEDULED))
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler="aot_eager")
    for x, y in batches:
        step(x, y)
    assert step.backend.runtime.calls == {"init": 1, "step": 8, "sync": 3}

    reference, batches = lordo.lordo_problem(0)
    base = lordo.EagerLoRDO(reference, options, 1, [None, None], [None, None])
    lookahead = EagerLookahead(reference.parameters(), **SCHEDULED)
    local = {}
    merge = base._merge

    def record_then_merge(grads, fragment, sent):
        local["params"] = [p.detach().clone() for p in reference.parameters()]
        merge(grads, fragment, sent)

    base._merge = record_then_merge

    def run(k, x, y):
        local.pop("params", None)
        F.mse_loss(reference(x), y).backward()
        base.step(k)
        reference.zero_grad()

    def updated():
        return local.get("params") or [p.detach().clone() for p in reference.parameters()]

    for k, (x, y) in enumerate(batches):
        lookahead.step(k, lambda k=k, x=x, y=y: run(k, x, y), updated)
    assert_close(named_parameters(model), named_parameters(reference), atol=ADAM_ATOL)
    names = [n for n, _ in reference.named_parameters()]
    # The syncs keep d small against the weights it is a difference of (their rms is 26 to
    # 49 times d's, measured, against about 20 without syncs), so its floor is 3 x D_ATOL.
    assert_close(_directions(step, names), dict(zip(names, lookahead.d, strict=True)), rtol=1e-4, atol=3 * D_ATOL)


def test_composes_with_cage():
    """CAGE's decoupled correction reads the lookahead point as its weight: A is the
    corrected update, taken from theta + beta_t d with the forward reading Q(theta + beta_t d)."""
    import test_fake_quant as qat

    config = qat.CONFIGS["rms4 decoupled"]
    model = qat._model()
    opt = torch.optim.AdamW(model.parameters(), lr=qat.LR, weight_decay=qat.WD)
    policy = lc.Policy(fake_quant=qat._policy(config).fake_quant, ema_nesterov=lc.EMANesterov(**SCHEDULED))
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler="aot_eager")
    losses = [float(step(x, y)) for x, y in qat._batches()]

    reference = qat._model()
    base = qat.EagerQAT(reference, config)
    lookahead = EagerLookahead(reference.parameters(), **SCHEDULED)
    expected = [float(lookahead.step(t, lambda t=t, x=x, y=y: base.step(t, x, y)))
                for t, (x, y) in enumerate(qat._batches())]
    assert_close(named_parameters(model), named_parameters(reference))
    np.testing.assert_allclose(losses, expected, rtol=1e-5)


def test_checkpoint_resume_is_bit_exact_across_the_warmup_boundary():
    """Saved after 3 steps (beta_t = 0 until step 4), resumed in fresh objects from a
    weights_only checkpoint: the next 7 steps cross the boundary bit for bit."""
    options = dict(beta=0.6, gamma=0.8, warmup_steps=4, decay_start=None)
    batches = _batches()[:10]

    def fresh():
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
        step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt),
                          lc.Policy(ema_nesterov=lc.EMANesterov(**options)), compiler="aot_eager")
        return model, opt, step

    model, _, step = fresh()
    for x, y in batches:
        step(x, y)
    expected = [p.detach().clone() for p in model.parameters()] + list(_directions(step, NAMES).values())

    model, opt, step = fresh()
    for x, y in batches[:3]:
        step(x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step.state_dict()}, buffer)
    assert all(d.abs().max() > 0 for d in _directions(step, NAMES).values()), "d is warm before the lookahead starts"

    def resume(load_step_state):
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        model, opt, step = fresh()
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        if load_step_state:
            step.load_state_dict(saved["step"])
        for x, y in batches[3:]:
            step(x, y)
        return [p.detach().clone() for p in model.parameters()] + list(_directions(step, NAMES).values())

    assert all(torch.equal(a, b) for a, b in zip(resume(True), expected))
    assert not all(torch.equal(a, b) for a, b in zip(resume(False), expected)), "d and beta_t's step must be saved"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta=1.0), r"EMANesterov.beta must be a number in \[0, 1\), got 1.0"),
        (dict(beta=-0.1), r"EMANesterov.beta must be a number in \[0, 1\), got -0.1"),
        (dict(beta=True), r"EMANesterov.beta must be a number in \[0, 1\), got True"),
        (dict(gamma=1.0), r"EMANesterov.gamma must be a number in \[0, 1\), got 1.0"),
        (dict(gamma="0.9"), r"EMANesterov.gamma must be a number in \[0, 1\), got '0.9'"),
        (dict(warmup_steps=-1), r"EMANesterov.warmup_steps must be an int >= 0, got -1"),
        (dict(warmup_steps=2.0), r"EMANesterov.warmup_steps must be an int >= 0, got 2.0"),
        (dict(decay_start=10.5), r"EMANesterov.decay_start must be an int or None, got 10.5"),
        (dict(warmup_steps=10, decay_start=10), r"EMANesterov.decay_start must be > warmup_steps \(10\), got 10"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lc.EMANesterov(**kwargs)


def test_policy_field_takes_only_its_option():
    with pytest.raises(ValueError, match=r"Policy.lookahead must be a lordo_compile.EMANesterov, got 0.5"):
        lc.Policy(lookahead=0.5)


@pytest.mark.inductor
def test_inductor_matches_eager_lookahead():
    model, _, _, losses = _compiled(SCHEDULED, compiler="inductor")
    reference, _, expected = _eager(SCHEDULED)
    assert_close(named_parameters(model), named_parameters(reference))
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
