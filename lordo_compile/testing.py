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


# The lowering's choices for Inductor, and the aten rewrites passes ask of code generation (under
# any compiler): each a name in a module of this package, and what stands in for it when it is
# turned off.
LOWERING_CHOICES = {
    "write_inputs_when_computed": ("lowering", _unchanged), "compute_scalars_once": ("lowering", _unchanged),
    "INDUCTOR_CONFIG": ("lowering", {}), "CPU_KERNEL_GROUP_ARGS": ("lowering", None),
    "dtype_rules_built_once": ("lowering", contextlib.nullcontext),
    "project_from_factors": ("passes.projection", _projects_nothing),
}


@contextlib.contextmanager
def lowering_without(*choices: str):
    """Inside, steps are lowered without the named `LOWERING_CHOICES`: an ablation for tests and
    benchmarks, not an option users have. A pass's rewrite is taken when a step is captured:
    capture inside too."""
    unknown = sorted(set(choices) - set(LOWERING_CHOICES))
    if unknown:
        raise ValueError(f"unknown lowering choices {unknown}; choose from {sorted(LOWERING_CHOICES)}")
    homes = {name: importlib.import_module(f"{__package__}.{LOWERING_CHOICES[name][0]}") for name in choices}
    saved = {name: getattr(home, name) for name, home in homes.items()}
    for name, home in homes.items():
        setattr(home, name, LOWERING_CHOICES[name][1])
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(homes[name], name, value)


@contextlib.contextmanager
def counting_calls(owner, attribute: str, counts: list[int], measure: Callable[..., int] = lambda *args: 1):
    """Inside, each call of the method `owner.<attribute>` appends `measure(*its arguments)` to
    `counts` (1 by default)."""
    original = getattr(owner, attribute)

    def counting(*args, **kwargs):
        counts.append(measure(*args, **kwargs))
        return original(*args, **kwargs)

    setattr(owner, attribute, counting)
    try:
        yield
    finally:
        setattr(owner, attribute, original)


def counting_scheduler_nodes(counts: list[int]):
    """Inside, each graph Inductor schedules appends to `counts` the number of nodes its
    scheduler starts from (one per buffer to compute, before fusion)."""
    from torch._inductor import scheduler

    return counting_calls(scheduler.Scheduler, "_init", counts, lambda self, nodes: len(nodes))


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
