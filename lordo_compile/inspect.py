"""Readable views of a compiled step: graphs as stable text, diffs, DOT/SVG, explain().

Text is stable across runs and machines (no ids, no paths): one line per node,
`name = target(args)  # dtype[shape] role param`, so it can be snapshot-tested.
"""

from __future__ import annotations

import difflib
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.fx as fx

from .graph import PROVENANCE, ROLE, STATE, Role, TrainGraph

_DTYPES = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "b8",
    torch.float8_e4m3fn: "f8e4m3",
}


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = f"{target.namespace}.{target._opname}"
        return name if target._overloadname == "default" else f"{name}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.replace("::", ".")
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    qualname = getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))
    if module in ("_operator", "operator", "builtins"):
        return qualname
    if module.startswith("lordo_compile."):
        return f"{module.removeprefix('lordo_compile.')}.{qualname}"
    return f"{module}.{qualname}" if module else qualname


def _value_type(node: fx.Node) -> str:
    value = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_tensor_type(v) for v in value) + ")"
    return _tensor_type(value)


def _tensor_type(value) -> str:
    if isinstance(value, torch.Tensor):
        dtype = _DTYPES.get(value.dtype, str(value.dtype).removeprefix("torch."))
        return f"{dtype}[{', '.join(str(s) for s in value.shape)}]"
    if value is None:
        return ""
    return type(value).__name__


