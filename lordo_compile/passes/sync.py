"""Infrequent synchronization (local SGD, DiLoCo): H local steps, then one outer step.

ALGORITHMS.md section 2.

    every step (stage COMBINE): the step's own gradient averaging removed; each worker's
        inner optimizer (state and all) stays local.
    event "sync" (after steps H, 2H, ...; stage SYNC): after the local step, for every parameter
        delta_W = anchor_W - W'                       pseudo-gradient, positive along descent
        avg     = wait(all_reduce(cat(deltas), "avg")) one collective for the whole model
        anchor_W', buf_W' = lordo.outer_sgd_momentum(anchor_W, avg_W, buf_W, lr=, momentum=, nesterov=)
        anchor_W.copy_(anchor_W'); W.copy_(anchor_W')   every worker resets to the same anchor

The outer step is `outer.py`'s: the anchors are held as the weights are (full precision,
or a weight-storage pass's form, whose rounding error goes into the outer momentum).
W' is what the local step writes into W, after every earlier rewrite (a CAGE correction,
a lookahead, a requantization).

Streaming (`fragments=F`, Streaming DiLoCo; ALGORITHMS.md section 9): the
parameters, in the step's order, are cut into F contiguous fragments of about equal size;
fragment f syncs alone, as above, after steps o_f, o_f + H, ... with o_f = (f + 1) H / F - 1
(event "sync.f"), so each sync sends about 1/F of the model and the last fragment syncs
when the whole model would.

Overlap (`delay=tau >= 1`, Streaming DiLoCo's overlapped communication): at fragment f's sync
step the graph only writes what it sends,

    payload_f <- cat(delta_W for W in f) / workers                               (SENT)

and the runtime starts a sum all-reduce of payload_f after the graph, without waiting; the
local steps go on while it is in flight. At the step `tau` steps later (event "merge.f"),
the runtime waits for it before the graph, which reads the average (RECEIVED) and runs the
outer step above, each parameter then set to

    W <- a W' + (1 - a) anchor_W'        a = `local_weight` (0: the global value alone)

so the local steps of those tau steps are kept in proportion a. A checkpoint waits for what
is in flight first.

int8 payload (`payload="int8"`): each worker sends int8 codes of y_W = delta_W + e_W with an
absmax scale per row (`lordo.int8_rows`) and keeps e_W <- y_W - codes * scale; every worker
gathers every worker's codes and scales and averages what they decode to (two all-gathers:
in the sync graph, or, with tau >= 1, started by the runtime into `sync.received.f.*`).
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph import Role, StateSpec, TrainGraph, tag
from .collectives import (group_name, insert_all_gather, insert_mean_all_reduce, remove_gradient_all_reduces,
                          world_size)
from .manager import Event, PassResult, Program, Stage, register_pass
from .outer import (OuterOptimizer, apply_outer_step, check_streaming, end_of_updates, first_sync_step,
                    fragments_of_step, hold_anchors, int8_decoded, int8_encoded, pseudo_gradients)
from .overlap import Overlap, write_payload


# What a sync sends: the pseudo-gradients, or their int8 codes and row scales (error fed back).
PAYLOADS = ("full", "int8")


@dataclass(frozen=True, kw_only=True)
class Sync:
    """Synchronize every `every` steps with an outer SGD step on the averaged pseudo-gradient.

    `outer_lr=1` without momentum is plain model averaging (local SGD); DiLoCo uses
    `outer_lr=0.7, outer_momentum=0.9, nesterov=True`. `group` is the process group (None:
    the default group); its timeout bounds how long a worker waits for a dead peer.
    `fragments`: sync the model in this many fragments at staggered steps (streaming).
    `delay`: steps a fragment's all-reduce overlaps before its result is merged (tau; 0: the
    sync step waits for it). `local_weight`: the share of the local parameters in the merged
    ones (alpha; 0: every worker takes the global value).

    Raises:
      ValueError: if `every` < 1, `outer_lr` <= 0, `outer_momentum` is outside [0, 1),
        `nesterov` is set without momentum, `fragments` is not in [1, every], `delay` is
        not in [0, every - 1], or `local_weight` is outside [0, 1).
    """

    every: int
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    nesterov: bool = False
    group: object = None
    fragments: int = 1
    delay: int = 0
    local_weight: float = 0.0
    payload: str = "full"

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"Sync.every (sync_every) must be an int >= 1, got {self.every!r}")
        if not isinstance(self.outer_lr, numbers.Real) or not self.outer_lr > 0:
            raise ValueError(f"Sync.outer_lr must be > 0, got {self.outer_lr!r}")
        if not isinstance(self.outer_momentum, numbers.Real) or not 0 <= self.outer_momentum < 1:
            raise ValueError(f"Sync.outer_momentum must be in [0, 1), got {self.outer_momentum!r}")
        if self.nesterov and self.outer_momentum == 0:
            raise ValueError("Sync.nesterov=True needs outer_momentum > 0")
        check_streaming("Sync", "every", self.every, self.fragments, self.delay)
        if not isinstance(self.local_weight, numbers.Real) or not 0 <= self.local_weight < 1:
            raise ValueError(f"Sync.local_weight must be in [0, 1) (1 would never take the global value), got "
                             f"{self.local_weight!r}")
        if self.payload not in PAYLOADS:
            raise ValueError(f"Sync.payload must be one of {PAYLOADS}, got {self.payload!r}")

    def event(self, fragment: int) -> str:
        return "sync" if self.fragments == 1 else f"sync.{fragment}"

    def merge_event(self, fragment: int) -> str:
        """Where fragment `fragment`'s overlapped all-reduce is merged (`delay` >= 1)."""
        return "merge" if self.fragments == 1 else f"merge.{fragment}"

    @property
    def outer(self) -> OuterOptimizer:
        return OuterOptimizer(self.outer_lr, self.outer_momentum, self.nesterov)


