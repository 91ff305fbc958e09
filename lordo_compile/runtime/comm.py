"""Byte accounting: every collective the compiled step issues, counted per phase.

What a phase sends is fixed when it is compiled (the collectives in its graph and their
sizes), so the runtime counts how often each phase ran and multiplies. "Bytes sent per
worker" is the payload each worker contributes to a collective: for an all-reduce, the
size of the tensor reduced. (A ring all-reduce moves 2(K-1)/K of that per worker on the
wire; the ratios between policies are the same either way.) A point-to-point
`lordo.neighbour_exchange` (gossip) counts its buffer once per receiving neighbour: what
it puts on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ..graph import TrainGraph
from ..ops.gossip import NEIGHBOUR_EXCHANGE, exchange_bytes


@dataclass(frozen=True)
class Collective:
    op: str
    reduce: str
    group: str
    payload_bytes: int


def collectives_in(graph: TrainGraph) -> list[Collective]:
    found = []
    for node in graph.nodes():
        if node.op == "call_function" and node.target is NEIGHBOUR_EXCHANGE:
            found.append(Collective("neighbour_exchange", "point-to-point", str(node.args[1]), exchange_bytes(node)))
            continue
        packet = getattr(node.target, "_overloadpacket", node.target)
        name = getattr(packet, "_qualified_op_name", "")
        if node.op != "call_function" or not name.startswith("_c10d_functional::") or "wait" in name:
            continue
        value = _input_value(node)
        found.append(Collective(name.split("::")[1], str(node.args[1]), str(node.args[-1]),
                                value.numel() * value.element_size()))
    return found


def _input_value(node: fx.Node):
    source = node.args[0]
    return source.meta.get("val", source.meta.get("example_value"))


@dataclass
class CommReport:
    """Totals since the step was created, per phase and overall."""

    per_phase: dict[str, list[Collective]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    steps: int = 0

    def phase_bytes(self, phase: str) -> int:
        return sum(c.payload_bytes for c in self.per_phase.get(phase, [])) * self.calls.get(phase, 0)

    @property
    def bytes_sent(self) -> int:
        return sum(self.phase_bytes(p) for p in self.per_phase)

    @property
    def collectives(self) -> int:
        return sum(len(c) * self.calls.get(p, 0) for p, c in self.per_phase.items())

    @property
    def bytes_per_step(self) -> float:
        return self.bytes_sent / self.steps if self.steps else 0.0

    def __str__(self) -> str:
        lines = [f"{'phase':<14} {'runs':>6} {'collectives/run':>16} {'bytes/run':>14} {'bytes sent':>14}"]
        for phase, collectives in self.per_phase.items():
            per_run = sum(c.payload_bytes for c in collectives)
            lines.append(f"{phase:<14} {self.calls.get(phase, 0):>6} {len(collectives):>16} {per_run:>14,} "
                         f"{self.phase_bytes(phase):>14,}")
        lines.append(f"total: {self.collectives} collectives, {self.bytes_sent:,} bytes sent per worker over "
                     f"{self.steps} steps ({self.bytes_per_step:,.0f} per step)")
        return "\n".join(lines)
