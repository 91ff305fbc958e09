"""The outer step of infrequent synchronization, shared by `sync` and `lordo`; not a pass itself.

    anchor_W                                   held as the weight is held (full precision, or a
                                               weight-storage pass's form: decoded here)
    delta_W = anchor_W - W'                    pseudo-gradient (W': the step's final write of W)
    ... the caller averages delta_W over workers ...
    W~, buf' = lordo.outer_sgd[_momentum](anchor_W, avg_W[, buf_W], lr=, momentum=, nesterov=)
    stored, held = storage.encode(W~)          where the storage rounds: e = W~ - stored goes into
                                               buf' (lordo.outer_error_feedback), or into a
                                               buffer added to the next W~ when there is no momentum
    anchor_W <- held; buf_W <- buf'; W <- stored   every worker resets to the same anchor

Every worker computes the same anchor from the same average, so nothing is broadcast.

Both passes' int8 payloads are the same code: `int8_encoded` (codes and row scales of a
matrix, `lordo.int8_rows`, and what they decode to) and `int8_decoded` (codes times scales).
Both stream alike (ALGORITHMS.md section 9): `fragments` cuts the updated parameters into
F contiguous fragments of about equal size, and fragment f syncs after steps
o_f, o_f + H, ... with o_f = `first_sync_step` = (f + 1) H / F - 1, so the last one syncs
when the whole model would.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph import ROLE, Role, StateSpec, TrainGraph, WeightStorage, tag
from ..ops import op_named
from ..ops.lordo import int8_rows
from ..ops.sync import outer_error_feedback


@dataclass(frozen=True)
class OuterOptimizer:
    """SGD on the anchor with the averaged pseudo-gradient as its gradient (lr 1, no momentum:
    model averaging)."""

    lr: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False


def check_streaming(owner: str, every_field: str, every: int, fragments, delay) -> None:
    """A ValueError naming the field unless 1 <= fragments <= every and 0 <= delay < every."""
    if isinstance(fragments, bool) or not isinstance(fragments, int) or not 1 <= fragments <= every:
        raise ValueError(f"{owner}.fragments must be an int in [1, {every_field}={every}] (one fragment syncs per "
                         f"step at most), got {fragments!r}")
    if isinstance(delay, bool) or not isinstance(delay, int) or not 0 <= delay < every:
        raise ValueError(f"{owner}.delay must be an int in [0, {every_field} - 1 = {every - 1}] (a fragment's "
                         f"result is merged before it syncs again), got {delay!r}")


def first_sync_step(every: int, fragments: int, fragment: int) -> int:
    """o_f: the step after which fragment `fragment` of `fragments` first syncs."""
    return (fragment + 1) * every // fragments - 1


def fragments_of(names: list[str], sizes: list[int], count: int, field: str) -> list[list[str]]:
    """`names` in order, cut into `count` contiguous runs of about equal total size, none empty
    (`field`: the option's name, for the error when there are fewer names than fragments)."""
    if count > len(names):
        raise ValueError(f"{field}={count} is more than the {len(names)} parameters the step updates")
    total, running, fragments = sum(sizes), 0, [[]]
    for i, (name, size) in enumerate(zip(names, sizes)):
        to_start = count - len(fragments)
        # A parameter goes with the fragment its middle falls in.
        if fragments[-1] and to_start and (running + size / 2 >= total * len(fragments) / count
                                           or len(names) - i == to_start):
            fragments.append([])
        fragments[-1].append(name)
        running += size
    return fragments


def fragments_of_step(graph: TrainGraph, count: int, field: str) -> list[list[str]]:
    """The step's updated parameters, in its order, cut into `count` fragments (`fragments_of`)."""
    names = [site.param for site in graph.updates()]
    return fragments_of(names, [math.prod(graph.params[n].shape) for n in names], count, field)


@dataclass
class Anchor:
    """One parameter's anchor: the tensors holding it, its value, and how it is held."""

    param: str
    held: dict[str, fx.Node]
    value: fx.Node
    storage: WeightStorage


def end_of_updates(graph: TrainGraph) -> fx.Node:
    """Where what follows the updates goes (a sync, an exchange): before the step turns
    gradients back on after its updates, else after its last write."""
    nodes = list(graph.graph.nodes)
    last_update = max(i for i, n in enumerate(nodes) if n.meta.get(ROLE) == Role.OPTIMIZER_UPDATE)
    for node in nodes[last_update:]:
        if node.op == "call_function" and node.target is torch._C._set_grad_enabled and node.args == (True,):
            return node
    writes = [i for i, n in enumerate(nodes) if n.meta.get(ROLE) == Role.WRITEBACK]
    return nodes[max(writes)].next


def hold_anchors(graph: TrainGraph, params: list[str], owner: str) -> dict[str, Anchor]:
    """Each parameter's anchor, held as the parameter is, decoded at the insertion point."""
    anchors = {}
    for param in params:
        storage = graph.storage_of(param)
        held = storage.hold(graph, param, "anchor", owner)
        anchors[param] = Anchor(param, held, storage.decode(graph, held, param), storage)
    return anchors


def pseudo_gradients(graph: TrainGraph, anchors: dict[str, Anchor]) -> dict[str, fx.Node]:
    """anchor - W' for every parameter, at the insertion point: positive along descent."""
    g = graph.graph
    deltas = {}
    for param, anchor in anchors.items():
        new = graph.final_write(param).args[1]
        deltas[param] = tag(g.call_function(torch.ops.aten.sub.Tensor, (anchor.value, new)), Role.GRADIENT, param,
                            name=f"pseudo_gradient_{param}")
    return deltas


def apply_outer_step(graph: TrainGraph, anchors: dict[str, Anchor], averaged: dict[str, fx.Node],
                     outer: OuterOptimizer, owner: str, local_weight: float = 0.0) -> dict[str, fx.Node]:
    """The outer step on every anchor from its averaged pseudo-gradient, the anchor and outer
    momentum written, every parameter reset to its anchor (or, with `local_weight` a > 0, to
    a W' + (1 - a) anchor, for weights held in full precision); returns the new anchors' values."""
    g = graph.graph
    op = op_named("outer_sgd_momentum" if outer.momentum else "outer_sgd")
    kwargs = {"lr": float(outer.lr)}
    if outer.momentum:
        kwargs.update(momentum=float(outer.momentum), nesterov=bool(outer.nesterov))
    new_anchors = {}
    for param, anchor in anchors.items():
        info = graph.params[param]
        buffer = None
        if outer.momentum:
            buffer = graph.state_node(StateSpec(name=f"{owner}.outer_momentum.{param}", shape=info.shape,
                                                dtype=info.dtype, owner=owner, param=param, moment="signed"))
        args = (anchor.value, averaged[param]) + ((buffer,) if buffer is not None else ())
        step = tag(g.call_function(op.overload, args, kwargs), Role.OPTIMIZER_UPDATE, param, name=f"{op.name}_{param}")
        tentative, new_buffer = step, None
        if buffer is not None:
            tentative = tag(g.call_function(operator.getitem, (step, 0)), Role.OPTIMIZER_UPDATE, param, "param",
                            name=f"new_anchor_{param}")
            new_buffer = tag(g.call_function(operator.getitem, (step, 1)), Role.OPTIMIZER_UPDATE, param,
                             "momentum_buffer", name=f"new_outer_momentum_{param}")
        if anchor.storage.rounds and buffer is None and anchor.storage.keeps_outer_error:
            carried = graph.state_node(StateSpec(name=f"{owner}.outer_error.{param}", shape=info.shape,
                                                 dtype=info.dtype, owner=owner, param=param, moment="signed"))
            tentative = tag(g.call_function(torch.ops.aten.add.Tensor, (tentative, carried)), Role.OPTIMIZER_UPDATE,
                            param, name=f"anchor_with_carried_error_{param}")
        stored, encoded = anchor.storage.encode(graph, tentative, param, "anchor")
        if anchor.storage.rounds and (new_buffer is not None or anchor.storage.keeps_outer_error):
            error = tag(g.call_function(torch.ops.aten.sub.Tensor, (tentative, stored)), Role.OPTIMIZER_UPDATE, param,
                        name=f"anchor_rounding_error_{param}")
            if new_buffer is not None:
                new_buffer = tag(g.call_function(outer_error_feedback, (new_buffer, error), kwargs),
                                 Role.OPTIMIZER_UPDATE, param, "momentum_buffer", name=f"outer_momentum_fed_{param}")
            elif anchor.storage.keeps_outer_error:
                tag(g.call_method("copy_", (carried, error)), Role.WRITEBACK, param, "outer_error",
                    name=f"write_outer_error_{param}")
        if new_buffer is not None:
            tag(g.call_method("copy_", (buffer, new_buffer)), Role.WRITEBACK, param, "outer_momentum",
                name=f"write_outer_momentum_{param}")
        anchor.storage.write(graph, anchor.held, encoded, param, "anchor")
        if local_weight:
            local = graph.final_write(param).args[1]
            mixed = tag(g.call_function(torch.lerp, (stored, local, float(local_weight))), Role.OPTIMIZER_UPDATE,
                        param, name=f"merged_with_local_{param}")
            anchor.storage.assign(graph, param, mixed, {})
        else:
            anchor.storage.assign(graph, param, stored, encoded)
        new_anchors[param] = stored
    return new_anchors


def int8_decoded(g: fx.Graph, codes: fx.Node, scales: fx.Node) -> fx.Node:
    """What int8 codes say: codes * their row scales, in float32."""
    return g.call_function(torch.mul, (g.call_method("float", (codes,)), scales))


def int8_encoded(g: fx.Graph, matrix: fx.Node, param: str) -> tuple[fx.Node, fx.Node, fx.Node]:
    """Int8 codes (rows, cols) and absmax row scales (rows, 1) of `matrix`, tagged as the
    parameter's gradient payload, and what they decode to (the sender keeps the difference)."""
    pair = g.call_function(int8_rows, (matrix,))
    codes = tag(g.call_function(operator.getitem, (pair, 0)), Role.GRADIENT, param, name=f"int8_codes_{param}")
    scales = tag(g.call_function(operator.getitem, (pair, 1)), Role.GRADIENT, param, name=f"int8_scales_{param}")
    return codes, scales, int8_decoded(g, codes, scales)