def _first_sync(option: Sync, fragment: int) -> int:
    return first_sync_step(option.every, option.fragments, fragment)


def _events(option: Sync) -> tuple[Event, ...]:
    syncs = tuple(Event(option.event(f), every=option.every, first=_first_sync(option, f))
                  for f in range(option.fragments))
    if not option.delay:
        return syncs
    return syncs + tuple(Event(option.merge_event(f), every=option.every, first=_first_sync(option, f) + option.delay)
                         for f in range(option.fragments))


def local_steps(program: Program, option: Sync) -> PassResult:
    """Every step: the step's own gradient averaging removed; inner optimizer state stays local."""
    removed = remove_gradient_all_reduces(program.graph.graph, "Policy.local_sgd / diloco")
    return PassResult(program, (f"local steps: removed {removed} gradient all-reduce(s); inner optimizer state "
                                "stays local",))


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """A parameter as the matrix its int8 payload scales by row: (first dim, the rest)."""
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, math.prod(shape) // rows


def _int8_codes(graph: TrainGraph, names: list[str], deltas: dict[str, fx.Node]) -> dict[str, tuple[fx.Node, fx.Node]]:
    """Per parameter: int8 codes (rows, cols) and row scales (rows, 1) of y = delta + the error
    the last payload dropped; that error becomes y - what the codes say."""
    g = graph.graph
    encoded = {}
    for name in names:
        info = graph.params[name]
        error = graph.state_node(StateSpec(name=f"sync.payload_error.{name}", shape=info.shape, dtype=info.dtype,
                                           owner="sync", param=name, moment="signed"))
        y = tag(g.call_function(torch.ops.aten.add.Tensor, (deltas[name], error)), Role.GRADIENT, name,
                name=f"payload_input_{name}")
        codes, scales, decoded = int8_encoded(g, g.call_method("reshape", (y, *_rows(info.shape))), name)
        sent = g.call_method("reshape", (decoded, info.shape))
        tag(g.call_method("copy_", (error, g.call_function(torch.ops.aten.sub.Tensor, (y, sent)))), Role.WRITEBACK,
            name, "payload_error", name=f"write_payload_error_{name}")
        encoded[name] = codes, scales
    return encoded


def _int8_mean(graph: TrainGraph, name: str, codes: fx.Node, scales: fx.Node) -> fx.Node:
    """The mean over workers of what their codes (workers, rows, cols) and scales (workers, rows, 1) say."""
    g = graph.graph
    info = graph.params[name]
    mean = g.call_method("mean", (int8_decoded(g, codes, scales), 0))
    return g.call_method("to", (g.call_method("reshape", (mean, info.shape)), info.dtype))


def _check_mixable(graph: TrainGraph, option: Sync, names: list[str]) -> None:
    rounding = [n for n in names if graph.storage_of(n).rounds]
    if option.local_weight and rounding:
        raise NotImplementedError(
            f"Sync.local_weight={option.local_weight} with parameter {rounding[0]!r} held in a rounded form (ECO): "
            "a mix of local and global values would need its own rounding. Use local_weight=0.")


