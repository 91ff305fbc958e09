"""The torch.compile entry points: backend=lc.backend(policy) and backend="lordo"."""

import torch
import torch.nn.functional as F

import lordo_compile as lc
from common import assert_close, mlp_problem, named_parameters, train


def _run_with_torch_compile(make_backend):
    model, loss_fn, batches = mlp_problem()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    backend = make_backend(opt)

    def train_step(x, y):
        loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    step = torch.compile(train_step, backend=backend, fullgraph=True)
    for x, y in batches:
        step(x, y)
    return named_parameters(model), backend


def test_backend_object_finds_optimizer_in_callers_frame():
    def make(opt):
        return lc.backend(lc.Policy(), compiler="aot_eager")

    params, backend = _run_with_torch_compile(make)
    reference, *_ = train(mlp_problem, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1))
    assert_close(params, reference)
    assert backend.captures == 1
    assert list(backend.graphs["step"]) == ["captured", "on_nonfinite", "lowered", "aten"]  # the check is on by default
    assert "lordo.adamw" in backend.explain()


def test_registered_lordo_backend_name():
    model, loss_fn, batches = mlp_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    lc.prepare(opt)

    def train_step(x, y):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    step = torch.compile(train_step, backend="lordo", fullgraph=True, options={"compiler": "aot_eager"})
    for x, y in batches:
        step(x, y)
    reference, *_ = train(mlp_problem, lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9))
    assert_close(named_parameters(model), reference)
