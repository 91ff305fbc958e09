"""LR schedulers change param_groups between steps: honoured, with no recompile, whether
stepped after the compiled step or inside it."""

import types

import pytest
import torch

import lordo_compile as lc
from common import assert_close, gpt_problem, mlp_problem, named_parameters, train


def test_step_lr_takes_effect_without_recompiling():
    make = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)  # noqa: E731
    schedule = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)  # noqa: E731
    reference, *_ = train(mlp_problem, make, make_scheduler=schedule)
    params, opt, step, _ = train(mlp_problem, make, make_scheduler=schedule, compiler="aot_eager")
    assert opt.param_groups[0]["lr"] < 1e-3  # the schedule did run
    assert_close(params, reference)
    assert step.captures == 1


def test_one_cycle_cycles_lr_and_momentum_without_recompiling():
    make = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True)  # noqa: E731
    schedule = lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)  # noqa: E731
    reference, *_ = train(gpt_problem, make, make_scheduler=schedule)
    params, _, step, _ = train(gpt_problem, make, make_scheduler=schedule, compiler="aot_eager")
    assert_close(params, reference)
    assert step.captures == 1


def test_adam_betas_follow_one_cycle():
    make = lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)  # noqa: E731
    schedule = lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=20)  # noqa: E731
    reference, *_ = train(mlp_problem, make, make_scheduler=schedule)
    params, _, step, _ = train(mlp_problem, make, make_scheduler=schedule, compiler="aot_eager")
    assert_close(params, reference)
    assert step.captures == 1


def test_switching_momentum_on_recaptures_and_stays_exact():
    """Momentum on/off changes the graph's structure: lc.compile captures again."""

    def make(model):
        return torch.optim.SGD(model.parameters(), lr=0.05)

    def flip(opt):
        class Flip:
            count = 0

            def step(self):
                Flip.count += 1
                if Flip.count == 5:
                    opt.param_groups[0]["momentum"] = 0.9

        return Flip()

    reference, *_ = train(mlp_problem, make, make_scheduler=flip)
    params, _, step, _ = train(mlp_problem, make, make_scheduler=flip, compiler="aot_eager")
    assert_close(params, reference)
    assert step.captures == 2


def _train_with_scheduler_inside(problem, make_opt, make_scheduler, compiled: bool, steps: int = 12,
                                 as_argument: bool = False):
    """`scheduler.step()` inside the step, as many users write it: the step reaches the
    scheduler through its closure, or takes it as an argument."""
    model, loss_fn, batches = problem()
    opt = make_opt(model)
    scheduler = make_scheduler(opt)

    def step_with(x, y, scheduler):
        loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()
        return loss

    def train_step(x, y):
        return step_with(x, y, scheduler)

    step = step_with if as_argument else train_step
    step = lc.compile(step, compiler="aot_eager") if compiled else step
    hyperparameters = []
    for i in range(steps):
        step(*batches[i % len(batches)], *([scheduler] if as_argument else []))
        hyperparameters.append([{k: g[k] for k in ("lr", "momentum", "betas") if k in g} for g in opt.param_groups])
    return named_parameters(model), hyperparameters, scheduler, step


@pytest.mark.parametrize("problem, make_opt, make_scheduler", [
    (mlp_problem, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
     lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)),
    (gpt_problem, lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True),
     lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=12)),
    (mlp_problem, lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
     lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=12)),
    (mlp_problem, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
     lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.8 ** epoch)),
], ids=["StepLR-AdamW", "OneCycleLR-SGD", "OneCycleLR-Adam-betas", "LambdaLR-SGD"])
def test_scheduler_stepped_inside_the_step_equals_eager(problem, make_opt, make_scheduler):
    reference, reference_hyperparameters, reference_scheduler, _ = _train_with_scheduler_inside(
        problem, make_opt, make_scheduler, compiled=False)
    params, hyperparameters, scheduler, step = _train_with_scheduler_inside(
        problem, make_opt, make_scheduler, compiled=True)
    assert step.captures == 1
    assert_close(params, reference)
    assert hyperparameters == reference_hyperparameters  # after every call, the final lr among them
    assert hyperparameters[0] != hyperparameters[-1]
    assert scheduler.state_dict().keys() == reference_scheduler.state_dict().keys()
    assert f"after each call, eagerly: {type(reference_scheduler).__name__}.step()" in step.explain()


def test_a_scheduler_passed_as_an_argument_is_stepped_after_the_call():
    make_opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    make_scheduler = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)  # noqa: E731
    reference, reference_hyperparameters, *_ = _train_with_scheduler_inside(
        mlp_problem, make_opt, make_scheduler, compiled=False, steps=5, as_argument=True)
    params, hyperparameters, _, step = _train_with_scheduler_inside(
        mlp_problem, make_opt, make_scheduler, compiled=True, steps=5, as_argument=True)
    assert step.captures == 1
    assert hyperparameters == reference_hyperparameters
    assert_close(params, reference)


def test_a_metric_from_the_step_names_the_scheduler_and_the_fix():
    model, loss_fn, batches = mlp_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)

    def train_step(x, y):
        loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        plateau.step(loss)
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(lc.CaptureError, match=r"test_schedulers.py:\d+ \(`plateau.step\(loss\)`\): "
                       r"ReduceLROnPlateau.step\(\) is called inside the step with a value computed in the step.*"
                       r"Return the value from the step and call ReduceLROnPlateau.step\(value\) after it"):
        lc.compile(train_step, compiler="aot_eager")(*batches[0])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_scheduler_stepped_before_the_optimizer_is_refused():
    model, loss_fn, batches = mlp_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def train_step(x, y):
        loss = loss_fn(x, y)
        loss.backward()
        scheduler.step()
        opt.step()
        opt.zero_grad()
        return loss

    with pytest.raises(lc.CaptureError, match=r"`scheduler.step\(\)`\): StepLR.step\(\) is called inside the step "
                       r"before any optimizer.step\(\).*Call StepLR.step\(\) after optimizer.step\(\)"):
        lc.compile(train_step, compiler="aot_eager")(*batches[0])


def test_a_scheduler_the_step_does_not_reach_says_where_to_keep_it():
    model, loss_fn, batches = mlp_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    holder = types.SimpleNamespace()

    def train_step(x, y):
        loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        holder.scheduler.step()
        return loss

    step = lc.compile(train_step, compiler="aot_eager")
    holder.scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    with pytest.raises(lc.CaptureError, match=r"holder.scheduler.step\(\).*create this one before "
                       r"lordo_compile.compile\(\), or step it after the call"):
        step(*batches[0])
