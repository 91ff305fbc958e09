"""Pass registry and manager: which passes a policy turns on, in what order, on which graphs.

A pass declares what it rewrites (its `Stage`), the events it adds to the step's schedule
(a refresh every T steps, a sync every H, ...), and its runtime hooks. The manager:

    plan      the enabled passes, their conflicts (each with its mathematical reason), and the
              order of their rewrites: by stage, then by the policy's order within a stage;
    schedule  the events of every pass; a step carries whichever subset falls on it;
    pipeline  for each set of events that can fall on one step, the captured graph copied
              and rewritten by every pass in order, with a snapshot after each rewrite.

A rewrite is `(program, option) -> PassResult`: `program.graph` is the step for the events
in `program.events`, which the rewrite edits (it is a copy) or replaces with
`dataclasses.replace(program, graph=...)`. A rewrite that its option does not ask for (the
coupled form of a correction the policy wants decoupled) returns None: no snapshot.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..errors import PassError
from ..graph import PROVENANCE, ParamInfo, StateSpec, TrainGraph, events_name, propagate_values


class Stage(enum.IntEnum):
    """What a rewrite changes; rewrites run in this order.

    FORWARD         what the forward computes (fake quantization): first, so that every later
                    rewrite that reads or repeats the forward sees it;
    COMBINE         how workers combine gradients (all-reduce, low-rank all-reduce, gossip;
                    local steps drop the step's own averaging);
    GRADIENT        what the update reads as its gradient (clipping, CAGE's coupled correction);
    OPTIMIZER_STATE the update rule and its state (GaLore, LoRDO's inner step);
    UPDATE          what is added to the update (CAGE's decoupled correction);
    LOOKAHEAD       the point the update is taken from (EMA-Nesterov);
    WEIGHT_STORAGE  how weights are held between steps (ECO's requantization);
    SYNC            what workers exchange of their models (local SGD, DiLoCo, LoRDO, gossip);
    STATE_STORAGE   how state is held between steps (moments in 8 or 4 bits): after every rewrite
                    that reads or writes state, so it holds whatever state they left;
    GUARD           checks over every write (non-finite): last, so it covers every rewrite.
    """

    FORWARD = 1
    COMBINE = 2
    GRADIENT = 3
    OPTIMIZER_STATE = 4
    UPDATE = 5
    LOOKAHEAD = 6
    WEIGHT_STORAGE = 7
    SYNC = 8
    STATE_STORAGE = 9
    GUARD = 10


@dataclass(frozen=True)
class Event:
    """Something a step does besides training, at 0-based step `first` and then every `every`
    steps (0: only once). Passes that declare an event of the same name share it (the cadence
    must then agree): "init", the first step, is the usual one."""

    name: str
    every: int
    first: int = 0

    def __post_init__(self) -> None:
        if self.every < 0 or self.first < 0:
            raise ValueError(f"event {self.name!r}: every and first must be >= 0, got {self.every}, {self.first}")

    def fires(self, step: int) -> bool:
        if step == self.first:
            return True
        return self.every > 0 and step > self.first and (step - self.first) % self.every == 0


INIT = Event("init", every=0, first=0)
# Beyond this many steps of one period, the sets of events a step can carry are over-approximated.
_SIMULATED_STEPS = 100_000


@dataclass(frozen=True)
class Schedule:
    """The events of a policy: which fall on step k, and every set that can fall on one step."""

    events: tuple[Event, ...] = ()

    def events_at(self, step: int) -> frozenset[str]:
        return frozenset(e.name for e in self.events if e.fires(step))

    def name_at(self, step: int) -> str:
        """The name of the graph step k runs: "step", "refresh", "refresh+sync", ..."""
        return events_name(self.events_at(step))

    def reachable(self) -> list[frozenset[str]]:
        """Every set of events some step carries (the empty set included when some step has none)."""
        periodic = [e for e in self.events if e.every]
        start = max((e.first for e in self.events), default=0)
        period = math.lcm(*(e.every for e in periodic)) if periodic else 1
        found: dict[frozenset[str], None] = {}
        for step in range(min(start + period + 1, _SIMULATED_STEPS)):
            found.setdefault(self.events_at(step))
        if start + period + 1 > _SIMULATED_STEPS:
            # Two cadences meet at some step iff their offsets agree modulo the gcd of their
            # periods (Chinese remainder theorem); a set meets iff every pair does.
            for size in range(1, len(periodic) + 1):
                for subset in itertools.combinations(periodic, size):
                    if all((a.first - b.first) % math.gcd(a.every, b.every) == 0
                           for a, b in itertools.combinations(subset, 2)):
                        found.setdefault(frozenset(e.name for e in subset))
        return list(found)


@dataclass(frozen=True)
class Program:
    """What a rewrite sees: the training step's graph for one set of events."""

    graph: TrainGraph
    events: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PassResult:
    program: Program
    summary: tuple[str, ...] = ()


PassFn = Callable[[Program, Any], "PassResult | None"]
# (option, parameter, name of the canonical op updating it) -> optimizer state keys the pass
# replaces for that parameter; asked before capture so the optimizer never holds them.
ReleaseFn = Callable[[Any, ParamInfo, str], tuple[str, ...]]


@dataclass(frozen=True)
class Lowering:
    """What a pass asks of code generation for one graph: `aten_rewrites`, run in order on the
    aten graph AOTAutograd writes before the compiler reads it, and Inductor config patches."""

    aten_rewrites: tuple[Callable[[Any], None], ...] = ()
    inductor_config: Mapping[str, Any] = field(default_factory=dict)


class PassRuntime:
    """What a pass does at run time, beyond its graphs; every hook defaults to nothing.

    The core calls these for every enabled pass and knows no pass by name: a pass that
    keeps weights in another form lends them storage around each call and makes them
    readable (`materialized`), a pass that checks the step says whether it was applied.
    """

    def __init__(self, option: Any, context: "RuntimeContext") -> None:
        self.option = option
        self.context = context

    def setup(self, fresh: set[str]) -> None:
        """After state is allocated at capture, before the first call; `fresh` names the state
        tensors this capture created (a capture after an optimizer change keeps the others)."""

    def around_call(self, events: frozenset[str]):
        """A context manager around each compiled call (None: nothing)."""
        return None

    def after_call(self, events: frozenset[str]) -> bool:
        """After each call; False: the step was not applied (its counter does not advance)."""
        return True

    def settle(self) -> None:
        """Finish what the pass started outside its graphs (a collective still in flight), so
        that the runtime's tensors hold their values: before a checkpoint is read or loaded."""

    def materialized(self):
        """A context manager in which weights held in another form are readable (None: nothing)."""
        return None

    def export_quantized(self):
        """The quantized weights this pass makes the forward read (None: it quantizes nothing)."""
        return None

    def lowering(self, graph: TrainGraph) -> Lowering | None:
        """How code generation treats `graph`, the final graph of one set of events (None: as
        it is)."""
        return None

    def collectives(self, graph: TrainGraph) -> list:
        """Collectives of this pass's own ops in `graph` (the core counts torch's functional ones)."""
        return []

    def describe(self) -> list[str]:
        """Lines for `explain()` about what the pass measured at run time."""
        return []

    def state_dict(self) -> dict:
        """What of this pass's run-time bookkeeping a checkpoint keeps (its tensors are the
        runtime's). Plain ints, floats, strings and containers of them."""
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what `state_dict` returned."""


@dataclass
class RuntimeContext:
    """What a pass runtime may read: the runtime's tensors and step counter, the parameters
    by name, and the final graph of every set of events."""

    runtime: Any
    params: dict[str, Any]
    graphs: dict[str, TrainGraph]
    owner: str


def asked_lowerings(runtimes: Sequence[PassRuntime], graph: TrainGraph) -> list[Lowering]:
    """What the enabled passes ask of code generation for `graph`. Two passes that set one
    Inductor option to different values are refused: whichever was applied last would win,
    and the other pass's graph would be compiled against what it asked."""
    asked, settings = [], {}
    for runtime in runtimes:
        lowering = runtime.lowering(graph)
        if lowering is None:
            continue
        for key, value in lowering.inductor_config.items():
            owner, earlier = settings.setdefault(key, (runtime.context.owner, value))
            if earlier != value:
                raise ValueError(
                    f"passes {owner!r} and {runtime.context.owner!r} set Inductor's config {key!r} to {earlier!r} and "
                    f"{value!r} for the graph of events {sorted(graph.events)}; enable only one of them in the Policy, "
                    "or have one pass's lowering leave that option alone")
        asked.append(lowering)
    return asked


@dataclass(frozen=True)
class Conflict:
    """A conflict that holds unless `combinable(this pass's option, the other's)` says the two
    options meet after all (two passes that combine workers, each over its own level of a
    2-D arrangement of them). `combinable` raises ValueError for options that are neither."""

    reason: str
    combinable: Callable[[Any, Any], bool]


@dataclass(frozen=True)
class RegisteredPass:
    name: str
    stage: Stage
    run: PassFn
    option: str | None
    conflicts: dict[str, str | Conflict]
    releases: ReleaseFn | None = None
    option_type: type | None = None
    events: Callable[[Any], tuple[Event, ...]] | None = None
    runtime: type[PassRuntime] | None = None
    also: tuple[tuple[Stage, PassFn], ...] = ()
    releases_leftover: bool = False

    def rewrites(self) -> list[tuple[Stage, str, PassFn]]:
        """(stage, snapshot label, rewrite) for each rewrite of the pass; the main one has the pass's name."""
        extra = [(stage, f"{self.name}:{stage.name.lower()}", fn) for stage, fn in self.also]
        return sorted(extra + [(self.stage, self.name, self.run)], key=lambda item: item[0])


_REGISTRY: dict[str, RegisteredPass] = {}


def register_pass(
    name: str,
    *,
    stage: Stage,
    option: str | None = None,
    conflicts: Mapping[str, str | Conflict] | None = None,
    releases: ReleaseFn | None = None,
    option_type: type | None = None,
    events: Callable[[Any], tuple[Event, ...]] | None = None,
    runtime: type[PassRuntime] | None = None,
    also: Mapping[Stage, PassFn] | None = None,
    releases_leftover: bool = False,
    after: object = None,
) -> Callable[[PassFn], PassFn]:
    """Register a pass whose main rewrite is the decorated function.

    Args:
      stage: what the rewrite changes (`Stage`); rewrites run in stage order.
      option: the `Policy` field that enables it. A pass of your own leaves it None and gives
        `option_type`, the class of its options: `Policy(extra_passes=[MyOptions(...)])` runs
        it with that object (a bare name in `extra_passes` runs it with None).
      conflicts: passes it cannot run with, each mapped to the mathematical reason (shown to
        the user who enables both), or to a `Conflict` whose options may make them meet.
      releases: the optimizer state the pass takes over, per parameter, freed before capture.
      releases_leftover: the pass changes how state is held, not what it is: its `releases`
        is asked after every other pass's and takes only the keys none of them took.
      events: `option -> (Event, ...)`, the events the pass adds to the schedule.
      runtime: a `PassRuntime` subclass, created once per compiled step.
      also: further rewrites at other stages (`{Stage.COMBINE: fn}`), run in stage order.
    """
    if after is not None:
        raise TypeError(
            f"register_pass({name!r}, after=...) was replaced by stage=: order follows from what a pass "
            "rewrites (lordo_compile.passes.Stage), not from other passes' names"
        )
    if not isinstance(stage, Stage):
        raise ValueError(f"register_pass({name!r}): stage must be a lordo_compile.passes.Stage, got {stage!r}")

    def decorate(fn: PassFn) -> PassFn:
        if name in _REGISTRY:
            raise ValueError(f"a pass named {name!r} is already registered")
        if option_type is not None and any(r.option_type is option_type for r in _REGISTRY.values()):
            raise ValueError(f"option type {option_type.__name__} already belongs to another registered pass")
        extra = tuple((Stage(s), f) for s, f in (also or {}).items())
        _REGISTRY[name] = RegisteredPass(name, stage, fn, option, dict(conflicts or {}), releases, option_type,
                                         events, runtime, extra, releases_leftover)
        return fn

    return decorate


def registered_passes() -> dict[str, RegisteredPass]:
    return dict(_REGISTRY)


@dataclass
class Snapshot:
    """One graph after one rewrite, and what that rewrite reported."""

    name: str
    program: Program
    summary: tuple[str, ...] = ()


@dataclass
class Pipeline:
    """Every set of events a step can carry, with its graph after each rewrite."""

    plan: list[tuple[RegisteredPass, Any]]
    schedule: Schedule
    graphs: dict[str, list[Snapshot]] = field(default_factory=dict)
    summaries: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def final(self) -> dict[str, TrainGraph]:
        return {name: snapshots[-1].program.graph for name, snapshots in self.graphs.items()}

    def state(self) -> dict[str, StateSpec]:
        specs: dict[str, StateSpec] = {}
        for graph in self.final().values():
            for name, spec in graph.state.items():
                if specs.setdefault(name, spec) != spec:
                    raise PassError(f"state {name!r} is declared with different specs in different graphs")
        return specs


def plan_passes(policy: Any) -> list[tuple[RegisteredPass, Any]]:
    """The enabled passes with their options, in the policy's order; conflicts refused."""
    enabled: dict[str, tuple[RegisteredPass, Any]] = {}
    for registered in _REGISTRY.values():
        value = getattr(policy, registered.option, None) if registered.option else None
        if value is not None:
            enabled[registered.name] = (registered, value)
    for extra in getattr(policy, "extra_passes", ()):
        registered, value = _extra_pass(extra)
        if registered.name in enabled:
            given = f"Policy.{registered.option}" if registered.option and getattr(policy, registered.option, None) \
                is not None else "Policy.extra_passes"
            raise ValueError(
                f"the policy enables pass {registered.name!r} twice (in {given} and again in Policy.extra_passes as "
                f"{extra!r}); a pass runs once per step, so give it once, with the options it should run with")
        enabled[registered.name] = (registered, value)
    if not enabled:
        enabled["identity"] = (_REGISTRY["identity"], None)
    for name, (registered, option) in enabled.items():
        for other, reason in registered.conflicts.items():
            if other not in enabled:
                continue
            if isinstance(reason, Conflict):
                if reason.combinable(option, enabled[other][1]):
                    continue
                reason = reason.reason
            raise ValueError(
                f"the policy enables passes {name!r} and {other!r}, which cannot be "
                f"combined{f' ({reason})' if reason else ''}; remove one of them from the Policy"
            )
    return list(enabled.values())


def _extra_pass(extra: Any) -> tuple[RegisteredPass, Any]:
    """A `Policy.extra_passes` item: a registered name, or an options object of a registered `option_type`."""
    if isinstance(extra, str):
        if extra not in _REGISTRY:
            raise ValueError(
                f"Policy.extra_passes names {extra!r}, which is not registered; registered "
                f"passes: {sorted(_REGISTRY)}. Register it with lordo_compile.passes.register_pass."
            )
        return _REGISTRY[extra], None
    # The exact type first: a subclass of one pass's options may be another pass's.
    takes = [registered for registered in _REGISTRY.values() if registered.option_type is not None]
    for registered in sorted(takes, key=lambda registered: type(extra) is not registered.option_type):
        if isinstance(extra, registered.option_type):
            return registered, extra
    raise ValueError(
        f"Policy.extra_passes holds {extra!r}, whose type no registered pass takes; register the pass with "
        f"register_pass(..., option_type={type(extra).__name__})"
    )


def released_state(policy: Any, param: ParamInfo, op_name: str) -> dict[str, str]:
    """Optimizer state keys the policy's passes take over for `param`: key -> pass name."""
    released: dict[str, str] = {}
    plan = sorted(plan_passes(policy), key=lambda item: item[0].releases_leftover)
    for registered, option in plan:
        if registered.releases is None:
            continue
        for key in registered.releases(option, param, op_name):
            if registered.releases_leftover and key in released:
                continue
            if key in released:
                raise ValueError(
                    f"passes {released[key]!r} and {registered.name!r} both take over "
                    f"{key!r} of {param.name}; remove one of them from the Policy"
                )
            released[key] = registered.name
    return released


def schedule_of(plan: Iterable[tuple[RegisteredPass, Any]]) -> Schedule:
    """Every pass's events, merged by name (a shared event must have one cadence)."""
    events: dict[str, tuple[Event, str]] = {}
    for registered, option in plan:
        for event in registered.events(option) if registered.events else ():
            seen = events.get(event.name)
            if seen is not None and seen[0] != event:
                raise ValueError(
                    f"passes {seen[1]!r} and {registered.name!r} both declare event {event.name!r}, with "
                    f"different cadences ({seen[0]} and {event}); give one of them another name"
                )
            events.setdefault(event.name, (event, registered.name))
    return Schedule(tuple(event for event, _ in events.values()))


def run_passes(captured: TrainGraph, policy: Any) -> Pipeline:
    """Rewrite the captured step for every set of events a step can carry."""
    plan = plan_passes(policy)
    schedule = schedule_of(plan)
    rewrites = sorted(
        ((stage, index, label, fn, registered, option)
         for index, (registered, option) in enumerate(plan)
         for stage, label, fn in registered.rewrites()),
        key=lambda item: (item[0], item[1]),
    )
    pipeline = Pipeline(plan, schedule)
    notes: dict[str, dict[str, None]] = {registered.name: {} for registered, _ in plan}
    for events in schedule.reachable():
        program = Program(captured.copy(events=events), events)
        snapshots = [Snapshot("captured", program)]
        for _, _, label, fn, registered, option in rewrites:
            done = [s.name for s in snapshots[1:]]
            try:
                result = fn(Program(program.graph.copy(), events), option)
                if result is None:
                    continue
                graph = result.program.graph
                for node in graph.graph.nodes:
                    node.meta.setdefault(PROVENANCE, registered.name)
                propagate_values(graph)
                graph.lint()
            except (ValueError, NotImplementedError, PassError):
                raise
            except Exception as error:
                raise PassError(f"pass {registered.name!r} failed on the {events_name(events)!r} graph after "
                                f"{done}: {type(error).__name__}: {error}") from error
            program = result.program
            snapshots.append(Snapshot(label, program, result.summary))
            notes[registered.name].update(dict.fromkeys(result.summary))
        pipeline.graphs[events_name(events)] = snapshots
    pipeline.summaries = {name: tuple(lines) for name, lines in notes.items()}
    return pipeline


def replace(program: Program, **changes) -> Program:
    """`dataclasses.replace` for a Program: every field not named is kept."""
    return dataclasses.replace(program, **changes)
