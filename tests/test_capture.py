"""What capture produces: one graph, one canonical update per parameter, a role on every node."""

import operator
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import lordo_compile as lc
from common import assert_close, mlp_problem, named_parameters, train
from lordo_compile.graph import PARAM, ROLE, STATE, Role
from lordo_compile.models import MLP
from lordo_compile.testing import training_step


def _captured(step):
    return step.graphs["step"]["captured"].train_graph


def test_autograd_grad_form_is_captured_like_backward():
    """`torch.autograd.grad` plus `.grad` assignment is the same step as `loss.backward()`."""

    def make(model):
        return torch.optim.Adam(model.parameters(), lr=1e-2)

    model, loss_fn, batches = mlp_problem()
    opt = make(model)
    params = list(model.parameters())

    def train_step(x, y):
        loss = loss_fn(x, y)
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        opt.zero_grad()
        return loss

    step = lc.compile(train_step, lc.Policy(), compiler="aot_eager")
    for x, y in batches:
        step(x, y)
    reference, *_ = train(mlp_problem, make)
    assert_close(named_parameters(model), reference)
    graph = _captured(step)
    assert [u.op.qualified_name for u in graph.updates()] == ["lordo.adam"] * len(params)


def test_update_nodes_have_explicit_inputs_and_outputs():
    torch.manual_seed(0)
    model = MLP((8, 16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    train_step = training_step(lambda x, y: F.mse_loss(model(x), y), opt)

    step = lc.compile(train_step, lc.Policy(), compiler="eager")
    step(torch.randn(4, 8), torch.randn(4, 2))
    graph = _captured(step)
    for site in graph.updates():
        assert site.input("param").meta[ROLE] == Role.PARAMETER
        assert site.input("grad").meta[ROLE] == Role.GRADIENT
        assert site.input("grad").meta[PARAM] == site.param
        buffer = site.input("momentum_buffer")
        assert buffer.meta[ROLE] == Role.OPTIMIZER_STATE and buffer.meta[STATE] == "momentum_buffer"
        assert site.input("lr").meta[ROLE] == Role.HYPERPARAMETER
        outputs = site.outputs()
        assert set(outputs) == {"param", "momentum_buffer"}
        writes = {u.args[0]: u for out in outputs.values() for u in out.users if u.meta[ROLE] == Role.WRITEBACK}
        assert set(writes) == {site.input("param"), buffer}
    # One graph, every node classified by what it computes: roles.py gives whatever it cannot
    # place Role.OTHER, so OTHER must hold only the grad-mode switches dynamo records around
    # backward and the optimizer step.
    assert Counter(n.meta[ROLE] for n in graph.nodes()) == {
        Role.PARAMETER: 4, Role.BATCH_INPUT: 2, Role.OPTIMIZER_STATE: 4,  # a momentum buffer each
        Role.HYPERPARAMETER: 1 + 4,  # the group's tuple, then lr, momentum, dampening, weight_decay
        Role.FORWARD: 3, Role.LOSS: 1, Role.BACKWARD: 1, Role.GRADIENT: 4,
        Role.OPTIMIZER_UPDATE: 4 * 3,  # lordo.sgd and its param and momentum_buffer outputs
        Role.WRITEBACK: 4 * 2, Role.OUTPUT: 2,  # the returned loss's detach and the output node
        Role.OTHER: 2,
    }
    assert [n.target for n in graph.nodes(Role.FORWARD)] == [F.linear, F.relu, F.linear]
    assert {n.target for n in graph.nodes(Role.OTHER)} == {torch._C._set_grad_enabled}


def test_sgd_without_momentum_has_a_single_output():
    torch.manual_seed(0)
    model = MLP((8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    train_step = training_step(lambda x, y: F.mse_loss(model(x), y), opt)

    step = lc.compile(train_step, lc.Policy(), compiler="eager")
    step(torch.randn(4, 8), torch.randn(4, 2))
    for site in _captured(step).updates():
        assert site.outputs() == {"param": site.node}
        assert not any(u.target is operator.getitem for u in site.node.users)


def test_step_that_keeps_gradients_returns_them_to_grad():
    """Without zero_grad the step leaves `.grad` set, as eager does."""
    torch.manual_seed(0)
    model = MLP((8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def train_step(x, y):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    step = lc.compile(train_step, lc.Policy(), compiler="aot_eager")
    x, y = torch.randn(4, 8), torch.randn(4, 2)
    step(x, y)
    assert all(p.grad is not None for p in model.parameters())
    grads = [p.grad.clone() for p in model.parameters()]
    opt.zero_grad()
    step(x, y)
    assert not any(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))


@pytest.mark.parametrize("loss_arg", ["positional", "keyword"])
def test_batch_inputs_are_named_after_the_step_arguments(loss_arg):
    torch.manual_seed(0)
    model = MLP((8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def train_step(inputs, targets):
        loss = F.mse_loss(model(inputs), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    step = lc.compile(train_step, lc.Policy(), compiler="eager")
    x, y = torch.randn(4, 8), torch.randn(4, 2)
    step(x, y) if loss_arg == "positional" else step(x, targets=y)
    names = {n.name for n in _captured(step).nodes(Role.BATCH_INPUT)}
    assert names == {"inputs", "targets"}


def test_in_place_gradient_work_is_captured_as_data_flow():
    """Clipping (foreach, in place) then scaling: the update must read the final values."""

    def make(model):
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def run(compiled):
        model, loss_fn, batches = mlp_problem()
        opt = make(model)

        def train_step(x, y):
            loss = loss_fn(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            for p in model.parameters():
                p.grad *= 0.5
            opt.step()
            opt.zero_grad()
            return loss

        step = lc.compile(train_step, lc.Policy(), compiler="aot_eager") if compiled else train_step
        for x, y in batches:
            step(x, y)
        return named_parameters(model), step

    reference, _ = run(False)
    params, step = run(True)
    assert_close(params, reference)
    graph = _captured(step)
    for site in graph.updates():
        grad = site.input("grad")
        assert grad.meta[ROLE] == Role.GRADIENT and grad.name != f"grad_{site.param.replace('.', '_')}"
    assert not [n for n in graph.nodes() if n.op == "call_method" and str(n.target).endswith("_")
                and n.meta[ROLE] == Role.GRADIENT]
