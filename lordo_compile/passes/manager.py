"""Pass registry and manager: which passes a policy turns on, in what order, with records.

A pass is a function `(program, option) -> PassResult`, registered where it is defined
with the `Policy` field that turns it on, the passes it must run after, and the passes it
cannot be combined with. The manager sorts the enabled passes by those constraints,
rejects conflicts naming both passes, runs each on a copy of the program, checks the
result, stamps the nodes it created with its name, and keeps a snapshot per stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx

from ..errors import PassError
from ..graph import PROVENANCE, StateSpec, TrainGraph


@dataclass(frozen=True)
class Schedule:
    """Which phase runs at step k (0-based): the first rule whose period divides k+1-offset.

    `rules` are `(phase, every, offset)`; with no rule matching, `default` runs.
    """

    default: str = "step"
    rules: tuple[tuple[str, int, int], ...] = ()

    def phase_at(self, step: int) -> str:
        for phase, every, offset in self.rules:
            if step + 1 - offset > 0 and (step + 1 - offset) % every == 0:
                return phase
        return self.default


@dataclass
class Program:
    """Everything a pass sees: one TrainGraph per phase and the schedule between them."""

    phases: dict[str, TrainGraph]
    schedule: Schedule = field(default_factory=Schedule)

    def copy(self) -> "Program":
        return Program({name: graph.copy() for name, graph in self.phases.items()}, self.schedule)

    def state(self) -> dict[str, StateSpec]:
        specs: dict[str, StateSpec] = {}
        for graph in self.phases.values():
            specs.update(graph.state)
        return specs


@dataclass(frozen=True)
class PassResult:
    program: Program
    summary: tuple[str, ...] = ()


PassFn = Callable[[Program, Any], PassResult]


@dataclass(frozen=True)
class RegisteredPass:
    name: str
    run: PassFn
    option: str | None
    after: tuple[str, ...]
    conflicts: tuple[str, ...]


_REGISTRY: dict[str, RegisteredPass] = {}


def register_pass(
    name: str,
    *,
    option: str | None,
    after: tuple[str, ...] = (),
    conflicts: tuple[str, ...] = (),
) -> Callable[[PassFn], PassFn]:
    """Register a pass; `option` is the `Policy` field that enables it (None: never implied)."""

    def decorate(fn: PassFn) -> PassFn:
        if name in _REGISTRY:
            raise ValueError(f"a pass named {name!r} is already registered")
        _REGISTRY[name] = RegisteredPass(name, fn, option, tuple(after), tuple(conflicts))
        return fn

    return decorate


def registered_passes() -> dict[str, RegisteredPass]:
    return dict(_REGISTRY)


@dataclass
class Stage:
    """The program after one stage, and what that stage reported."""

    name: str
    program: Program
    summary: tuple[str, ...] = ()


def plan_passes(policy: Any) -> list[tuple[RegisteredPass, Any]]:
    """The enabled passes with their options, in an order that satisfies every constraint."""
    enabled: dict[str, tuple[RegisteredPass, Any]] = {}
    for registered in _REGISTRY.values():
        option = getattr(policy, registered.option, None) if registered.option else None
        if option is not None:
            enabled[registered.name] = (registered, option)
    for name in getattr(policy, "extra_passes", ()):
        if name not in _REGISTRY:
            raise ValueError(
                f"Policy.extra_passes names {name!r}, which is not registered; registered "
                f"passes: {sorted(_REGISTRY)}. Register it with lordo_compile.passes.register_pass."
            )
        enabled[name] = (_REGISTRY[name], None)
    if not enabled:
        enabled["identity"] = (_REGISTRY["identity"], None)
    for name, (registered, _) in enabled.items():
        for other in registered.conflicts:
            if other in enabled:
                raise ValueError(
                    f"the policy enables passes {name!r} and {other!r}, which cannot be "
                    f"combined; remove one of them from the Policy"
                )
    order = nx.DiGraph()
    order.add_nodes_from(enabled)
    for name, (registered, _) in enabled.items():
        for before in registered.after:
            if before in enabled:
                order.add_edge(before, name)
    try:
        names = list(nx.lexicographical_topological_sort(order))
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(order)
        raise ValueError(f"pass ordering constraints form a cycle: {cycle}") from None
    return [enabled[name] for name in names]


def run_passes(program: Program, policy: Any) -> list[Stage]:
    """Run the policy's passes; returns every stage, the captured program first."""
    stages = [Stage("captured", program)]
    for registered, option in plan_passes(policy):
        before = stages[-1].program
        done = [stage.name for stage in stages[1:]]
        try:
            result = registered.run(before.copy(), option)
            for graph in result.program.phases.values():
                for node in graph.nodes():
                    node.meta.setdefault(PROVENANCE, registered.name)
                graph.recompile()
        except (ValueError, NotImplementedError):
            raise
        except Exception as error:
            raise PassError(f"pass {registered.name!r} failed after passes {done}: {error}") from error
        stages.append(Stage(registered.name, result.program, result.summary))
    return stages
