"""Collective nodes in a TrainGraph: find the step's own mean all-reduces, insert new ones.

Helpers for the passes that decide what crosses the network; not a pass itself. Collectives are torch's functional collectives
(`_c10d_functional.all_reduce` + `wait_tensor`), which dynamo records for
`torch.distributed.all_reduce` as well, and which Inductor lowers on gloo and NCCL alike.
"""

from __future__ import annotations

import operator

from typing import Callable

import torch
import torch.fx as fx

from ..distributed import group_name, rank, spans_every_worker, two_levels, world_size  # noqa: F401  (the passes' one import for groups)
from ..errors import user_line
from ..graph import PARAM, PROVENANCE, ROLE, Role, TrainGraph

ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
# Why two passes that each decide how workers combine are refused together.
WORKERS_COMBINE = "each decides how workers combine; a step has one way (use one of them)"
# Why an every-step average (DDP) and a periodic one (local SGD, DiLoCo, LoRDO) meet only on two levels.
EVERY_STEP_AND_PERIODIC = (
    WORKERS_COMBINE + ": averaging every gradient every step keeps the models equal, so a periodic average changes "
    "nothing, unless the two run over the inner and outer groups of a 2-D arrangement (mesh=)")


def over_two_levels(every_step, periodic) -> bool:
    """Whether the options of an every-step and a periodic pass combine workers over the inner
    and the outer level of one 2-D arrangement (`distributed.two_levels`)."""
    return two_levels(every_step.group, periodic.group)
WAIT = torch.ops._c10d_functional.wait_tensor.default


# On an all-reduce `insert_mean_all_reduce` placed in buckets: to overlap the compute after it.
OVERLAP = "lordo_overlap"


def _packet(target) -> object:
    return getattr(target, "_overloadpacket", target)


def is_all_reduce(node: fx.Node) -> bool:
    return node.op == "call_function" and _packet(node.target) is torch.ops._c10d_functional.all_reduce


def _is_wait(node: fx.Node) -> bool:
    return node.op == "call_function" and _packet(node.target) is torch.ops._c10d_functional.wait_tensor


def _is_division(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.truediv, torch.div, torch.true_divide)) or (
        node.op == "call_method" and node.target in ("div", "true_divide")
    )