def _arg(value) -> str:
    if isinstance(value, fx.Node):
        return value.name
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_arg(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return repr(value)


def _annotation(node: fx.Node) -> str:
    parts = [_value_type(node)]
    role = node.meta.get(ROLE)
    if role is not None:
        parts.append(str(role))
    if STATE in node.meta and role in (Role.OPTIMIZER_STATE, Role.WRITEBACK):
        parts.append(f"[{node.meta[STATE]}]")
    provenance = node.meta.get(PROVENANCE)
    if provenance not in (None, "capture"):
        parts.append(f"<{provenance}>")
    return "  ".join(p for p in parts if p)


def node_line(node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"{node.name}: {_annotation(node)}"
    if node.op == "output":
        return f"return {_arg(node.args[0])}"
    args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
    if node.op == "call_function" and node.target is operator.getitem:
        expr = f"{_arg(node.args[0])}[{_arg(node.args[1])}]"
    elif node.op == "call_method":
        expr = f"{_arg(node.args[0])}.{node.target}({', '.join(args[1:])})"
    else:
        expr = f"{_target_name(node)}({', '.join(args)})"
    note = _annotation(node)
    return f"{node.name} = {expr}" + (f"  # {note}" if note else "")


def format_graph(graph: fx.Graph | fx.GraphModule | TrainGraph, title: str | None = None) -> str:
    if isinstance(graph, TrainGraph):
        graph = graph.graph
    elif isinstance(graph, fx.GraphModule):
        graph = graph.graph
    lines = [f"# {title}"] if title else []
    lines += [node_line(node) for node in graph.nodes]
    return "\n".join(lines) + "\n"


def diff_graphs(before: str, after: str, before_name: str = "before", after_name: str = "after") -> str:
    """A unified diff of two formatted graphs."""
    lines = difflib.unified_diff(
        before.splitlines(keepends=True), after.splitlines(keepends=True), before_name, after_name, n=1
    )
    return "".join(lines)


def to_dot(graph: fx.Graph | fx.GraphModule | TrainGraph, name: str = "step") -> str:
    """Graphviz DOT text (no dependency); nodes coloured by role."""
    if isinstance(graph, (TrainGraph, fx.GraphModule)):
        graph = graph.graph
    colours = {
        Role.PARAMETER: "lightblue", Role.OPTIMIZER_STATE: "khaki", Role.BATCH_INPUT: "palegreen",
        Role.HYPERPARAMETER: "lightgrey", Role.LOSS: "salmon", Role.BACKWARD: "orange",
        Role.GRADIENT: "moccasin", Role.COLLECTIVE: "violet", Role.SENT: "violet",
        Role.RECEIVED: "violet", Role.OPTIMIZER_UPDATE: "gold",
        Role.WRITEBACK: "wheat",
    }
    lines = [f'digraph "{name}" {{', "  node [shape=box, style=filled, fontname=monospace];"]
    for node in graph.nodes:
        role = node.meta.get(ROLE)
        label = node.name if node.op in ("placeholder", "output") else f"{node.name}\\n{_target_name(node)}"
        lines.append(f'  "{node.name}" [label="{label}", fillcolor="{colours.get(role, "white")}"];')
        for source in node.all_input_nodes:
            lines.append(f'  "{source.name}" -> "{node.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_svg(graph: fx.Graph | fx.GraphModule | TrainGraph, name: str = "step") -> str:
    """SVG through pydot and the graphviz `dot` program (optional: `pip install lordo-compile[dot]`)."""
    try:
        import pydot
    except ImportError:
        raise ImportError(
            "SVG export needs pydot and graphviz: pip install 'lordo-compile[dot]' and install "
            "graphviz's `dot` program (e.g. apt install graphviz); to_dot() needs neither."
        ) from None
    (dot_graph,) = pydot.graph_from_dot_data(to_dot(graph, name))
    try:
        return dot_graph.create_svg().decode()
    except FileNotFoundError:
        raise ImportError(
            "SVG export needs graphviz's `dot` program on PATH (e.g. apt install graphviz)"
        ) from None


@dataclass
class GraphView:
    """One stage of one graph (a set of events): the graph, as a module and as stable text."""

    events: str
    stage: str
    # What the code generator received (the lowered and aten stages); the rewrites' stages
    # keep their TrainGraph instead.
    module: fx.GraphModule | None
    train_graph: TrainGraph | None = None

    @property
    def text(self) -> str:
        return f'# graph "{self.events}" after {self.stage}\n' + self.body

    @property
    def body(self) -> str:
        """The graph without the title line."""
        return format_graph(self.train_graph or self.module)

    def __str__(self) -> str:
        return self.text

    def to_dot(self) -> str:
        return to_dot(self.train_graph or self.module, f"{self.events}.{self.stage}")

    def to_svg(self) -> str:
        return to_svg(self.train_graph or self.module, f"{self.events}.{self.stage}")


class GraphStages(Mapping[str, GraphView]):
    """The stages of one graph in order: "captured", one per rewrite, "lowered", and "aten"
    once a step has carried its events (it is compiled then)."""

    def __init__(self, events: str) -> None:
        self.events = events
        self._views: dict[str, GraphView] = {}

    def add(self, view: GraphView) -> None:
        self._views[view.stage] = view

    def __getitem__(self, stage: str) -> GraphView:
        return self._views[stage]

    def __iter__(self) -> Iterator[str]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)

    def diff(self, before: str, after: str) -> str:
        return diff_graphs(self[before].body, self[after].body, before, after)

    def __repr__(self) -> str:
        return f"GraphStages({self.events!r}, stages={list(self._views)})"


def _counts(graph: TrainGraph) -> Counter:
    return Counter(
        _target_name(n) for n in graph.graph.nodes if n.op in ("call_function", "call_method")
    )


def describe_stage_change(before: TrainGraph | None, after: TrainGraph) -> list[str]:
    """What a rewrite changed in one graph: ops added/removed, state added with bytes."""
    if before is None:
        return [f"new graph ({len(after.graph.nodes)} nodes)"]
    lines = []
    old, new = _counts(before), _counts(after)
    added = {k: new[k] - old[k] for k in new if new[k] > old[k]}
    removed = {k: old[k] - new[k] for k in old if old[k] > new[k]}
    if added:
        lines.append("added " + ", ".join(f"{v}x {k}" for k, v in sorted(added.items())))
    if removed:
        lines.append("removed " + ", ".join(f"{v}x {k}" for k, v in sorted(removed.items())))
    for name, spec in after.state.items():
        if name not in before.state:
            shape = "x".join(str(s) for s in spec.shape) or "scalar"
            lines.append(f"state {name}: {_DTYPES.get(spec.dtype, spec.dtype)}[{shape}] = {spec.nbytes} bytes")
    return lines or ["no change"]


def role_counts(graph: TrainGraph) -> Counter:
    return Counter(str(n.meta.get(ROLE)) for n in graph.graph.nodes)


def update_counts(graph: TrainGraph) -> Counter:
    return Counter(site.op.qualified_name for site in graph.updates())

