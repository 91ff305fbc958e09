"""Adaptive rotation (RoSTE, ALGORITHMS.md section 6) composed with infrequent sync, GaLore,
LoRDO, CAGE's correction, ECO and EMA-Nesterov (section 7), against eager references.

Every nn.Linear reads its weight and its input 4-bit fake-quantized, in the Hadamard
basis while that layer's choice says so; the choice is remade from the weight and input
the forward sees at step 0 and every EVERY steps, before that step's forward. The other
rewrite acts on the update the straight-through gradient drives:
- local SGD (2 processes): AdamW inner steps, the models averaged after steps H, 2H, ...
  (torch's PeriodicModelAverager);
- GaLore with CAGE's correction (1 process): EagerGaLore (tests/passes/test_low_rank.py)
  on the STE gradient, and the correction lambda_t (W - Q_eff(W)), with Q_eff the layer's
  current (rotated or not) quantizer, added after the projected update (decoupled) or to
  the gradient before the refresh reads it and the update projects it (coupled);
- LoRDO (2 processes): EagerLoRDO (tests/test_lordo.py) on the STE gradient;
- ECO, fp8 on 2.weight and 4.weight (1 process): test_eco_compositions' EagerECO around
  AdamW; the model holds the decoded stored weight, so the forward and the choice read it;
- EMA-Nesterov (1 process): test_ema_nesterov's EagerLookahead around AdamW; the model holds
  theta + beta_t d during the step, so the forward and the choice read the lookahead point.
With several workers, each chooses from its own weight and input (nothing is sent for
the choice), so workers holding the same synced model may quantize a layer differently.
A choice every 3 steps against a sync every 2 (local SGD) or 4 (LoRDO) meets a sync at
step 3 (and 9); against a refresh every 2 (decoupled CAGE: every subset of the two events
is met) at steps 0 and 6, against a refresh every 3 (coupled CAGE: two graphs, to keep the
file's compile time down) at every choice.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

import lordo_compile as lc
from common import ADAM_ATOL, assert_close, named_parameters
from lordo_compile.launch import run_workers
from lordo_compile.testing import training_step
from test_adaptive_rotation import CLIP_4BIT, effective, relative_error, rotate, straight_through
from test_eco_compositions import EMA, EagerECO
from test_ema_nesterov import EagerLookahead
from test_lordo import H as LORDO_SYNC_EVERY
from test_lordo import RANK as LORDO_RANK
from test_lordo import EagerLoRDO
from test_low_rank import EagerGaLore

STEPS, EVERY = 12, 3  # rotation chosen at 0, 3, 6, 9
LR, WD, BETAS, EPS = 1e-2, 0.1, (0.9, 0.999), 1e-8
SYNC_EVERY = 2  # local SGD: syncs after steps 1, 3, 5, ...: the choice at 3 and 9 meets one
GALORE = dict(rank=2, scale=0.25)  # the 3 leading singular values stay >= 0.5 % of sigma_1 apart
LAM = 5.0  # CAGE: lambda_t = LAM (t + 1) / STEPS (silence_ratio 0, linear ramp)
# LoRDO's defaults at EagerLoRDO's rank 8 and sync every 4, but a full payload: with the
# int8 one, float differences of 1e-7 between two correct runs move a code by one step now
# and then, which later syncs spread over the matrix (1 entry in 512 off by 7e-5 without
# rotation here, 400 entries by 4e-4 with it).
LORDO = lc.LoRDO(rank=LORDO_RANK, sync_every=LORDO_SYNC_EVERY, payload="full")
NAMES = ("0.weight", "2.weight", "4.weight")


def _model():
    torch.manual_seed(0)
    # Rows of 16, 32 and 32 values: each is one Hadamard block. 0.weight (32x16), 2.weight
    # (32x32) and, at GaLore's rank 2, 4.weight (4x32) take the low-rank update; LoRDO's
    # rank 8 leaves 4.weight dense.
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _batches(rank=0):
    """From step 6 on, input feature 3 is an outlier, so the first layer turns to the
    rotation at the choice of step 6."""
    generator = torch.Generator().manual_seed(100 + rank)
    batches = []
    for k in range(STEPS):
        x, y = torch.randn(16, 16, generator=generator), torch.randn(16, 4, generator=generator)
        if k >= 6:
            x[:, 3] *= 50
        batches.append((x, y))
    return batches


def _fake_quant(correction=None):
    return lc.FakeQuant(bits=4, activation_bits=4, correction=correction,
                        adaptive_rotation=lc.AdaptiveRotation(every=EVERY))


def _lambda(k):
    return LAM * (k + 1) / STEPS


class EagerRotation:
    """EagerRoSTE's forward (tests/passes/test_adaptive_rotation.py) for a Sequential: per
    layer, weight and input quantized as the layer's choice says, the choice remade at
    step 0 and every `every` steps from the relative errors of both, rotated and not."""

    def __init__(self, model, every=EVERY):
        self.model, self.every = model, every
        self.linears = [m for m in model if isinstance(m, nn.Linear)]
        self.rotated = {layer: False for layer in self.linears}
        self.history = []
        # At each choice, |rotated - plain| / (rotated + plain) of the summed errors: where
        # it is ~0, rounding decides the choice and no exact comparison is possible.
        self.margins = []

    def loss(self, k, x, y, first=True):
        """first=False: a second forward of step k (gossip's, at the previous point), which
        reads the choices the first made."""
        for layer in self.model:
            if not isinstance(layer, nn.Linear):
                x = layer(x)
                continue
            if first and k % self.every == 0:
                w, inp = layer.weight.detach(), x.detach()
                plain = relative_error(w) + relative_error(inp)
                rotated = relative_error(rotate(w)) + relative_error(rotate(inp))
                self.rotated[layer] = rotated < plain
                self.margins.append(abs(rotated - plain) / (rotated + plain))
            r = self.rotated[layer]
            x = F.linear(straight_through(x, r), straight_through(layer.weight, r), layer.bias)
        if first:
            self.history.append(tuple(self.rotated[layer] for layer in self.linears))
        return F.mse_loss(x, y)

    def errors(self):
        """CAGE's e = W - Q_eff(W) of each quantized weight, in the layer's current basis."""
        return {layer.weight: layer.weight.detach() - effective(layer.weight.detach(), self.rotated[layer])
                for layer in self.linears}


def _flags(step):
    tensors = step.state_dict()["runtime"]["tensors"]
    return tuple(bool(tensors[f"fake_quant.rotate.{name}"]) for name in NAMES)


def _compiled(policy, batches):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, betas=BETAS, eps=EPS)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler="eager")
    losses, history = [], []
    for x, y in batches:
        losses.append(float(step(x, y)))
        history.append(_flags(step))
    with step.materialized():  # ECO holds its weights as codes and scales
        params = named_parameters(model)
    return {"params": params, "losses": losses, "history": history, "graphs": sorted(step.graphs),
            "schedule": [step.backend.schedule.name_at(k) for k in range(STEPS)],
            "calls": dict(step.backend.runtime.calls)}


def _reference(model, eager, batches, inner_step, around=lambda k, run: run()):
    """`around(k, run)` runs step k's forward, backward and `inner_step` (`run`) and returns its
    loss: EagerLookahead.step moves the model to the lookahead point around it."""

    def run(k, x, y):
        loss = eager.loss(k, x, y)
        loss.backward()
        inner_step(k)
        return float(loss.detach())

    losses = [around(k, lambda k=k, x=x, y=y: run(k, x, y)) for k, (x, y) in enumerate(batches)]
    return {"params": named_parameters(model), "losses": losses, "history": eager.history, "margin": min(eager.margins)}


def _eager_local_sgd(rank):
    model = _model()
    eager = EagerRotation(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, betas=BETAS, eps=EPS)
    averager = PeriodicModelAverager(period=SYNC_EVERY, warmup_steps=SYNC_EVERY - 1)

    def inner_step(k):
        opt.step()
        averager.average_parameters(model.parameters())  # before zero_grad: it skips .grad None
        opt.zero_grad()

    return _reference(model, eager, _batches(rank), inner_step)


def _eager_lordo(rank, world):
    model = _model()
    eager = EagerRotation(model)
    options = {field.name: getattr(LORDO, field.name) for field in dataclasses.fields(LORDO)}
    lordo = EagerLoRDO(model, options, world, [None, None], [None, None])

    def inner_step(k):
        lordo.step(k)
        model.zero_grad()

    return _reference(model, eager, _batches(rank), inner_step)


def _eager_galore(form, gap):
    """EagerGaLore on the STE gradient, CAGE's correction of form `form` around it."""
    model = _model()
    eager = EagerRotation(model)
    # Every nn.Linear weight whose smaller side exceeds the rank, 4.weight (4x32) included.
    low_rank = [m.weight for m in model if isinstance(m, nn.Linear) and min(m.weight.shape) > GALORE["rank"]]
    galore = EagerGaLore(model, "svd", "keep", [None] * len(low_rank), low_rank=low_rank, lr=LR, wd=WD, betas=BETAS,
                         eps=EPS, gap=gap, **GALORE)

    @torch.no_grad()
    def inner_step(k):
        errors = eager.errors()  # of the weight the forward read, before the update
        if form == "coupled":
            for w, e in errors.items():
                w.grad += _lambda(k) * e  # before the refresh reads the gradient
        galore.step(k)
        if form == "decoupled":
            for w, e in errors.items():
                w -= LR * _lambda(k) * e
        galore.zero_grad()

    result = _reference(model, eager, _batches(), inner_step)
    result["spectral_gap"] = min(galore.spectral_gaps)
    return result


# ECO's weights are codes times a row scale, so an entry of a rotated row, a signed sum of a
# block's codes, can be exactly 0: on the boundary the 4-bit grid (no zero level) has there,
# where last-bit differences pick the level. In this run int8, and fp8 on 0.weight's rows of
# 16, meet such entries (6e-8 of a step from the boundary); fp8 on 2.weight and 4.weight stays
# clear by 2e-4.
ECO_OPTION = lc.ECO(format="fp8_e4m3", params=r"^[24]\.weight$")
ECO_STORED = ("2.weight", "4.weight")


def _boundary_margin(y):
    """How close y comes to a boundary of the 4-bit grid (an integer multiple of its step), in steps."""
    u = y / (2 * CLIP_4BIT * y.pow(2).mean(-1, keepdim=True).sqrt() / 15)
    return float((u - u.round()).abs()[u.abs() < 7.5].min())


def _eager_eco():
    model = _model()
    # Its AdamW takes test_eco_compositions' LR, WD, BETAS and EPS, which are this file's.
    eco = EagerECO(model, ECO_OPTION.format, stored=ECO_STORED)
    eager = EagerRotation(model)
    stored = (model[2], model[4])  # ECO_STORED
    margins = []

    def inner_step(k):
        margins.extend(_boundary_margin(rotate(layer.weight.detach())) for layer in stored if eager.rotated[layer])
        for name, p in eco.params.items():
            eco.adamw(name, p.grad, k)
        model.zero_grad()

    result = _reference(model, eager, _batches(), inner_step)
    result["stored_margin"] = min(margins)
    return result


def _eager_ema():
    model = _model()
    eager = EagerRotation(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, betas=BETAS, eps=EPS)
    lookahead = EagerLookahead(model.parameters(), **EMA)

    def inner_step(k):
        opt.step()
        opt.zero_grad()

    return _reference(model, eager, _batches(), inner_step, around=lookahead.step)


def rotation_worker(rank, world):
    torch._dynamo.reset()
    sync = {"compiled": _compiled(lc.Policy(fake_quant=_fake_quant(), sync=lc.Sync(every=SYNC_EVERY)),
                                  _batches(rank)),
            "reference": _eager_local_sgd(rank)}
    torch._dynamo.reset()
    lordo = {"compiled": _compiled(lc.Policy(fake_quant=_fake_quant(), lordo=LORDO), _batches(rank)),
             "reference": _eager_lordo(rank, world)}
    return {"sync": sync, "lordo": lordo}


@pytest.fixture(scope="module")
def distributed_runs():
    return run_workers(rotation_worker, 2, timeout=600)


GAPS = {"decoupled": 2, "coupled": 3}  # GaLore's update_proj_gap with each form of the correction


@pytest.fixture(scope="module", params=list(GAPS))
def galore_run(request):
    form, gap = request.param, GAPS[request.param]
    cage = lc.CAGE(lam=LAM, total_steps=STEPS, silence_ratio=0.0, form=form)
    low_rank = lc.LowRank(rank=GALORE["rank"], update_proj_gap=gap, scale=GALORE["scale"], method="svd")
    torch._dynamo.reset()
    compiled = _compiled(lc.Policy(fake_quant=_fake_quant(cage), low_rank=low_rank), _batches())
    return form, {"compiled": compiled, "reference": _eager_galore(form, gap)}


# name: (the rewrite beside fake_quant, eager reference). EMA-Nesterov's lookahead is on for
# steps 3-9 (warm-up 3, decay from 10), so the choices at 3, 6 and 9 read a lookahead point.
STORAGE_AND_LOOKAHEAD = {
    "eco": (dict(eco=ECO_OPTION), _eager_eco),
    "ema_nesterov": (dict(ema_nesterov=lc.EMANesterov(**EMA)), _eager_ema),
}


@pytest.fixture(scope="module", params=list(STORAGE_AND_LOOKAHEAD))
def storage_or_lookahead_run(request):
    rest, eager = STORAGE_AND_LOOKAHEAD[request.param]
    torch._dynamo.reset()
    return {"compiled": _compiled(lc.Policy(fake_quant=_fake_quant(), **rest), _batches()), "reference": eager()}


def _check(compiled, reference):
    # Every choice was clear-cut, so the compiled step must make the same one.
    assert reference["margin"] > 1e-3
    assert compiled["history"] == reference["history"]
    # The run exercises both choices and a flip: layer 0 turns to the rotation at step 6.
    assert {flags[0] for flags in reference["history"]} == {False, True}
    assert not reference["history"][5][0] and reference["history"][6][0]
    assert_close(compiled["params"], reference["params"], atol=ADAM_ATOL)  # every run here is AdamW's
    assert_close(torch.tensor(compiled["losses"]), torch.tensor(reference["losses"]))


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["sync", "lordo"])
def test_rotation_with_workers_matches_eager(distributed_runs, case):
    for result in distributed_runs:
        _check(result[case]["compiled"], result[case]["reference"])