def _buffers(graph: TrainGraph, option: Sync, fragment: int, names: list[str]) -> dict[str, fx.Node]:
    """The fragment's payload buffers: what a worker sends, and where the runtime puts what arrives
    (an int8 payload's, every worker's in rank order, one after another)."""
    workers = world_size(option.group)
    prefix = f"sync.payload.{fragment}"
    if option.payload == "full":
        dtype = graph.params[names[0]].dtype
        for name in names[1:]:
            dtype = torch.promote_types(dtype, graph.params[name].dtype)
        numel = sum(math.prod(graph.params[n].shape) for n in names)
        buffer = graph.state_node(StateSpec(name=prefix, shape=(numel,), dtype=dtype, owner="sync"))
        return {"sent": buffer, "received": buffer}
    sizes = [_rows(graph.params[n].shape) for n in names]
    codes, rows = sum(r * c for r, c in sizes), sum(r for r, _ in sizes)
    spec = {"codes": ((codes,), torch.int8), "scales": ((rows,), torch.float32)}
    buffers = {}
    for part, (shape, dtype) in spec.items():
        buffers[f"sent_{part}"] = graph.state_node(StateSpec(name=f"{prefix}.{part}", shape=shape, dtype=dtype,
                                                             owner="sync"))
        buffers[f"received_{part}"] = graph.state_node(StateSpec(name=f"sync.received.{fragment}.{part}",
                                                                 shape=(workers * shape[0],), dtype=dtype,
                                                                 owner="sync"))
    return buffers


def _send(graph: TrainGraph, option: Sync, fragment: int, names: list[str], group: str | None) -> int:
    """Write what fragment `fragment` sends into its buffers (tagged SENT where a group takes
    it); returns the bytes sent."""
    g = graph.graph
    deltas = pseudo_gradients(graph, hold_anchors(graph, names, "sync"))
    buffers = _buffers(graph, option, fragment, names)
    role = Role.SENT if group else Role.OPTIMIZER_UPDATE
    if option.payload == "full":
        flat = g.call_function(torch.cat, ([g.call_method("reshape", (deltas[n], -1)) for n in names],))
        if graph.value(flat).dtype != graph.value(buffers["sent"]).dtype:
            flat = g.call_method("to", (flat, graph.value(buffers["sent"]).dtype))
        # Divided before the sum, so that the buffer holds the average on any number of workers.
        values = {"": tag(g.call_function(torch.ops.aten.div.Tensor, (flat, float(world_size(option.group)))),
                          role, name=f"payload_{fragment}")}
    else:
        encoded = _int8_codes(graph, names, deltas)
        values = {f"_{part}": tag(g.call_function(torch.cat, ([g.call_method("reshape", (encoded[n][k], -1))
                                                               for n in names],)), role,
                                  name=f"payload_{fragment}_{part}")
                  for k, part in enumerate(("codes", "scales"))}
    return sum(write_payload(graph, fragment, buffers[f"sent{suffix}"], buffers[f"received{suffix}"], value, group)
               for suffix, value in values.items())


def _merge(graph: TrainGraph, option: Sync, fragment: int, names: list[str], group: str | None) -> None:
    """The outer step on the average that fragment `fragment`'s buffers received."""
    g = graph.graph
    _check_mixable(graph, option, names)
    anchors = hold_anchors(graph, names, "sync")
    buffers = _buffers(graph, option, fragment, names)
    role = Role.RECEIVED if group else Role.OPTIMIZER_UPDATE
    averaged = {}
    if option.payload == "full":
        sizes = [math.prod(graph.params[n].shape) for n in names]
        pieces = g.call_function(torch.split, (buffers["received"], sizes))
        for k, name in enumerate(names):
            piece = g.call_function(operator.getitem, (pieces, k))
            averaged[name] = tag(g.call_method("view", (piece, graph.params[name].shape)), role, name,
                                 name=f"received_{name}")
            if graph.params[name].dtype != graph.value(piece).dtype:
                averaged[name] = g.call_method("to", (averaged[name], graph.params[name].dtype))
    else:
        shapes = [_rows(graph.params[n].shape) for n in names]
        workers = world_size(option.group)
        codes = g.call_function(torch.split, (g.call_method("view", (buffers["received_codes"], workers, -1)),
                                              [r * c for r, c in shapes], 1))
        scales = g.call_function(torch.split, (g.call_method("view", (buffers["received_scales"], workers, -1)),
                                               [r for r, _ in shapes], 1))
        for k, (name, (rows, cols)) in enumerate(zip(names, shapes)):
            received = [tag(g.call_function(operator.getitem, (parts, k)), role, name, name=f"received_{part}_{name}")
                        for parts, part in ((codes, "codes"), (scales, "scales"))]
            averaged[name] = _int8_mean(graph, name, g.call_method("reshape", (received[0], -1, rows, cols)),
                                        g.call_method("reshape", (received[1], -1, rows, 1)))
    apply_outer_step(graph, anchors, averaged, option.outer, "sync", option.local_weight)


