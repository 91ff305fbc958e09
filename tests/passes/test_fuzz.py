"""Fuzzed compositions: random policies, model shapes and optimizer settings, each compiled
step checked against the eager references of the pass tests, or refused with a clear error.

Drawn per example: an MLP of 2-3 linear layers with random widths; a family with its
options, the optimizer and its flags, and `on_nonfinite` (which must not change a finite
run):
- plain: no rewrite, SGD/Adam/AdamW with random flags, against torch.optim run eagerly;
- low_rank: GaLore with random rank, gap, method, refresh rule and scale, against
  `test_low_rank.EagerGaLore` (matrices whose smaller side is <= rank stay dense, as
  documented; none eligible must be refused naming the rank). Where two of a gradient's
  r+1 leading singular values nearly coincide, the projection is not determined and no
  exact comparison is possible: such examples are counted, not compared;
- eco: ECO with random format, scale, rounding and seed, against `test_eco.EagerECO` (at
  int4, a weight whose input size is not a multiple of the group size stays dense);
  sometimes composed with a pass it cannot combine with, which must be refused naming both.
A refused step must leave the model untouched.

CI runs a fixed, derandomized set. The long run (random examples, about 2 s each; the
statistics count the examples compared and refused per family):

    LORDO_FUZZ_EXAMPLES=500 bash scripts/test.sh tests/passes/test_fuzz.py --hypothesis-show-statistics
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import lordo_compile as lc
from common import max_rel_diff
from lordo_compile.testing import training_step
from test_eco import EagerECO
from test_low_rank import EagerGaLore

STEPS = 5
LONG_RUN = "LORDO_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("LORDO_FUZZ_EXAMPLES", 16))
LINEAR_WEIGHTS = r"^\d+\.weight$"


@st.composite
def cases(draw):
    widths = draw(st.lists(st.sampled_from([3, 5, 8, 16, 24, 32, 64]), min_size=3, max_size=4))
    case = dict(widths=widths, on_nonfinite=draw(st.sampled_from([None, "raise", "skip"])),
                family=draw(st.sampled_from(["plain", "low_rank", "eco"])),
                lr=draw(st.sampled_from([1e-3, 1e-2, 5e-2])), weight_decay=draw(st.sampled_from([0.0, 0.01, 0.1])))
    betas = draw(st.sampled_from([(0.9, 0.999), (0.8, 0.95)]))
    if case["family"] == "plain":
        kind = case["kind"] = draw(st.sampled_from(["sgd", "adam", "adamw"]))
        case["maximize"] = draw(st.booleans())
        if kind == "sgd":
            case["momentum"] = draw(st.sampled_from([0.0, 0.5, 0.9]))
            case["nesterov"] = case["momentum"] > 0 and draw(st.booleans())
            case["dampening"] = 0.0 if case["nesterov"] else draw(st.sampled_from([0.0, 0.1]))
        else:
            case.update(betas=betas, amsgrad=draw(st.booleans()), eps=draw(st.sampled_from([1e-8, 1e-6])))
    elif case["family"] == "low_rank":
        case.update(kind=draw(st.sampled_from(["adam", "adamw"])), betas=betas,
                    rank=draw(st.sampled_from([1, 2, 4, 8])), gap=draw(st.integers(1, 3)),
                    method=draw(st.sampled_from(["svd", "randomized", "subspace"])),
                    on_refresh=draw(st.sampled_from(["keep", "reproject", "reset"])),
                    scale=draw(st.sampled_from([0.25, 1.0])))
    else:
        case.update(kind=draw(st.sampled_from(["sgd", "adamw"])), betas=betas,
                    format=draw(st.sampled_from(["fp8_e4m3", "int8", "int4"])),
                    scale=draw(st.sampled_from(["per_row", "per_tensor"])),
                    rounding=draw(st.sampled_from(["nearest", "stochastic"])), seed=draw(st.integers(0, 9)),
                    also=draw(st.sampled_from([None, None, None, "low_rank", "fake_quant"])))
    return case


def _model(widths):
    torch.manual_seed(0)
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Linear(fan_in, fan_out)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def _batches(widths):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, widths[0], generator=generator), torch.randn(8, widths[-1], generator=generator))
            for _ in range(STEPS)]


def _optimizer(case, params):
    common = dict(lr=case["lr"], weight_decay=case["weight_decay"])
    if case["kind"] == "sgd":
        if case["family"] == "eco":
            return torch.optim.SGD(params, momentum=0.9, **common)
        return torch.optim.SGD(params, momentum=case["momentum"], nesterov=case["nesterov"],
                               dampening=case["dampening"], maximize=case["maximize"], **common)
    flags = dict(betas=case["betas"])
    if case["family"] == "plain":
        flags.update(eps=case["eps"], amsgrad=case["amsgrad"], maximize=case["maximize"])
    return (torch.optim.Adam if case["kind"] == "adam" else torch.optim.AdamW)(params, **common, **flags)


def _policy(case):
    if case["family"] == "plain":
        policy = lc.Policy()
    elif case["family"] == "low_rank":
        policy = lc.Policy.galore(rank=case["rank"], update_proj_gap=case["gap"], scale=case["scale"],
                                  method=case["method"], on_refresh=case["on_refresh"], power_iterations=1,
                                  params=LINEAR_WEIGHTS)
    else:
        others = {"low_rank": dict(low_rank=lc.LowRank(rank=1)),
                  "fake_quant": dict(fake_quant=lc.FakeQuant(bits=4))}.get(case["also"], {})
        policy = lc.Policy(quantized_weights=lc.ECO(format=case["format"], scale=case["scale"],
                                                    rounding=case["rounding"], seed=case["seed"],
                                                    params=LINEAR_WEIGHTS), **others)
    return dataclasses.replace(policy, on_nonfinite=case["on_nonfinite"])


def _expected_refusal(case) -> tuple[str, ...] | None:
    """The words a refusal must contain, where the documentation says the case is refused."""
    if case["family"] == "plain" and case.get("amsgrad"):
        return ("amsgrad",)
    if case["family"] == "low_rank" and all(min(a, b) <= case["rank"] for a, b in zip(case["widths"],
                                                                                         case["widths"][1:])):
        return ("rank",)
    if case["family"] == "eco" and case["also"] is not None:
        return ("eco", case["also"])
    return None


def _eco_weights(case, model):
    """The weights ECO keeps quantized: at int4, those whose input size is a multiple of the
    group size (32); the others stay in full precision, as `ECO.choose` documents."""
    linears = [m.weight for m in model if isinstance(m, nn.Linear)]
    return [w for w in linears if case["format"] != "int4" or w.shape[1] % 32 == 0]


def _eager(case, model, batches, sketches) -> bool:
    """Train `model` with the eager reference; False where GaLore's subspace was not
    determined (a gradient with sigma_r ~ sigma_r+1), so no exact comparison is possible."""
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    if case["family"] == "plain":
        opt = _optimizer(case, model.parameters())
        for x, y in batches:
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        return True
    if case["family"] == "eco":
        eager = EagerECO(model, case["kind"], case["format"], case["scale"], case["rounding"], "eco", case["seed"],
                         lr=case["lr"], wd=case["weight_decay"], betas=case["betas"], momentum=0.9,
                         weights=_eco_weights(case, model))
        for k, (x, y) in enumerate(batches):
            eager.step(k, x, y)
        return True
    names = {id(p): name for name, p in model.named_parameters()}
    low_rank = [w for w in weights if min(w.shape) > case["rank"]]
    eager = EagerGaLore(model, case["method"], case["on_refresh"], [sketches[names[id(w)]] for w in low_rank],
                        coupled=case["kind"] == "adam", low_rank=low_rank, lr=case["lr"], wd=case["weight_decay"],
                        betas=case["betas"], rank=case["rank"], gap=case["gap"], scale=case["scale"])
    for k, (x, y) in enumerate(batches):
        F.mse_loss(model(x), y).backward()
        eager.step(k)
        eager.zero_grad()
    return min(eager.spectral_gaps, default=1.0) > 1e-3


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LONG_RUN,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_a_random_composition_matches_its_eager_reference_or_is_refused(case):
    torch._dynamo.reset()
    model = _model(case["widths"])
    before = [p.detach().clone() for p in model.parameters()]
    batches = _batches(case["widths"])
    try:
        opt = _optimizer(case, model.parameters())
        step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), _policy(case),
                          compiler="aot_eager")
        for x, y in batches:
            step(x, y)
    except (ValueError, NotImplementedError) as error:
        words = _expected_refusal(case)
        if case["family"] == "eco" and not _eco_weights(case, model) and words is None:
            words = ("group_size",)
        assert words is not None, f"refused, but documented to work: {case}: {error}"
        assert all(word in str(error) for word in words), f"{case}: {error}"
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "a refused step changed the model"
        event(f"{case['family']}: refused")
        return

    assert _expected_refusal(case) is None, f"documented to be refused, but ran: {case}"
    with step.materialized():
        compiled = [p.detach().clone() for p in model.parameters()]
    reference = _model(case["widths"])
    # The randomized range finder's sketches are drawn by the step; the reference reuses them.
    state = step.state_dict()["runtime"]["tensors"]
    sketches = {name: state.get(f"low_rank.sketch.{name}") for name, _ in reference.named_parameters()}
    if not _eager(case, reference, batches, sketches):
        event(f"{case['family']}: subspace not determined, not compared")
        return
    assert max_rel_diff(list(reference.parameters()), compiled) <= 1e-5, case
    event(f"{case['family']}: compared")
