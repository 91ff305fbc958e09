"""Helpers for testing passes, ours and users': capture a step, print a stage stably.

    step = capture(train_step, x, y, policy=Policy(extra_passes=("my_pass",)))
    self.assertExpectedInline(stage_text(step, "my_pass"), '''...''')

`EXPECTTEST_ACCEPT=1 pytest ...` writes the current text into the test for review.
Compile with Inductor inside `fresh_inductor_cache()` when a test inspects generated code.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from typing import Callable, Sequence

import torch

from .api import CompiledStep, compile
from .policy import Policy


def capture(
    step: Callable,
    *example_args,
    policy: Policy | None = None,
    optimizers: Sequence[torch.optim.Optimizer] | None = None,
) -> CompiledStep:
    """Compile `step` without code generation and run it once on `example_args`."""
    compiled = compile(step, policy or Policy(), optimizers=optimizers, compiler="eager")
    compiled(*example_args)
    return compiled


@contextlib.contextmanager
def fresh_inductor_cache():
    """Inductor compiles from scratch inside (its caches in a new temporary directory):
    a cache hit would skip code generation, and with it every custom pass a test inspects."""
    from torch._inductor.utils import fresh_cache

    with fresh_cache():
        yield


def _unchanged(graph) -> None:
    return None


def _projects_nothing(aten, inputs: int, positions: list[int]) -> int:
    return 0


# The lowering's choices for Inductor: each a name in `lordo_compile.lowering`, and what stands
# in for it when it is turned off.
LOWERING_CHOICES = {"write_inputs_when_computed": _unchanged, "compute_scalars_once": _unchanged,
                    "INDUCTOR_CONFIG": {}, "CPU_KERNEL_GROUP_ARGS": None,
                    "dtype_rules_built_once": contextlib.nullcontext}
# Aten rewrites passes ask of code generation (any compiler): each a name in a module of
# `lordo_compile.passes`, and what stands in for it when it is turned off.
PASS_LOWERING_CHOICES = {"project_from_factors": ("projection", _projects_nothing)}


@contextlib.contextmanager
def lowering_without(*choices: str):
    """Inside, steps compiled are lowered without the named `LOWERING_CHOICES` (Inductor) or
    `PASS_LOWERING_CHOICES`: an ablation for tests and benchmarks, not an option users have.
    A pass's choice is read when a step is captured: capture inside too."""
    import importlib

    from . import lowering

    unknown = sorted(set(choices) - set(LOWERING_CHOICES) - set(PASS_LOWERING_CHOICES))
    if unknown:
        raise ValueError(f"unknown lowering choices {unknown}; choose from "
                         f"{sorted([*LOWERING_CHOICES, *PASS_LOWERING_CHOICES])}")
    homes = {name: (lowering, LOWERING_CHOICES[name]) if name in LOWERING_CHOICES else
             (importlib.import_module(f"{__package__}.passes.{PASS_LOWERING_CHOICES[name][0]}"),
              PASS_LOWERING_CHOICES[name][1]) for name in choices}
    saved = {name: getattr(module, name) for name, (module, _) in homes.items()}
    for name, (module, stand_in) in homes.items():
        setattr(module, name, stand_in)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(homes[name][0], name, value)


@contextlib.contextmanager
def counting_scheduler_nodes(counts: list[int]):
    """Inside, each graph Inductor schedules appends to `counts` the number of nodes its
    scheduler starts from (one per buffer to compute, before fusion)."""
    from torch._inductor import scheduler

    init = scheduler.Scheduler._init

    def counting(self, nodes):
        counts.append(len(nodes))
        return init(self, nodes)

    scheduler.Scheduler._init = counting
    try:
        yield
    finally:
        scheduler.Scheduler._init = init


def stage_text(step: CompiledStep, stage: str = "captured", events: str = "step") -> str:
    """The stable text of one stage of the graph for `events` ("step": a step with no event;
    else the event names joined by "+", e.g. "refresh+sync"), without the title line."""
    return step.graphs[events][stage].body


def stage_diff(step: CompiledStep, before: str, after: str, events: str = "step") -> str:
    return step.graphs[events].diff(before, after)


def training_step(loss_fn: Callable, optimizer: torch.optim.Optimizer) -> Callable:
    """The ordinary step users write: loss, backward, step, zero_grad, return the loss."""

    def train_step(x, y):
        loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return train_step


def galore_torch_adamw() -> type:
    """galore-torch's `GaLoreAdamW` (galore_torch.adamw.AdamW), the reference GaLore is tested
    and timed against, loaded without the package's __init__, which imports bitsandbytes
    (not a dependency here) for its 8-bit optimizer."""
    if "galore_torch" not in sys.modules:
        spec = importlib.util.find_spec("galore_torch")
        if spec is None:
            raise ImportError("galore-torch is not installed: scripts/setup.sh installs it with --no-deps")
        sys.modules["galore_torch"] = importlib.util.module_from_spec(spec)
    return importlib.import_module("galore_torch.adamw").AdamW
