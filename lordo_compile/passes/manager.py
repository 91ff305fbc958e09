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
from ..graph import PROVENANCE, ParamInfo, StateSpec, TrainGraph, propagate_meta


@dataclass(frozen=True)
class Rule:
    """Run `phase` at step `first` (0-based) and then every `every` steps (0: only once)."""

    phase: str
    every: int
    first: int = 0

    def matches(self, step: int) -> bool:
        if step == self.first:
            return True
        return self.every > 0 and step > self.first and (step - self.first) % self.every == 0


@dataclass(frozen=True)
class Schedule:
    """Which phase runs at step k (0-based): the first matching rule, else `default`."""

    default: str = "step"
    rules: tuple[Rule, ...] = ()

    def phase_at(self, step: int) -> str:
        for rule in self.rules:
            if rule.matches(step):
                return rule.phase
        return self.default


@dataclass(frozen=True)
class Watch:
    """A runtime counter (a state tensor) read after `phases` run; a rise warns, once.

    Reading it costs a host sync, so watches belong on rare phases (refresh, sync).
    """

    state: str
    phases: tuple[str, ...]
    message: str


@dataclass(frozen=True)
class Guard:
    """A boolean state tensor read after every call of `phases` (one small host read). A
    False entry means the graph did not apply the step: it raises `NonFiniteError` naming
    the step and `labels[phase][i]` of the first False entry, or, with `skip`, leaves the
    step counter where it was and warns once."""

    state: str
    phases: tuple[str, ...]
    labels: dict[str, tuple[str, ...]]
    skip: bool = False


@dataclass
class Program:
    """Everything a pass sees: one TrainGraph per phase and the schedule between them."""

    phases: dict[str, TrainGraph]
    schedule: Schedule = field(default_factory=Schedule)
    watches: tuple[Watch, ...] = ()
    # Parameters whose full-precision storage the runtime frees between steps: the graph
    # rebuilds them from state at its start (ECO).
    stored: tuple[str, ...] = ()
    guards: tuple[Guard, ...] = ()

    def copy(self) -> "Program":
        return Program({name: graph.copy() for name, graph in self.phases.items()}, self.schedule, self.watches,
                       self.stored, self.guards)

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
# (option, parameter, name of the canonical op updating it) -> optimizer state keys the pass
# replaces for that parameter; asked before capture so the optimizer never holds them.
ReleaseFn = Callable[[Any, ParamInfo, str], tuple[str, ...]]


@dataclass(frozen=True)
class RegisteredPass:
    name: str
    run: PassFn
    option: str | None
    after: tuple[str, ...]
    conflicts: dict[str, str]
    releases: ReleaseFn | None = None
    option_type: type | None = None


_REGISTRY: dict[str, RegisteredPass] = {}


def register_pass(
    name: str,
    *,
    option: str | None,
    after: tuple[str, ...] = (),
    conflicts: tuple[str, ...] | dict[str, str] = (),
    releases: ReleaseFn | None = None,
    option_type: type | None = None,
) -> Callable[[PassFn], PassFn]:
    """Register a pass; `option` is the `Policy` field that enables it (None: never implied).

    A pass of your own has `option=None` and usually an `option_type`, the class of its
    options: `Policy(extra_passes=[MyOptions(...)])` then runs it with that object (a
    bare name in `extra_passes` runs it with None).

    `conflicts` names the passes it cannot run with, or maps each to the reason (shown to
    the user who enables both).

    `releases` names the optimizer state the pass takes over, per parameter, so that it
    is freed before capture instead of lingering next to the pass's own state.
    """

    def decorate(fn: PassFn) -> PassFn:
        if name in _REGISTRY:
            raise ValueError(f"a pass named {name!r} is already registered")
        reasons = dict(conflicts) if isinstance(conflicts, dict) else dict.fromkeys(conflicts, "")
        if option_type is not None and any(r.option_type is option_type for r in _REGISTRY.values()):
            raise ValueError(f"option type {option_type.__name__} already belongs to another registered pass")
        _REGISTRY[name] = RegisteredPass(name, fn, option, tuple(after), reasons, releases, option_type)
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
    for extra in getattr(policy, "extra_passes", ()):
        registered, option = _extra_pass(extra)
        enabled[registered.name] = (registered, option)
    if not enabled:
        enabled["identity"] = (_REGISTRY["identity"], None)
    for name, (registered, _) in enabled.items():
        for other, reason in registered.conflicts.items():
            if other in enabled:
                raise ValueError(
                    f"the policy enables passes {name!r} and {other!r}, which cannot be "
                    f"combined{f' ({reason})' if reason else ''}; remove one of them from the Policy"
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


def _extra_pass(extra: Any) -> tuple[RegisteredPass, Any]:
    """A `Policy.extra_passes` item: a registered name, or an options object of a registered `option_type`."""
    if isinstance(extra, str):
        if extra not in _REGISTRY:
            raise ValueError(
                f"Policy.extra_passes names {extra!r}, which is not registered; registered "
                f"passes: {sorted(_REGISTRY)}. Register it with lordo_compile.passes.register_pass."
            )
        return _REGISTRY[extra], None
    for registered in _REGISTRY.values():
        if registered.option_type is not None and isinstance(extra, registered.option_type):
            return registered, extra
    raise ValueError(
        f"Policy.extra_passes holds {extra!r}, whose type no registered pass takes; register the pass with "
        f"register_pass(..., option_type={type(extra).__name__})"
    )


def released_state(policy: Any, param: ParamInfo, op_name: str) -> dict[str, str]:
    """Optimizer state keys the policy's passes take over for `param`: key -> pass name."""
    released: dict[str, str] = {}
    for registered, option in plan_passes(policy):
        if registered.releases is None:
            continue
        for key in registered.releases(option, param, op_name):
            if key in released:
                raise ValueError(
                    f"passes {released[key]!r} and {registered.name!r} both take over "
                    f"{key!r} of {param.name}; remove one of them from the Policy"
                )
            released[key] = registered.name
    return released


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
                propagate_meta(graph.graph)
                graph.recompile()
        except (ValueError, NotImplementedError):
            raise
        except Exception as error:
            raise PassError(f"pass {registered.name!r} failed after passes {done}: {error}") from error
        stages.append(Stage(registered.name, result.program, result.summary))
    return stages
