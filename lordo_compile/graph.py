"""TrainGraph: a captured training step as an FX graph whose nodes know their role.

Every node carries `node.meta["lordo_role"]` (a `Role`); nodes that belong to one
parameter carry `meta["lordo_param"]` (its name) and optimizer state carries
`meta["lordo_state"]` (the state key). Each node records the stage that made it in
`meta["lordo_pass"]` ("capture", or a pass's name).

Placeholders come in two kinds: the inputs dynamo passes at every call (parameters,
batch, optimizer state, hyperparameters), and state a pass asked for, which the runtime
allocates from a `StateSpec` and appends after them.

A TrainGraph is the step for one set of events (`events`: the names of the events passes
declared that fall on this step; none for an ordinary step). New nodes get `meta["val"]` by fake-tensor propagation
(`value`, `propagate_values`) in the fake mode capture recorded the step in.
"""

from __future__ import annotations

import enum
import operator
import re
from dataclasses import dataclass, field
from typing import Iterator

import networkx as nx
import torch
import torch.fx as fx

from torch._subclasses.fake_tensor import FakeTensorMode

from .errors import PassError
from .ops import CanonicalOp, canonical_op

ROLE = "lordo_role"
PARAM = "lordo_param"
STATE = "lordo_state"
PROVENANCE = "lordo_pass"
INPUT = "lordo_input"
# A choice the step makes once (which basis a layer quantizes in): a rewrite that repeats
# the forward reads it instead of making it again, so both forwards compute one function.
DECISION = "lordo_decision"


