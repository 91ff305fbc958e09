"""Order follows from stages: a user pass is guarded whatever its name, and a pass that
returns a replaced Program keeps what other passes set up (ECO's stored weights, the guard)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lordo_compile as lc
from common import assert_close, named_parameters
from lordo_compile.graph import Role, StateSpec, tag
from lordo_compile.passes import Lowering, PassResult, PassRuntime, Program, Stage, register_pass
from lordo_compile.testing import training_step


@dataclass(frozen=True)
class CountUpdates:
    """Counts applied steps in a state tensor (a write of its own at stage UPDATE)."""


@register_pass("zzzz_count_updates", stage=Stage.UPDATE, option_type=CountUpdates)
def zzzz_count_updates(program: Program, option: CountUpdates) -> PassResult:
    graph = program.graph
    g = graph.graph
    counter = graph.add_state(StateSpec(name="zzzz.updates", shape=(), dtype=torch.int64, owner="zzzz_count_updates"))
    with g.inserting_before(next(n for n in reversed(g.nodes) if n.op == "output")):
        more = g.call_function(torch.ops.aten.add.Scalar, (counter, 1))
        tag(g.call_method("copy_", (counter, more)), Role.WRITEBACK, state="zzzz.updates", name="count_update")
    return PassResult(program, ("counts applied updates",))


@dataclass(frozen=True)
class CopyAfterStorage:
    """Replaces the program's graph by a copy at stage SYNC, after ECO's WEIGHT_STORAGE."""


@register_pass("copy_after_storage", stage=Stage.SYNC, option_type=CopyAfterStorage)
def copy_after_storage(program: Program, option: CopyAfterStorage) -> PassResult:
    return PassResult(dataclasses.replace(program, graph=program.graph.copy()), ("copied",))


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 8, generator=generator), torch.randn(4, 4, generator=generator)) for _ in range(6)]
    return model, batches


def _step(model, policy, optimizer=torch.optim.AdamW):
    opt = optimizer(model.parameters(), lr=1e-2)
    return lc.compile(training_step(lambda x, y: F.mse_loss(model(x), y), opt), policy, compiler="aot_eager")


def test_a_user_pass_whose_name_sorts_last_runs_before_the_guard_and_its_writes_are_guarded():
    model, batches = _problem()
    step = _step(model, lc.Policy(extra_passes=[CountUpdates()]))
    for x, y in batches[:3]:
        step(x, y)
    assert list(step.graphs["step"])[:3] == ["captured", "zzzz_count_updates", "on_nonfinite"]
    assert int(step.backend.runtime.tensors["zzzz.updates"]) == 3
    bad = batches[3][0].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(lc.NonFiniteError):
        step(bad, batches[3][1])
    assert int(step.backend.runtime.tensors["zzzz.updates"]) == 3


def test_a_pass_after_eco_that_replaces_the_program_keeps_stored_weights_and_the_guard():
    policy = lc.Policy.eco(format="int8")
    reference, batches = _problem()
    plain = _step(reference, policy)
    model, _ = _problem()
    step = _step(model, dataclasses.replace(policy, extra_passes=(CopyAfterStorage(),)))
    for x, y in batches[:4]:
        plain(x, y)
        step(x, y)
    assert model[0].weight.untyped_storage().nbytes() == 0  # held as codes only between steps
    with step.materialized(), plain.materialized():
        assert_close(named_parameters(model), named_parameters(reference), rtol=0, atol=0)
    before = {k: v.clone() for k, v in step.backend.runtime.tensors.items() if k.startswith("eco.")}
    bad = batches[4][0].clone()
    bad[0, 0] = float("inf")
    with pytest.raises(lc.NonFiniteError):
        step(bad, batches[4][1])
    assert all(torch.equal(before[k], step.backend.runtime.tensors[k]) for k in before)


def test_rewrites_run_in_stage_order_whatever_the_policy_lists():
    model, batches = _problem()
    policy = lc.Policy(eco=lc.ECO(format="int8"), fake_quant=lc.FakeQuant(correction=lc.CAGE(total_steps=10)),
                       ema_nesterov=lc.EMANesterov(), low_rank=lc.LowRank(rank=2, update_proj_gap=2))
    step = _step(model, policy)
    step(*batches[0])
    assert list(step.graphs["refresh"])[:-1] == [
        "captured", "fake_quant", "low_rank", "fake_quant:update", "ema_nesterov", "eco", "on_nonfinite", "lowered"]


def test_register_pass_with_after_says_what_replaced_it():
    with pytest.raises(TypeError, match=r"after=\.\.\.\) was replaced by stage="):
        register_pass("old_style", stage=Stage.UPDATE, after=("low_rank",))


@dataclass(frozen=True)
class AskInductor:
    """Asks Inductor's `reorder_for_peak_memory` to be `reorder` for every graph."""

    reorder: bool


class AskingRuntime(PassRuntime):
    def lowering(self, graph):
        return Lowering(inductor_config={"reorder_for_peak_memory": self.option.reorder})


def _identity(program: Program, option: AskInductor) -> PassResult:
    return PassResult(program, ("asks Inductor",))


@dataclass(frozen=True)
class AskInductorToo:
    """The same ask from a second pass."""

    reorder: bool


register_pass("ask_inductor", stage=Stage.UPDATE, option_type=AskInductor, runtime=AskingRuntime)(_identity)
register_pass("ask_inductor_too", stage=Stage.UPDATE, option_type=AskInductorToo, runtime=AskingRuntime)(_identity)


def test_two_passes_that_set_one_inductor_option_apart_are_refused_at_capture():
    model, batches = _problem()
    step = _step(model, lc.Policy(extra_passes=[AskInductor(True), AskInductorToo(False)]))
    with pytest.raises(ValueError, match=r"passes 'ask_inductor' and 'ask_inductor_too' set Inductor's config "
                                         r"'reorder_for_peak_memory' to True and False.*enable only one of them"):
        step(*batches[0])
    model, batches = _problem()
    agreeing = _step(model, lc.Policy(extra_passes=[AskInductor(False), AskInductorToo(False)]))
    agreeing(*batches[0])


@dataclass(frozen=True)
class AskInductorMore(AskInductor):
    """A subclass of one pass's options registered as another's."""


register_pass("ask_inductor_more", stage=Stage.UPDATE, option_type=AskInductorMore)(_identity)


def test_a_pass_given_twice_is_refused_and_a_subclass_of_options_runs_its_own_pass():
    model, batches = _problem()
    with pytest.raises(ValueError, match=r"enables pass 'ask_inductor' twice \(in Policy.extra_passes and again"):
        _step(model, lc.Policy(extra_passes=[AskInductor(True), AskInductor(False)]))(*batches[0])
    with pytest.raises(ValueError, match=r"enables pass 'low_rank' twice \(in Policy.low_rank and again"):
        _step(model, dataclasses.replace(lc.Policy.galore(rank=4), extra_passes=("low_rank",)))(*batches[0])
    step = _step(model, lc.Policy(extra_passes=[AskInductorMore(False)]))
    step(*batches[0])
    assert "ask_inductor_more" in step.graphs["step"] and "ask_inductor" not in step.graphs["step"]