SCHEDULES = {
    "sync": ["choose_rotation", "sync", "step", "choose_rotation+sync", "step", "sync",
             "choose_rotation", "sync", "step", "choose_rotation+sync", "step", "sync"],
    "lordo": ["choose_rotation+init", "step", "step", "choose_rotation+sync", "step", "step",
              "choose_rotation", "sync", "step", "choose_rotation", "step", "sync"],
    "decoupled": ["choose_rotation+refresh", "step", "refresh", "choose_rotation", "refresh", "step",
                  "choose_rotation+refresh", "step", "refresh", "choose_rotation", "refresh", "step"],
    "coupled": ["choose_rotation+refresh", "step", "step"] * 4,
}


def _check_schedule(compiled, schedule):
    assert compiled["schedule"] == schedule
    assert compiled["graphs"] == sorted(set(schedule))
    assert compiled["calls"] == {name: schedule.count(name) for name in set(schedule)}


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["sync", "lordo"])
def test_rotation_choice_meets_a_sync(distributed_runs, case):
    for result in distributed_runs:
        _check_schedule(result[case]["compiled"], SCHEDULES[case])


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["sync", "lordo"])
def test_models_agree_after_the_last_sync(distributed_runs, case):
    # Each worker chose its rotations from its own weight and input; the sync after the
    # last step still leaves every worker the same model.
    first, second = (result[case]["compiled"]["params"] for result in distributed_runs)
    assert_close(second, first, rtol=0, atol=0)


def test_rotation_with_galore_and_cage_matches_eager(galore_run):
    form, run = galore_run
    _check(run["compiled"], run["reference"])
    assert run["reference"]["spectral_gap"] > 1e-3
    _check_schedule(run["compiled"], SCHEDULES[form])


def test_rotation_with_eco_or_ema_nesterov_matches_eager(storage_or_lookahead_run):
    compiled, reference = storage_or_lookahead_run["compiled"], storage_or_lookahead_run["reference"]
    # Every rotated stored weight was quantized clear of a tie (ECO_OPTION's comment).
    assert reference.get("stored_margin", 1.0) > 1e-5
    _check(compiled, reference)
    _check_schedule(compiled, ["choose_rotation", "step", "step"] * 4)