def _overlapped(graph: TrainGraph, option: Sync, fragments: list[list[str]], events: frozenset[str]) -> tuple[str, ...]:
    """Write the payload of each fragment syncing here; merge the average of each fragment whose
    collective started `delay` steps ago."""
    g = graph.graph
    point = end_of_updates(graph)
    group = group_name(option.group)
    notes = ()
    for f, names in enumerate(fragments):
        if option.event(f) in events:
            with g.inserting_before(point):
                sent = _send(graph, option, f, names, group)
            notes += (f"fragment {f}: its {option.payload} payload ({sent:,} bytes) written to sync.payload.{f}; the "
                      f"runtime sends it after this step and it is merged {option.delay} step(s) later",)
        if option.merge_event(f) in events:
            with g.inserting_before(point):
                _merge(graph, option, f, names, group)
            notes += (f"fragment {f}: the average sent {option.delay} step(s) ago merged (local weight "
                      f"{option.local_weight})",)
    return notes


@register_pass("sync", stage=Stage.SYNC, option="sync", option_type=Sync, events=_events,
               also={Stage.COMBINE: local_steps}, runtime=Overlap)
def sync(program: Program, option: Sync) -> PassResult:
    notes = (f"sync after every {option.every} steps; outer SGD: lr {option.outer_lr}, momentum "
             f"{option.outer_momentum}, nesterov {option.nesterov}",)
    graph = program.graph
    fragments = fragments_of_step(graph, option.fragments, "Sync.fragments")
    if option.fragments > 1:
        notes += tuple(f"fragment {f} (syncs at event {option.event(f)!r}): {', '.join(names)}"
                       for f, names in enumerate(fragments))
    if option.delay:
        return PassResult(program, notes + _overlapped(graph, option, fragments, program.events))
    names = [n for f, fragment in enumerate(fragments) if option.event(f) in program.events for n in fragment]
    if not names:
        return PassResult(program, notes)
    g = graph.graph
    group = group_name(option.group)
    # Inserting before one fixed node keeps creation order: anchors, deltas, their average, the outer step.
    point = end_of_updates(graph)
    with g.inserting_before(point):
        anchors = hold_anchors(graph, names, "sync")
        deltas = pseudo_gradients(graph, anchors)
    _check_mixable(graph, option, names)
    if option.payload == "int8":
        averaged, sent = _int8_in_graph(graph, names, deltas, group, world_size(option.group), point)
    else:
        values = [deltas[p] for p in names]
        averaged = dict(zip(names, insert_mean_all_reduce(graph, values, group, Role.GRADIENT, names)
                            if group else values))
        sent = sum(math.prod(graph.params[n].shape) * graph.params[n].dtype.itemsize for n in names)
    with g.inserting_before(point):
        apply_outer_step(graph, anchors, averaged, option.outer, "sync", option.local_weight)
    how = "one all-reduce (mean)" if option.payload == "full" else "all-gathers of int8 codes and row scales"
    return PassResult(program, notes + (
        f"sync: {len(names)} pseudo-gradients, " + (f"{how}, {sent:,} bytes" if group else "one worker: nothing sent"),))


def _int8_in_graph(graph: TrainGraph, names: list[str], deltas: dict[str, fx.Node], group: str | None, workers: int,
                   point: fx.Node) -> tuple[dict[str, fx.Node], int]:
    """Every worker's int8 codes and scales gathered in the graph, their mean decoded; returns it
    and the bytes each worker sends."""
    g = graph.graph
    with g.inserting_before(point):
        encoded = _int8_codes(graph, names, deltas)
    values = [node for name in names for node in encoded[name]]
    if group:
        gathered = insert_all_gather(graph, values, group, workers, Role.GRADIENT, [n for n in names for _ in "cs"])
    else:
        with g.inserting_before(point):
            gathered = [g.call_method("unsqueeze", (node, 0)) for node in values]
    with g.inserting_before(point):
        averaged = {name: _int8_mean(graph, name, gathered[2 * k], gathered[2 * k + 1]) for k, name in enumerate(names)}
    return averaged, sum(graph.value(v).numel() * graph.value(v).element_size() for v in values)

