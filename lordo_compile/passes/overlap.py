"""The run-time half of an overlapped sync (`delay` >= 1), shared by `sync` and `lordo`.

A sync graph writes what a fragment sends into state buffers, and marks each write with
`SENT_OVER` (a `Transfer`: the buffer, where what arrives goes, the collective, the group).
`Overlap` starts those collectives after the graph, without waiting, and waits for a
fragment's before the graph that merges it (its option's `merge_event(f)`, `delay` steps
later) or before a checkpoint is read or loaded. The option it serves has `group`,
`fragments`, `delay` and `merge_event`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

import torch.fx as fx

from ..graph import STATE, Role, TrainGraph, events_name, tag
from ..runtime.comm import Collective
from ..runtime.executor import CollectiveError
from .manager import PassRuntime

# On the write of a payload the runtime sends after the graph: the group's functional-collective name.
SENT_OVER = "lordo_sent_over"


@dataclass(frozen=True)
class Transfer:
    """One buffer of fragment `fragment` the runtime sends after a graph: `sent` (state name)
    by collective `op` over `group`, into `received` (the same buffer for an all-reduce)."""

    fragment: int
    sent: str
    received: str
    op: str
    group: str


def write_payload(graph: TrainGraph, fragment: int, target: fx.Node, received: fx.Node, value: fx.Node,
                  group: str | None) -> int:
    """Write `value` into the state buffer `target` at the insertion point, marked for the
    runtime to send over `group` after the graph (an all-reduce in place when `received` is
    `target`, else an all-gather into `received`); with one worker (no group) what it would
    gather is its own payload. Returns the bytes sent."""
    g = graph.graph
    state = target.meta[STATE]
    write = tag(g.call_method("copy_", (target, value)), Role.WRITEBACK, state=state, name=f"write_{target.name}")
    if group:
        op = "all_reduce" if received is target else "all_gather_into_tensor"
        write.meta[SENT_OVER] = Transfer(fragment, state, received.meta[STATE], op, group)
    elif received is not target:
        tag(g.call_method("copy_", (received, value)), Role.WRITEBACK, state=received.meta[STATE],
            name=f"write_{received.name}")
    return graph.value(target).numel() * graph.value(target).element_size()


class Overlap(PassRuntime):
    """Starts each payload's collective after the graph that wrote it, without waiting; waits
    for it before the graph that merges it (or before a checkpoint is read or loaded)."""

    def __init__(self, option: Sync, context) -> None:
        super().__init__(option, context)
        # Per graph, fixed at capture: what it sends, and which fragments it merges.
        self.transfers = {name: [n.meta[SENT_OVER] for n in graph.nodes() if SENT_OVER in n.meta]
                          for name, graph in context.graphs.items()}
        self.merges = {name: [f for f in range(option.fragments) if option.merge_event(f) in graph.events]
                       for name, graph in context.graphs.items()}
        self.pending: dict[int, list[dist.Work]] = {}

    def after_call(self, events: frozenset[str]) -> bool:
        tensors = self.context.runtime.tensors
        for transfer in self.transfers[events_name(events)]:
            sent, received = tensors[transfer.sent], tensors[transfer.received]
            if transfer.op == "all_reduce":
                work = dist.all_reduce(sent, group=self.option.group, async_op=True)
            else:
                work = dist.all_gather_single(received, sent, group=self.option.group, async_op=True)
            self.pending.setdefault(transfer.fragment, []).append(work)
        return True

    def around_call(self, events: frozenset[str]):
        for f in self.merges[events_name(events)]:
            self._wait(f)
        return None

    def settle(self) -> None:
        for f in list(self.pending):
            self._wait(f)

    def _wait(self, fragment: int) -> None:
        try:
            for work in self.pending.pop(fragment, []):
                work.wait()
        except Exception as error:
            raise CollectiveError(
                f"step {self.context.runtime.step}: the collective of sync fragment {fragment}, started "
                f"{self.option.delay} step(s) ago, failed: {type(error).__name__}: {error}. A worker has probably "
                "died or lost its connection. Restart every worker from the last checkpoint."
            ) from error

    def collectives(self, graph: TrainGraph) -> list[Collective]:
        return [Collective(node.meta[SENT_OVER].op, "sum" if node.meta[SENT_OVER].op == "all_reduce" else "",
                           node.meta[SENT_OVER].group,
                           graph.value(node.args[0]).numel() * graph.value(node.args[0]).element_size(),
                           in_graph=False)
                for node in graph.nodes() if SENT_OVER in node.meta]
