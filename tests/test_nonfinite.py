"""A NaN or inf loss or gradient: raised or skipped inside the compiled step, state untouched."""

import dataclasses
import datetime
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lordo_compile as lc
from common import DEVICE
from lordo_compile.launch import run_workers
from lordo_compile.passes import nonfinite
from lordo_compile.testing import training_step

POLICIES = {
    "identity": lambda: lc.Policy(),
    "galore": lambda: lc.Policy.galore(rank=4, update_proj_gap=2),
    "ddp": lambda: lc.Policy.ddp(),
    "local_sgd": lambda: lc.Policy.local_sgd(sync_every=2),
    "diloco": lambda: lc.Policy.diloco(sync_every=2),
    # The average of step 1's sync is merged after step 2 (sync 1, 3, ...; merge 2, 4, ...); its
    # int8 codes are sent unpoisoned, its float scales poisoned.
    "overlapped_diloco": lambda: lc.Policy.diloco(sync_every=2, delay=1, local_weight=0.5, payload="int8"),
    "low_rank_ddp": lambda: lc.Policy.low_rank_ddp(rank=4, update_proj_gap=2),
    "lordo": lambda: lc.Policy.lordo(rank=4, sync_every=2),
    # As overlapped_diloco, with LoRDO's int8 payload: codes and scales gathered, dense deltas summed.
    "overlapped_lordo": lambda: lc.Policy.lordo(rank=4, sync_every=2, delay=1),
    "cage": lambda: lc.Policy.cage(bits=4, total_steps=4, silence_ratio=0.0),
    "eco": lambda: lc.Policy.eco(format="int8"),
    "ema_nesterov": lambda: lc.Policy(ema_nesterov=lc.EMANesterov(beta=0.5, gamma=0.9, warmup_steps=1)),
    "adaptive_rotation": lambda: lc.Policy(fake_quant=lc.FakeQuant(bits=4, activation_bits=4,
                                                                   adaptive_rotation=lc.AdaptiveRotation(every=2))),
    # Compositions: events that coincide (a refresh on a sync step), weights stored by ECO under
    # the others' updates and anchors, and the four-way stack.
    "galore+diloco": lambda: lc.Policy(low_rank=lc.LowRank(rank=4, update_proj_gap=2),
                                       sync=lc.Sync(every=2, outer_lr=0.7, outer_momentum=0.9, nesterov=True)),
    "eco+diloco": lambda: lc.Policy(eco=lc.ECO(format="int8"), sync=lc.Sync(every=2, outer_lr=0.7,
                                                                             outer_momentum=0.9, nesterov=True)),
    "eco+galore": lambda: lc.Policy(eco=lc.ECO(format="int8"), low_rank=lc.LowRank(rank=4, update_proj_gap=2)),
    "rotation+galore": lambda: lc.Policy(low_rank=lc.LowRank(rank=4, update_proj_gap=2), fake_quant=lc.FakeQuant(
        bits=4, activation_bits=4, adaptive_rotation=lc.AdaptiveRotation(every=3))),
    "docom+galore": lambda: lc.Policy(gossip=lc.Gossip(ratio=0.5), low_rank=lc.LowRank(rank=4, update_proj_gap=2)),
    # Moments held in 8 bits (blocks of 32 from 256 entries: 0.weight's): their codes and scales
    # are written back under the same guard; the outer momentum too.
    "quantized_state": lambda: lc.Policy(quantized_state=lc.QuantizedState(block_size=32, min_size=256)),
    "quantized_state+diloco": lambda: lc.Policy(quantized_state=lc.QuantizedState(block_size=32, min_size=256),
                                                sync=lc.Sync(every=2, outer_lr=0.7, outer_momentum=0.9, nesterov=True)),
    "lordo+cage+eco+ema": lambda: lc.Policy(
        lordo=lc.LoRDO(rank=4, sync_every=2), fake_quant=lc.FakeQuant(bits=4, correction=lc.CAGE(
            total_steps=4, silence_ratio=0.0)), eco=lc.ECO(format="fp8_e4m3"),
        ema_nesterov=lc.EMANesterov(beta=0.5, warmup_steps=1)),
}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(DEVICE)


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=generator).to(DEVICE), torch.randn(8, 4, generator=generator).to(DEVICE))
            for _ in range(4)]


def _compile(name, mode):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    policy = dataclasses.replace(POLICIES[name](), on_nonfinite=mode)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler="eager")
    return model, opt, step


def _snapshot(model, step):
    with step.materialized():
        return [p.detach().clone() for p in model.parameters()], step.state_dict()


@pytest.mark.parametrize("name", list(POLICIES))
def test_raise_names_the_step_and_leaves_state_as_it_was(name):
    def bad_step(step, x, y):
        with pytest.raises(lc.NonFiniteError, match=r"step 3 \(graph '[\w+]+'\): the loss is not finite"):
            step(x, y)

    _bad_fourth_step_leaves_state_as_it_was(name, bad_step)


