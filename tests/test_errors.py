"""Every way a user can get it wrong gives a clear exception; nothing falls back to eager."""

import os
import re

import pytest
import torch
import torch.nn.functional as F

import lordo_compile as lc
from lordo_compile.models import MLP
from lordo_compile.testing import training_step


def _problem(make_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)):
    torch.manual_seed(0)
    model = MLP((8, 16, 2))
    return model, make_optimizer(model), torch.randn(4, 8), torch.randn(4, 2)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda m: torch.optim.RMSprop(m.parameters()), "RMSprop"),
        (lambda m: torch.optim.LBFGS(m.parameters()), "LBFGS"),
    ],
)
def test_unrecognised_optimizer_names_class_and_supported_ones(make, name):
    model, opt, x, y = _problem(make)

    def train_step(x, y):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    with pytest.raises(NotImplementedError, match=rf"{name}.*torch\.optim\.SGD, torch\.optim\.Adam, torch\.optim\.AdamW"):
        lc.compile(train_step, lc.Policy())


def test_custom_optimizer_subclass_is_refused():
    class MyAdam(torch.optim.Adam):
        pass

    model, opt, x, y = _problem(lambda m: MyAdam(m.parameters()))
    with pytest.raises(NotImplementedError, match="MyAdam"):
        lc.prepare(opt)


def test_unsupported_flags_are_named():
    model = MLP((8, 16, 2))
    with pytest.raises(NotImplementedError, match=r"param_groups\[0\] has amsgrad=True"):
        lc.prepare(torch.optim.Adam(model.parameters(), amsgrad=True))
    with pytest.raises(NotImplementedError, match="differentiable=True"):
        lc.prepare(torch.optim.SGD(model.parameters(), lr=0.1, differentiable=True))


def test_graph_break_names_line_and_reason():
    model, opt, x, y = _problem()

    def train_step(x, y):
        loss = F.mse_loss(model(x), y)
        print("loss", loss)
        loss.backward()
        opt.step()
        return loss

    step = lc.compile(train_step, lc.Policy(), compiler="aot_eager")
    line = train_step.__code__.co_firstlineno + 2
    with pytest.raises(lc.CaptureError, match=rf"test_errors.py:{line}.*print"):
        step(x, y)


def test_item_inside_step_is_refused_with_its_line():
    model, opt, x, y = _problem()

    def train_step(x, y):
        loss = F.mse_loss(model(x), y)
        if loss.item() > 1e9:
            return loss
        loss.backward()
        opt.step()
        return loss

    step = lc.compile(train_step, lc.Policy(), compiler="aot_eager")
    with pytest.raises(lc.CaptureError) as raised:
        step(x, y)
    line = train_step.__code__.co_firstlineno + 2
    assert f"test_errors.py:{line}" in str(raised.value)
    assert re.search(r"host|item", str(raised.value))


def test_step_without_backward_is_refused():
    model, opt, x, y = _problem()

    def train_step(x, y):
        loss = F.mse_loss(model(x), y)
        opt.step()
        return loss

    step = lc.compile(train_step, lc.Policy(), compiler="aot_eager")
    with pytest.raises(lc.CaptureError, match=r"never calls loss\.backward\(\)"):
        step(x, y)


def test_step_without_optimizer_is_refused():
    model, _, x, y = _problem()

    def train_step(x, y):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="optimizers=\\[opt\\]"):
        lc.compile(train_step, lc.Policy())


def test_manual_update_without_optimizer_is_refused():
    model, opt, x, y = _problem()

    def train_step(x, y):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
                p.grad = None
        return loss

    step = lc.compile(train_step, lc.Policy(), optimizers=[opt], compiler="aot_eager")
    with pytest.raises(lc.CaptureError, match="no optimizer update was captured"):
        step(x, y)


def test_bad_arguments():
    model, opt, x, y = _problem()
    with pytest.raises(ValueError, match="compiler must be one of"):
        lc.compile(lambda x: x, lc.Policy(), optimizers=[opt], compiler="tvm")
    with pytest.raises(TypeError, match="lordo_compile.Policy"):
        lc.backend({"rank": 4}, optimizers=[opt])
    with pytest.raises(ValueError, match="extra_passes"):
        lc.Policy(extra_passes="identity")
    with pytest.raises(ValueError, match="mode must be one of .*'max-autotune'.*got 'fast'"):
        lc.compile(lambda x: x, lc.Policy(), optimizers=[opt], mode="fast")
    with pytest.raises(ValueError, match="mode='max-autotune' chooses Inductor's options, but compiler='aot_eager'"):
        lc.compile(lambda x: x, lc.Policy(), optimizers=[opt], compiler="aot_eager", mode="max-autotune")


def test_deterministic_on_cuda_sets_or_requires_cublas_workspace(monkeypatch):
    # No GPU is needed: the rule is read before anything runs on the device.
    from lordo_compile.lowering import require_deterministic_cublas

    assert require_deterministic_cublas(torch.device("cpu")) is None
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert "set CUBLAS_WORKSPACE_CONFIG=:4096:8" in require_deterministic_cublas(torch.device("cuda", 0))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    assert require_deterministic_cublas(torch.device("cuda", 0)) is None
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(ValueError, match="CUBLAS_WORKSPACE_CONFIG set to one of .* but it is ':0:0'.*deterministic=False"):
        require_deterministic_cublas(torch.device("cuda", 0))


def test_unknown_extra_pass_is_named():
    model, opt, x, y = _problem()
    train_step = training_step(lambda x, y: F.mse_loss(model(x), y), opt)
    with pytest.raises(ValueError, match="'no_such_pass', which is not registered"):
        lc.compile(train_step, lc.Policy(extra_passes=("no_such_pass",)), compiler="aot_eager")


def test_structure_change_under_torch_compile_raises():
    model, opt, x, y = _problem(lambda m: torch.optim.SGD(m.parameters(), lr=0.1))

    def train_step(x, y):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    step = torch.compile(train_step, backend=lc.backend(lc.Policy(), compiler="aot_eager"), fullgraph=True)
    step(x, y)
    opt.param_groups[0]["momentum"] = 0.9
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"param_groups\[0\] changed structure.*torch._dynamo.reset\(\)"):
        step(x, y)
    for before, p in zip(weights, model.parameters()):
        assert torch.equal(before, p)
