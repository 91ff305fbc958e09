"""Byte accounting: every collective the compiled step issues, counted per graph.

What a graph (one set of events) sends is fixed when it is compiled (the collectives in
it and their sizes), so the runtime counts how often each graph ran and multiplies.
"Bytes sent per worker" is the payload each worker contributes to a collective: for an
all-reduce, the size of the tensor reduced. (A ring all-reduce moves 2(K-1)/K of that per
worker on the wire; the ratios between policies are the same either way.) Torch's
functional collectives are counted here; a pass whose own op sends something (a
point-to-point exchange) counts it in its runtime's `collectives` hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch.fx as fx

from ..graph import TrainGraph


@dataclass(frozen=True)
class Collective:
    op: str
    reduce: str
    group: str
    payload_bytes: int
    # False for one the runtime issues after the graph (an overlapped sync's): the graph's own
    # failures are then not a collective's.
    in_graph: bool = True


def collectives_in(graph: TrainGraph, hooks: Sequence = ()) -> list[Collective]:
    """Torch's functional collectives in `graph`, then those each pass runtime in `hooks` reports."""
    found = []
    for node in graph.nodes():
        packet = getattr(node.target, "_overloadpacket", node.target)
        name = getattr(packet, "_qualified_op_name", "")
        if node.op != "call_function" or not name.startswith("_c10d_functional::") or "wait" in name:
            continue
        value = _input_value(node)
        found.append(Collective(name.split("::")[1], str(node.args[1]), str(node.args[-1]),
                                value.numel() * value.element_size()))
    for hook in hooks:
        found += hook.collectives(graph)
    return found


def _input_value(node: fx.Node):
    source = node.args[0]
    return source.meta.get("val", source.meta.get("example_value"))


@dataclass
class CommReport:
    """Totals since the step was created, per graph (set of events) and overall."""

    per_graph: dict[str, list[Collective]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    steps: int = 0

    def graph_bytes(self, name: str) -> int:
        return sum(c.payload_bytes for c in self.per_graph.get(name, [])) * self.calls.get(name, 0)

    @property
    def bytes_sent(self) -> int:
        return sum(self.graph_bytes(p) for p in self.per_graph)

    @property
    def collectives(self) -> int:
        return sum(len(c) * self.calls.get(p, 0) for p, c in self.per_graph.items())

    @property
    def bytes_per_step(self) -> float:
        return self.bytes_sent / self.steps if self.steps else 0.0

    def per_group(self) -> dict[str, tuple[int, int]]:
        """(collectives, bytes sent per worker) over each process group, by its name: where
        workers combine over two groups, what crossed each one's links."""
        totals: dict[str, tuple[int, int]] = {}
        for name, collectives in self.per_graph.items():
            runs = self.calls.get(name, 0)
            for c in collectives:
                count, sent = totals.get(c.group, (0, 0))
                totals[c.group] = (count + runs, sent + runs * c.payload_bytes)
        return totals

    def __str__(self) -> str:
        width = max([len("graph")] + [len(name) for name in self.per_graph])
        lines = [f"{'graph':<{width}} {'runs':>6} {'collectives/run':>16} {'bytes/run':>14} {'bytes sent':>14}"]
        for name, collectives in self.per_graph.items():
            per_run = sum(c.payload_bytes for c in collectives)
            lines.append(f"{name:<{width}} {self.calls.get(name, 0):>6} {len(collectives):>16} {per_run:>14,} "
                         f"{self.graph_bytes(name):>14,}")
        groups = self.per_group()
        if len(groups) > 1:
            lines += [f"group {group}: {count} collectives, {sent:,} bytes sent per worker"
                      for group, (count, sent) in groups.items()]
        lines.append(f"total: {self.collectives} collectives, {self.bytes_sent:,} bytes sent per worker over "
                     f"{self.steps} steps ({self.bytes_per_step:,.0f} per step)")
        return "\n".join(lines)