class Role(str, enum.Enum):
    BATCH_INPUT = "batch_input"
    PARAMETER = "parameter"
    BUFFER = "buffer"
    OPTIMIZER_STATE = "optimizer_state"
    HYPERPARAMETER = "hyperparameter"
    FORWARD = "forward"
    LOSS = "loss"
    BACKWARD = "backward"
    GRADIENT = "gradient"
    COLLECTIVE = "collective"
    # A value the runtime sends after the graph has run (an all-reduce that overlaps later
    # steps), written into a state buffer; and what such a collective brought, read back.
    SENT = "sent"
    RECEIVED = "received"
    OPTIMIZER_UPDATE = "optimizer_update"
    WRITEBACK = "writeback"
    OUTPUT = "output"
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ParamInfo:
    """A trainable tensor the step reads."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    module_type: type | None = None


@dataclass(frozen=True, kw_only=True)
class StateSpec:
    """State a pass needs; the runtime allocates it, the pass never touches a tensor.

    `init` is "zeros", "ones", "eye" (the first columns of an identity: an orthonormal
    starting basis), "randn:<seed>" (standard normal from a generator seeded with
    <seed>), "copy:<parameter name>" (the parameter's value when first allocated), or
    "same:<state name>" (a copy of another state tensor once every pass has set up its
    own, e.g. a weight copy held in a pass's storage format).
    `holds` says what it is: "state" (optimizer or pass state), "weight" (the stored form
    of a parameter, e.g. ECO's codes and scales), which the memory report counts as weights,
    or "scratch" (what the last step found, e.g. which gradients were finite: no step's
    math reads it, so a recapture over other parameters may declare it with another shape).
    `moment` marks an optimizer moment that a state-storage rewrite may hold in fewer
    bits: "signed" (it takes both signs: a first moment, a momentum, an error
    buffer) or "unsigned" (a second moment); None: it is always held as declared. A pass
    that marks a moment reads and writes it only through the graph, never as a tensor of
    the runtime (in which it may not exist).
    `counted_by_optimizer` marks a moment whose first steps torch.optim's state of `param`
    counts (Adam's bias correction by `step`, SGD's first momentum step): a checkpoint that
    starts the moment afresh (resuming on another number of workers) must start that state
    afresh with it.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    owner: str
    param: str | None = None
    init: str = "zeros"
    holds: str = "state"
    moment: str | None = None
    counted_by_optimizer: bool = False

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class UpdateSite:
    """One canonical optimizer update in a graph, with its inputs and outputs by name."""

    node: fx.Node
    op: CanonicalOp
    param: str

    def input(self, key: str) -> fx.Node:
        return self.node.args[self.op.input_index(key)]  # type: ignore[return-value]

    def outputs(self) -> dict[str, fx.Node]:
        """The nodes holding each output ("param", then state keys) that the graph uses."""
        if not self.op.state:
            return {"param": self.node}
        keys = self.op.output_keys
        return {keys[u.args[1]]: u for u in self.node.users if u.target is operator.getitem}


def tag(node: fx.Node, role: Role, param: str | None = None, state: str | None = None,
        name: str | None = None) -> fx.Node:
    """Stamp a node a pass created: its role, the parameter and state key it belongs to,
    and a readable name (made an identifier)."""
    node.meta[ROLE] = role
    if param is not None:
        node.meta[PARAM] = param
    if state is not None:
        node.meta[STATE] = state
    if name is not None:
        node._rename(identifier(name))
    return node


def identifier(name: str) -> str:
    """A Python identifier for a dotted name: `layers.0.attn.weight` -> `layers_0_attn_weight`."""
    text = re.sub(r"\W+", "_", name).strip("_") or "t"
    return f"_{text}" if text[0].isdigit() else text


def events_name(events: frozenset[str]) -> str:
    """How a set of events is shown and keyed: "step" for none, else the names joined by "+"."""
    return "+".join(sorted(events)) or "step"


def writes_into(node: fx.Node, target: fx.Node) -> bool:
    """Whether `node` is an in-place write (`copy_`, `zero_`, `add_`) into `target`."""
    return node.op == "call_method" and node.target in ("copy_", "zero_", "add_") and node.args[0] is target


class WeightStorage:
    """How copies of one weight are held between steps: in full precision (this class), or in
    the form a weight-storage pass sets in `TrainGraph.storage` (ECO's codes and scales).

    A pass that keeps a copy of a weight (an anchor) holds it through this interface, so it
    composes with whatever storage the policy chose without knowing which.
    """

    # Whether a stored value differs from the value stored (a rounding error to feed back).
    rounds = False
    # Where it rounds and the outer step has no momentum to take the error: keep it in a
    # buffer added before the next rounding (True) or drop it.
    keeps_outer_error = False

    def hold(self, graph: "TrainGraph", param: str, key: str, owner: str) -> dict[str, fx.Node]:
        """State placeholders that hold one copy, initialised to the weight's value."""
        info = graph.params[param]
        spec = StateSpec(name=f"{owner}.{key}.{param}", shape=info.shape, dtype=info.dtype, owner=owner, param=param,
                         init=f"copy:{param}")
        return {"value": graph.state_node(spec)}

    def decode(self, graph: "TrainGraph", held: dict[str, fx.Node], param: str) -> fx.Node:
        """The copy's value."""
        return held["value"]

    def encode(self, graph: "TrainGraph", value: fx.Node, param: str, salt: int) -> tuple[fx.Node, dict[str, fx.Node]]:
        """(the value as stored, the tensors that hold it): equal to `value` in full precision."""
        return value, {"value": value}

    def write(self, graph: "TrainGraph", held: dict[str, fx.Node], encoded: dict[str, fx.Node], param: str,
              key: str) -> None:
        """Write `encoded` into the held tensors (writeback nodes at the insertion point)."""
        for part, node in held.items():
            tag(graph.graph.call_method("copy_", (node, encoded[part])), Role.WRITEBACK, param, key,
                name=f"write_{key}_{param}")

    def assign(self, graph: "TrainGraph", param: str, stored: fx.Node, encoded: dict[str, fx.Node]) -> None:
        """Make the parameter itself hold `encoded` (whose value is `stored`) from now on."""
        placeholder = graph.parameter(param)
        tag(graph.graph.call_method("copy_", (placeholder, stored)), Role.WRITEBACK, param, "param",
            name=f"assign_{param}")


FULL_PRECISION = WeightStorage()


@dataclass
class TrainGraph:
    # The captured module, whose attributes the graph's get_attr nodes read.
    root: fx.GraphModule
    graph: fx.Graph
    events: frozenset[str]
    params: dict[str, ParamInfo]
    num_dynamo_inputs: int
    state: dict[str, StateSpec] = field(default_factory=dict)
    # How each parameter is held between steps, where a pass changed it (absent: full precision).
    storage: dict[str, WeightStorage] = field(default_factory=dict)
    fake_mode: FakeTensorMode | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def module(self) -> fx.GraphModule:
        """The graph as it is now, as a module (built when asked: passes edit the graph, and
        generating its code after every edit would cost more than the edits)."""
        return fx.GraphModule(self.root, self.graph, class_name=type(self.root).__name__)

    @property
    def name(self) -> str:
        return events_name(self.events)

    def copy(self, events: frozenset[str] | None = None) -> "TrainGraph":
        """A copy a pass may edit; node meta is copied shallowly, tensors are shared."""
        graph = fx.Graph()
        output = graph.graph_copy(self.graph, {})
        graph.output(output)
        old_output = next(iter(reversed(self.graph.nodes)))
        new_output = next(iter(reversed(graph.nodes)))
        new_output.meta = dict(old_output.meta)
        return TrainGraph(self.root, graph, self.events if events is None else frozenset(events), dict(self.params),
                          self.num_dynamo_inputs, dict(self.state), dict(self.storage), self.fake_mode, self.device)

    def nodes(self, role: Role | None = None) -> Iterator[fx.Node]:
        for node in self.graph.nodes:
            if role is None or node.meta.get(ROLE) == role:
                yield node

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def parameter(self, name: str) -> fx.Node:
        """The placeholder of parameter `name`."""
        return next(n for n in self.placeholders() if n.meta.get(ROLE) == Role.PARAMETER and n.meta.get(PARAM) == name)

    def updates(self) -> list[UpdateSite]:
        """The canonical update of each parameter, in graph order (not the updates of tensors a
        pass keeps: ops registered with `updates_parameter=False`)."""
        sites = []
        for node in self.graph.nodes:
            op = canonical_op(node.target) if node.op == "call_function" else None
            if op is not None and op.updates_parameter:
                sites.append(UpdateSite(node, op, node.meta[PARAM]))
        return sites

    def update_of(self, param: str) -> UpdateSite | None:
        """The update of parameter `param`, or None."""
        return next((site for site in self.updates() if site.param == param), None)

    def last_write(self, target: fx.Node) -> fx.Node | None:
        """The last `copy_` into `target` (a placeholder): `.args[1]` is its value after the step."""
        writes = [u for u in target.users if writes_into(u, target) and u.target == "copy_"]
        if not writes:
            return None
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        return max(writes, key=order.__getitem__)

    def final_write(self, param: str) -> fx.Node:
        """The last write into parameter `param`: `write.args[1]` is its value after the step."""
        write = self.last_write(self.parameter(param))
        if write is None:
            raise ValueError(f"the step never writes parameter {param}")
        return write

    def storage_of(self, param: str) -> WeightStorage:
        return self.storage.get(param, FULL_PRECISION)

    def add_state(self, spec: StateSpec) -> fx.Node:
        """A placeholder for runtime-owned state, appended after every other input."""
        if spec.name in self.state:
            raise ValueError(f"state {spec.name!r} is already declared in the {self.name!r} graph")
        last = self.placeholders()[-1]
        with self.graph.inserting_after(last):
            node = self.graph.placeholder(identifier(spec.name))
        node.meta.update({ROLE: Role.OPTIMIZER_STATE, STATE: spec.name, INPUT: ("state", spec.name)})
        if spec.param is not None:
            node.meta[PARAM] = spec.param
        with self._fake():
            node.meta["val"] = torch.empty(spec.shape, dtype=spec.dtype, device=self.device)
        self.state[spec.name] = spec
        return node

    def state_node(self, spec: StateSpec) -> fx.Node:
        """The placeholder of `spec`, declared here if it is not yet (a spec seen again must not change)."""
        if spec.name not in self.state:
            return self.add_state(spec)
        if self.state[spec.name] != spec:
            raise ValueError(f"state {spec.name!r} is declared twice with different specs: {self.state[spec.name]} "
                             f"and {spec}")
        return next(n for n in self.placeholders() if n.meta.get(STATE) == spec.name and n.meta.get(INPUT))

    def to_networkx(self) -> nx.DiGraph:
        """Data dependencies between nodes (by node name)."""
        dag = nx.DiGraph()
        for node in self.graph.nodes:
            dag.add_node(node.name)
            for source in node.all_input_nodes:
                dag.add_edge(source.name, node.name)
        return dag

    def value(self, node: fx.Node):
        """`node.meta["val"]`, computed by fake-tensor propagation (with its inputs') if missing.

        Raises:
          PassError: naming the node, if its value cannot be computed from its inputs'.
        """
        if "val" in node.meta:
            return node.meta["val"]
        pending = [node]
        order: list[fx.Node] = []
        seen: set[fx.Node] = set()
        while pending:
            current = pending.pop()
            if current in seen or "val" in current.meta:
                continue
            seen.add(current)
            order.append(current)
            pending.extend(current.all_input_nodes)
        position = {n: i for i, n in enumerate(self.graph.nodes)}
        with self._fake(), torch.no_grad():
            for current in sorted(order, key=position.__getitem__):
                current.meta["val"] = _fake_value(current)
        return node.meta["val"]

    def _fake(self):
        if self.fake_mode is None:
            self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        return self.fake_mode

    def lint(self) -> None:
        """Check the graph is well formed (every input defined before it is used, ...)."""
        self.graph.lint()


# Nodes whose value cannot be computed from their inputs alone: the backward differentiates
# the forward that ran before it, and grad-mode switches return nothing.
_NOT_PROPAGATED = (torch.autograd.grad, torch._C._set_grad_enabled)


def _fake_value(node: fx.Node):
    if node.op not in ("call_function", "call_method"):
        raise PassError(f"node {node.name} ({node.op}) has no recorded value; a pass created it without one")
    if node.op == "call_function" and node.target in _NOT_PROPAGATED:
        return None
    if node.op == "call_method" and node.target.endswith("_"):
        # An in-place write returns what it wrote into, unchanged in shape; running it would
        # mutate the recorded fake value other stages still read.
        return node.args[0].meta["val"]
    try:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)
    except Exception as error:
        raise PassError(
            f"fake-tensor propagation failed at node {node.name} = {getattr(node.target, '__name__', node.target)}"
            f"(...): {type(error).__name__}: {error}"
        ) from error


def _spec(value) -> object:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype, value.device)
    if isinstance(value, (list, tuple)):
        return tuple(_spec(v) for v in value)
    return type(value)


def propagate_values(graph: TrainGraph) -> None:
    """Give every node a pass created `meta["val"]` (shape, dtype) by fake-tensor propagation,
    and recompute the nodes downstream of one whose value changed (a getitem of an update a
    pass replaced by one with other state shapes). Other nodes keep what capture recorded.

    Raises:
      PassError: naming the first node whose value cannot be computed.
    """
    changed: set[fx.Node] = set()
    with graph._fake(), torch.no_grad():
        for node in graph.graph.nodes:
            if node.op not in ("call_function", "call_method") or (
                    node.op == "call_function" and node.target in _NOT_PROPAGATED):
                continue
            old = node.meta.get("val")
            if old is not None and not any(n in changed for n in node.all_input_nodes):
                continue
            node.meta["val"] = _fake_value(node)
            if old is None or _spec(old) != _spec(node.meta["val"]):
                changed.add(node)
