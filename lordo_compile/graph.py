"""TrainGraph: a captured training step as an FX graph whose nodes know their role.

Every node carries `node.meta["lordo_role"]` (a `Role`); nodes that belong to one
parameter carry `meta["lordo_param"]` (its name) and optimizer state carries
`meta["lordo_state"]` (the state key). Each node records the stage that made it in
`meta["lordo_pass"]` ("capture", or a pass's name).

Placeholders come in two kinds: the inputs dynamo passes at every call (parameters,
batch, optimizer state, hyperparameters), and state a pass asked for, which the runtime
allocates from a `StateSpec` and appends after them.
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

from .ops import CanonicalOp, canonical_op

ROLE = "lordo_role"
PARAM = "lordo_param"
STATE = "lordo_state"
PROVENANCE = "lordo_pass"
INPUT = "lordo_input"


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
    <seed>), or "copy:<parameter name>" (the parameter's value when first allocated).
    `holds` says what it is: "state" (optimizer or pass state) or "weight" (the stored form
    of a parameter, e.g. ECO's codes and scales), which the memory report counts as weights.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    owner: str
    param: str | None = None
    init: str = "zeros"
    holds: str = "state"

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


@dataclass
class TrainGraph:
    module: fx.GraphModule
    phase: str
    params: dict[str, ParamInfo]
    num_dynamo_inputs: int
    state: dict[str, StateSpec] = field(default_factory=dict)

    @property
    def graph(self) -> fx.Graph:
        return self.module.graph

    def copy(self, phase: str | None = None) -> "TrainGraph":
        """A copy a pass may edit; node meta is copied shallowly, tensors are shared."""
        graph = fx.Graph()
        output = graph.graph_copy(self.graph, {})
        graph.output(output)
        old_output = next(iter(reversed(self.graph.nodes)))
        new_output = next(iter(reversed(graph.nodes)))
        new_output.meta = dict(old_output.meta)
        module = fx.GraphModule(self.module, graph, class_name=type(self.module).__name__)
        return TrainGraph(module, phase or self.phase, dict(self.params), self.num_dynamo_inputs, dict(self.state))

    def nodes(self, role: Role | None = None) -> Iterator[fx.Node]:
        for node in self.graph.nodes:
            if role is None or node.meta.get(ROLE) == role:
                yield node

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def updates(self) -> list[UpdateSite]:
        sites = []
        for node in self.graph.nodes:
            op = canonical_op(node.target) if node.op == "call_function" else None
            if op is not None:
                sites.append(UpdateSite(node, op, node.meta[PARAM]))
        return sites

    def add_state(self, spec: StateSpec) -> fx.Node:
        """A placeholder for runtime-owned state, appended after every other input."""
        if spec.name in self.state:
            raise ValueError(f"state {spec.name!r} is already declared in phase {self.phase!r}")
        last = self.placeholders()[-1]
        with self.graph.inserting_after(last):
            node = self.graph.placeholder(identifier(spec.name))
        node.meta.update({ROLE: Role.OPTIMIZER_STATE, STATE: spec.name, INPUT: ("state", spec.name)})
        if spec.param is not None:
            node.meta[PARAM] = spec.param
        node.meta["val"] = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
        self.state[spec.name] = spec
        return node

    def to_networkx(self) -> nx.DiGraph:
        """Data dependencies between nodes (by node name)."""
        dag = nx.DiGraph()
        for node in self.graph.nodes:
            dag.add_node(node.name)
            for source in node.all_input_nodes:
                dag.add_edge(source.name, node.name)
        return dag

    def recompile(self) -> None:
        self.graph.lint()
        self.module.recompile()


def _as_meta(value):
    if isinstance(value, torch.Tensor):
        if any(not isinstance(s, int) for s in value.shape):
            raise TypeError("symbolic shape")
        return torch.empty_strided(tuple(value.shape), tuple(value.stride()), dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_as_meta(v) for v in value)
    return value


def propagate_meta(graph: fx.Graph) -> None:
    """Recompute `meta["val"]` (shape and dtype) of every node a pass may have changed.

    Each node is run on meta tensors; nodes that cannot run that way (autograd calls,
    grad-mode switches, symbolic shapes) keep what capture recorded.
    """
    # no_grad restores grad mode on exit, whatever a `_set_grad_enabled` node does to it.
    with torch.no_grad():
        for node in graph.nodes:
            if node.op in ("call_function", "call_method") and node.target is not torch.autograd.grad:
                _propagate(node)


def _propagate(node: fx.Node) -> None:
    try:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: _as_meta(_value(n)))
        if node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            value = node.target(*args, **kwargs)
    except Exception:
        return
    node.meta["val"] = value


def _value(node: fx.Node):
    value = node.meta.get("val", node.meta.get("example_value"))
    if value is None:
        raise TypeError(f"{node.name} has no recorded value")
    return value