def _bad_fourth_step_leaves_state_as_it_was(name, bad_step):
    """Three good steps, then `bad_step` with a NaN target: parameters, state and the step
    counter are as after the third; returns the step and the last batch."""
    model, opt, step = _compile(name, "raise")
    batches = _batches()
    for x, y in batches[:3]:
        step(x, y)
    before, state = _snapshot(model, step)
    x, y = batches[3]
    bad_step(step, x, y.clone().fill_(float("nan")))
    after, state_after = _snapshot(model, step)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    for key, tensor in state["runtime"]["tensors"].items():
        if not key.startswith("nonfinite."):
            assert torch.equal(tensor, state_after["runtime"]["tensors"][key]), key
    assert state_after["runtime"]["step"] == 3
    return step, x, y


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["identity", "diloco", "eco"])
def test_read_one_call_late_the_next_call_raises_and_state_is_as_before_the_bad_step(name, monkeypatch):
    # What the check does on a GPU (nonfinite.reads_later): the flags are read when the next
    # call starts, or when a checkpoint is taken.
    monkeypatch.setattr(nonfinite, "reads_later", lambda flags: True)
    # The bad call returns; the checkpoint (_snapshot's state_dict) reads its flags.
    step, x, y = _bad_fourth_step_leaves_state_as_it_was(name, lambda step, x, y: step(x, y))
    late = r"step {} \(graph '[\w+]+'\): the loss is not finite.*read when the next call started"
    with pytest.raises(lc.NonFiniteError, match=late.format(3)):
        step(x, y)
    step(x, y)
    step(x, y.clone().fill_(float("nan")))
    with pytest.raises(lc.NonFiniteError, match=late.format(4)):
        step(x, y)
    assert step.state_dict()["runtime"]["step"] == 4


def test_raise_names_the_first_bad_gradient():
    model, opt, step = _compile("identity", "raise")
    x, y = _batches()[0]
    step(x, y)
    x = x.clone()
    x[0, 0] = float("inf")  # the loss stays finite only if ReLU hides it: check whatever comes first
    with pytest.raises(lc.NonFiniteError, match=r"the (loss|gradient of 0\.weight) is not finite"):
        step(x, y)


@pytest.mark.parametrize("name", list(POLICIES))
def test_skip_counts_and_matches_a_run_without_that_batch(name):
    batches = _batches()
    model, opt, step = _compile(name, "skip")
    with pytest.warns(RuntimeWarning, match=r"the loss is not finite; the step was skipped"):
        for i, (x, y) in enumerate(batches):
            step(x, y)
            if i == 1:
                step(x, y.clone().fill_(float("nan")))
    skipped, _ = _snapshot(model, step)
    assert int(step.state_dict()["runtime"]["tensors"]["nonfinite.skipped"]) == 1

    reference, _, clean = _compile(name, None)
    for x, y in batches:
        clean(x, y)
    expected, _ = _snapshot(reference, clean)
    for a, b in zip(skipped, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_flags_mark_the_tensors_holding_nan_or_inf():
    """A NaN anywhere (the vectorized body or the tail of a loop), an inf of either sign, in
    fp32, bf16 or fp16, is not finite; large finite values are, fp16's beyond its own range in
    norm; the one finite tensor flagged is one whose norm overflows float32 (documented)."""
    nan, inf = float("nan"), float("inf")
    tensors = [torch.randn(1003), torch.randn(1003), torch.randn(1003), torch.full((7,), 1e18), torch.randn(5, 6),
               torch.randn(64, dtype=torch.bfloat16), torch.tensor(2.5), torch.full((33,), -6e4, dtype=torch.float16),
               torch.randn(8, dtype=torch.float16), torch.full((4,), 3e38)]
    tensors[1][500], tensors[2][1002], tensors[4][3, 2] = nan, -inf, inf
    tensors[5][63], tensors[8][0] = inf, -inf
    tensors = [t.to(DEVICE) for t in tensors]
    flags = nonfinite.finite_flags(tensors)
    assert flags.tolist() == [True, False, False, True, False, False, True, True, False, False]


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="Policy.on_nonfinite must be 'raise', 'skip' or None"):
        lc.Policy(on_nonfinite="ignore")


