"""LR schedulers change param_groups between steps: honoured, with no recompile."""

import torch

from common import gpt_problem, max_rel_diff, mlp_problem, train


def test_step_lr_takes_effect_without_recompiling():
    make = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)  # noqa: E731
    schedule = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)  # noqa: E731
    reference, *_ = train(mlp_problem, make, make_scheduler=schedule)
    params, opt, step, _ = train(mlp_problem, make, make_scheduler=schedule, compiler="aot_eager")
    assert opt.param_groups[0]["lr"] < 1e-3  # the schedule did run
    assert max_rel_diff(reference, params) <= 1e-5
    assert step.captures == 1


def test_one_cycle_cycles_lr_and_momentum_without_recompiling():
    make = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True)  # noqa: E731
    schedule = lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)  # noqa: E731
    reference, *_ = train(gpt_problem, make, make_scheduler=schedule)
    params, _, step, _ = train(gpt_problem, make, make_scheduler=schedule, compiler="aot_eager")
    assert max_rel_diff(reference, params) <= 1e-5
    assert step.captures == 1


def test_adam_betas_follow_one_cycle():
    make = lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)  # noqa: E731
    schedule = lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=20)  # noqa: E731
    reference, *_ = train(mlp_problem, make, make_scheduler=schedule)
    params, _, step, _ = train(mlp_problem, make, make_scheduler=schedule, compiler="aot_eager")
    assert max_rel_diff(reference, params) <= 1e-5
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
    assert max_rel_diff(reference, params) <= 1e-5
    assert step.captures == 2