def mean_all_reduce(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """If `node` is the result of averaging a tensor over workers, (that tensor, node).

    Recognised: `wait(all_reduce(x, "avg"))` and `wait(all_reduce(x, "sum")) / k`.
    """
    if _is_division(node) and isinstance(node.args[0], fx.Node) and _is_wait(node.args[0]):
        reduced = node.args[0].args[0]
        if is_all_reduce(reduced) and reduced.args[1] == "sum":
            return reduced.args[0], node
    if _is_wait(node) and is_all_reduce(node.args[0]) and node.args[0].args[1] == "avg":
        return node.args[0].args[0], node
    return None


def remove_gradient_all_reduces(graph: fx.Graph, why: str) -> int:
    """Replace every mean all-reduce the step itself wrote by the local tensor; returns how
    many. Those an earlier pass inserted stay (DDP's over the inner level of two).

    An all-reduce that is not a mean (a sum used as is, a max) has no local equivalent
    this can substitute, and is refused naming its line.
    """
    removed = 0
    for node in list(graph.nodes):
        found = mean_all_reduce(node)
        if found is not None and _captured(found[1]):
            local, result = found
            result.replace_all_uses_with(local)
            _erase_chain(graph, result)
            removed += 1
    for node in graph.nodes:
        if is_all_reduce(node) and _captured(node):
            raise NotImplementedError(
                f"{why} replaces the step's gradient averaging, but the all-reduce at "
                f"{user_line(node.meta.get('stack_trace'))} is not a mean (reduce op "
                f"{node.args[1]!r} without a division by the world size). Average the gradient "
                "(all_reduce then divide by the world size, or op 'avg'), or remove the all-reduce."
            )
    return removed


def _captured(node: fx.Node) -> bool:
    return node.meta.get(PROVENANCE) == "capture"


def _erase_chain(graph: fx.Graph, node: fx.Node) -> None:
    while node is not None and not node.users:
        inputs = [a for a in node.all_input_nodes if _is_wait(a) or is_all_reduce(a)]
        graph.erase_node(node)
        node = inputs[0] if inputs else None


ALL_GATHER = torch.ops._c10d_functional.all_gather_into_tensor.default


def _bucketed(graph: TrainGraph, values: list[fx.Node], role: Role, params: list[str],
              collective: Callable[[fx.Graph, fx.Node], fx.Node], leading: tuple[int, ...],
              bucket_bytes: tuple[int, int] | None = None) -> list[fx.Node]:
    """Flatten `values` into buffers (buckets), run `collective` on each, and cut the result
    back into tensors shaped `leading + value.shape`.

    One bucket per dtype, inserted after the last value; or, with `bucket_bytes = (first,
    rest)`, buckets filled in the order of `values` (the first up to `first` bytes, the others
    up to `rest`; a value larger than its bucket's cap gets one of its own), each inserted after
    its own last value and the bucket before it, so that its collective can start while later
    values are computed.
    """
    g = graph.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    results: list[fx.Node | None] = [None] * len(values)
    point = max(values, key=order.__getitem__).next
    placed = -1
    for indices in _buckets(graph, values, bucket_bytes):
        last = max((values[i] for i in indices), key=order.__getitem__)
        # Buckets go in the order of `values` (every worker issues them in that order).
        if bucket_bytes is not None and order[last] > placed:
            placed, point = order[last], last.next
        # inserting_before a fixed node keeps creation order, so each node follows its inputs.
        with g.inserting_before(point):
            flat = [g.call_method("reshape", (values[i], -1)) for i in indices]
            bucket = g.call_function(torch.cat, (flat,))
            waited = collective(g, bucket)
            rows = g.call_method("reshape", (waited, *leading, -1)) if leading else waited
            sizes = [graph.value(values[i]).numel() for i in indices]
            pieces = g.call_function(torch.split, (rows, sizes), {"dim": len(leading)} if leading else {})
            for n in (*flat, bucket, rows, pieces):
                n.meta.setdefault(ROLE, role)
            for k, i in enumerate(indices):
                piece = g.call_function(operator.getitem, (pieces, k))
                shaped = g.call_method("reshape", (piece, (*leading, *graph.value(values[i]).shape)))
                for n in (piece, shaped):
                    n.meta.update({ROLE: role, PARAM: params[i]})
                results[i] = shaped
    return results  # type: ignore[return-value]


def _buckets(graph: TrainGraph, values: list[fx.Node], bucket_bytes: tuple[int, int] | None) -> list[list[int]]:
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i in range(len(values)):
        by_dtype.setdefault(graph.value(values[i]).dtype, []).append(i)
    if bucket_bytes is None:
        return list(by_dtype.values())
    buckets: list[list[int]] = []
    for indices in by_dtype.values():
        cap, filled = bucket_bytes[0], None
        for i in indices:
            size = graph.value(values[i]).numel() * graph.value(values[i]).element_size()
            if filled is None or (filled and filled + size > cap):
                cap = bucket_bytes[0] if filled is None else bucket_bytes[1]
                buckets.append([])
                filled = 0
            buckets[-1].append(i)
            filled += size
    return buckets


def insert_mean_all_reduce(graph: TrainGraph, values: list[fx.Node], group: str, role: Role,
                           params: list[str], bucket_bytes: tuple[int, int] | None = None) -> list[fx.Node]:
    """Average `values` over workers with one all-reduce per bucket (per dtype, or by
    `bucket_bytes`: see `_bucketed`), each inserted after its bucket's last value; with
    `bucket_bytes`, each is marked to overlap the compute after it (`OVERLAP`).

    Returns the averaged tensors, shaped as the inputs.
    """

    def all_reduce(g: fx.Graph, bucket: fx.Node) -> fx.Node:
        reduced = g.call_function(ALL_REDUCE, (bucket, "avg", group))
        waited = g.call_function(WAIT, (reduced,))
        for n in (reduced, waited):
            n.meta[ROLE] = Role.COLLECTIVE
        if bucket_bytes is not None:
            reduced.meta[OVERLAP] = True
        return waited

    return _bucketed(graph, values, role, params, all_reduce, (), bucket_bytes)


def insert_all_gather(graph: TrainGraph, values: list[fx.Node], group: str, world: int, role: Role,
                      params: list[str]) -> list[fx.Node]:
    """Gather `values` from every worker (one collective per dtype), inserted after the last.

    Returns, for each value, a tensor of shape (world, *value.shape): one row per worker,
    in rank order, identical on every worker.
    """

    def all_gather(g: fx.Graph, bucket: fx.Node) -> fx.Node:
        gathered = g.call_function(ALL_GATHER, (bucket, world, group))
        waited = g.call_function(WAIT, (gathered,))
        for n in (gathered, waited):
            n.meta[ROLE] = Role.COLLECTIVE
        return waited

    return _bucketed(graph, values, role, params, all_gather, (world,))


_COLLECTIVES = {torch.ops._c10d_functional.all_reduce, torch.ops._c10d_functional.all_gather_into_tensor,
                torch.ops._c10d_functional.reduce_scatter_tensor, torch.ops._c10d_functional.all_to_all_single,
                torch.ops._c10d_functional.broadcast}
# Ops that only lay out their inputs (a bucket's concatenation, a gradient's views): moving one
# next to a collective costs no compute order.
_LAYOUT = {torch.ops.aten.cat, torch.ops.aten._unsafe_view, torch.ops.aten.split_with_sizes, torch.ops.aten.split}


def schedule_collectives(module: fx.GraphModule) -> None:
    """Start every collective of an aten graph as soon as its inputs exist, and wait for it
    only where its result is first computed with, so that it runs while the nodes in between
    compute (a gradient bucket's all-reduce during the rest of the backward). A rewrite for
    `Lowering.aten_rewrites`.

    AOTAutograd writes a step's backward as one run of ops with the collectives after it, the
    order of the traced program; here only the collectives, their waits and the layout ops
    (views, concatenations, splits) that feed or cut them move. Compute keeps its order, and
    so do the collectives among themselves (every worker issues them in the same order).
    """
    graph = module.graph
    for node in [n for n in graph.nodes if _op(n) in _COLLECTIVES]:
        _raise(node)
    for node in [n for n in graph.nodes if _is_wait(n)]:
        _sink(node)
    graph.lint()
    module.recompile()


def _op(node: fx.Node):
    return _packet(node.target) if node.op == "call_function" else None


def _lays_out(node: fx.Node) -> bool:
    return node.op == "call_function" and (
        _op(node) in _LAYOUT or getattr(node.target, "is_view", False) or node.target is operator.getitem)


def _raise(node: fx.Node) -> None:
    """Move `node` (and the layout ops it reads, first) to just after its last input, the
    last collective before it, or the last op that writes in place (whose write it might read)."""
    for source in node.all_input_nodes:
        if _lays_out(source):
            _raise(source)
    last = node.prev
    while (last not in node.all_input_nodes and not _writes(last) and _op(last) not in _COLLECTIVES
           and last.op not in ("root", "placeholder")):
        last = last.prev
    last.append(node)


def _writes(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _sink(node: fx.Node) -> None:
    """Move `node` (and the layout ops that read it, first) to just before its first reader."""
    for reader in list(node.users):
        if _lays_out(reader):
            _sink(reader)
    readers = set(node.users)
    if not readers:
        return
    first = node.next
    while first not in readers:
        first = first.next
    first.prepend(node)