def poisoned_worker(rank, world, name, mode):
    """Rank 1's second batch holds a NaN; every rank then runs 4 more steps."""
    model, opt, step = _compile(name, mode)
    outcomes = []
    for k, (x, y) in enumerate(_batches() * 2):
        if rank == 1 and k == 1:
            x = x.clone()
            x[0, 0] = float("nan")
        try:
            step(x, y)
            outcomes.append("ok")
        except lc.NonFiniteError:
            outcomes.append("raised")
            break
        except lc.CollectiveError:
            outcomes.append("collective error")
            break
    return outcomes, step.backend.runtime.step, _snapshot(model, step)[0]


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["ddp", "low_rank_ddp"])
def test_two_workers_skip_a_bad_step_together(name):
    results = run_workers(poisoned_worker, 2, args=(name, "skip"), timeout=120,
                          pg_timeout=datetime.timedelta(seconds=20))
    (outcomes0, steps0, params0), (outcomes1, steps1, params1) = results
    assert outcomes0 == outcomes1 == ["ok"] * 8
    assert steps0 == steps1 == 7
    assert all(torch.equal(a, b) for a, b in zip(params0, params1))


def _poisoned_run(rank, name, bad_step):
    """Rank 1's batch at `bad_step` holds a NaN; every call is checked against the state before it."""
    torch._dynamo.reset()
    model, opt, step = _compile(name, "raise")
    warned, batches = [], _batches() * 2
    for k, (x, y) in enumerate(batches):
        if rank == 1 and k == bad_step:
            x = x.clone()
            x[0, 0] = float("nan")
        before, state = _snapshot(model, step)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step(x, y)
            warned += [(k, str(w.message)) for w in caught if "not finite" in str(w.message)]
        except lc.NonFiniteError as error:
            after, state_after = _snapshot(model, step)
            # A payload received (overlapped sync) may hold the NaN the step raised on.
            unchanged = all(torch.equal(a, b) for a, b in zip(before, after)) and all(
                torch.equal(t, state_after["runtime"]["tensors"][key]) or torch.equal(
                    t.nan_to_num(), state_after["runtime"]["tensors"][key].nan_to_num())
                for key, t in state["runtime"]["tensors"].items() if not key.startswith("nonfinite."))
            return {"raised_at": k, "message": str(error), "unchanged": unchanged, "warned": warned}
    return {"raised_at": None, "warned": warned}


LOCAL_STEPS = ["local_sgd", "diloco", "lordo", "overlapped_diloco", "overlapped_lordo"]
# With sync every 2 steps, step 2 is a local step and step 3 a sync for all of them (overlapped:
# step 2 merges step 1's average, and step 3's payload is merged, and found bad, after step 4).
BAD_STEPS = {"local": 2, "sync": 3}
RAISED_AT = {"overlapped_diloco": (4, "merge"), "overlapped_lordo": (4, "merge")}


def local_steps_worker(rank, world):
    runs = {(name, where): _poisoned_run(rank, name, bad_step)
            for name in LOCAL_STEPS for where, bad_step in BAD_STEPS.items()}
    return runs, {name: skip_refused_worker(rank, world, name) for name in LOCAL_STEPS}


@pytest.fixture(scope="module")
def local_steps_runs():
    return run_workers(local_steps_worker, 2, timeout=600, pg_timeout=datetime.timedelta(seconds=20))


@pytest.mark.distributed
@pytest.mark.parametrize("name", LOCAL_STEPS)
@pytest.mark.parametrize("where", list(BAD_STEPS))
def test_no_worker_receives_anothers_nonfinite_values(local_steps_runs, name, where):
    first, second = (runs[(name, where)] for runs, _ in local_steps_runs)
    # Both stop where the sync's payload is received, with one message, before applying it.
    step, graph = RAISED_AT.get(name, (3, "sync"))
    assert first["raised_at"] == second["raised_at"] == step
    assert first["message"] == second["message"]
    assert f"step {step} (graph '{graph}'): the payload received at the sync is not finite" in first["message"]
    assert first["unchanged"] and second["unchanged"]
    assert first["warned"] == []
    if where == "local":
        assert [k for k, _ in second["warned"]] == [2]
        assert "the loss is not finite on this worker; the step was not applied here" in second["warned"][0][1]


@pytest.mark.distributed
@pytest.mark.parametrize("name", LOCAL_STEPS)
def test_skip_is_refused_with_local_steps(local_steps_runs, name):
    for _, refusals in local_steps_runs:
        assert "on_nonfinite='skip' cannot be used with local steps between syncs" in refusals[name]


def skip_refused_worker(rank, world, name):
    torch._dynamo.reset()
    try:
        _compile(name, "skip")[2](*_batches()[0])
    except ValueError as error:
        return str(error)
    return "not refused"


def test_a_finite_loss_with_a_non_finite_gradient_names_that_gradient():
    model = _model()
    # sqrt at 0: a finite value with an infinite slope, so only gate's gradient is bad.
    model.register_parameter("gate", nn.Parameter(torch.zeros(())))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y) + model.gate.sqrt(), opt), lc.Policy(),
                      compiler="eager")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(lc.NonFiniteError, match=r"step 0 \(graph '\w+'\): the gradient of gate is not finite"):
        step(*_batches()[0])
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
