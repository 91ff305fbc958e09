"""LoRDO: low-rank inner steps under one global projection, infrequent sync (ALGORITHMS.md 3).

    event "init" (step 0):  Q_W = top-r singular vectors of mean_k(grad_W)   (global; or own grad)
                            before the inner step below reads it; with first_projection="identity"
                            no such event: Q_W starts as the first r basis vectors
    every step:             lordo.lordo_adamw(W, grad_W, u_W, v_W, E_W, step_W, Q_W, ...)
                            (the step's own gradient averaging removed; dense params keep AdamW)
    event "sync" (after steps H, 2H, ...): after the inner step,
        delta = anchor - W' for every parameter, averaged over workers by `payload`:
          "full"      one all-reduce of every delta
          "low_rank"  all-reduce Q^T y and a sketch y Omega (y = delta + sync error feedback);
                      delta ~ Q mean(Q^T y); the error feedback keeps y - Q Q^T y locally
          "int8"      all-gather int8 codes of y = delta + error feedback, per-row scales
        with sync_optimizer_state: u, v averaged in the same all-reduce as the deltas;
        Q' from the averaged delta (or its sketch) on every worker alike: Q is never sent;
        the outer step of `outer.py` on the anchor; every worker reset to the anchor;
        u, v (E) carried to Q' (on_refresh).

Streaming (`fragments=F`, ALGORITHMS.md section 9, as `sync`'s): the updated parameters
are cut into F fragments (`outer.fragments_of_step`); fragment f runs the sync above for its
own parameters alone after steps o_f, o_f + H, ... (event "sync.f"): its pseudo-gradients,
payload, new Q for its matrices, outer step and reset. Each sync sends about 1/F of the
model; the last fragment syncs when the whole model would.

Overlap (`delay=tau >= 1`): at fragment f's sync step the graph only computes its payload
(error feedback included) and writes it into state buffers (SENT): the means, divided by
the number of workers, into `lordo.payload.f` (summed in place), the int8 codes and scales
into `lordo.payload.f.codes|scales` (gathered into `lordo.received.f.*`). The runtime
(`overlap.Overlap`) starts those collectives after the step without waiting. At event
"merge.f", tau steps later, it waits for them before the graph, which reads what arrived
(RECEIVED) and runs the rest of the sync: new Q, outer step, every parameter of f reset to
its anchor (the tau local steps are dropped), u and v as they are then carried to the new Q.
What a payload holds is known from shapes alone (`_layout`), so the merging graph can read
what an earlier graph wrote.

Ablations: `projection="local"` (each worker's Q from its own gradient at each sync) and
`omega=1` (no full-rank term).
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from ..graph import STATE, ParamInfo, Role, StateSpec, TrainGraph, UpdateSite, tag
from ..ops import op_named
from ..ops.lordo import FULL_RANK_INPUTS, NORMALIZERS, WEIGHT_DECAY_AT, ldadam_carry
from ..ops.low_rank import METHODS, ON_REFRESH, low_rank_carry
from .collectives import (
    EVERY_STEP_AND_PERIODIC,
    WORKERS_COMBINE,
    group_name,
    insert_all_gather,
    insert_mean_all_reduce,
    over_two_levels,
    remove_gradient_all_reduces,
    world_size,
)
from .manager import INIT, Conflict, Event, PassResult, Program, Stage, register_pass
from .outer import (OuterOptimizer, apply_outer_step, check_streaming, end_of_updates, first_sync_step,
                    fragments_of_step, hold_anchors, int8_decoded, int8_encoded, pseudo_gradients)
from .overlap import Overlap, write_payload
from .projection import refreshed_projection, write_projection
from .select import choose_matrix, validate_selector

PAYLOADS = ("full", "low_rank", "int8")
# The inner updates LoRDO writes: a matrix updated by one was selected.
_INNER_OPS = ("lordo_adamw", "lordo_adamw_full")
PROJECTIONS = ("global", "local")
FIRST_PROJECTIONS = ("gradient", "identity")
# LDAdam's carry of the moments is LoRDO's alone (the authors' code); GaLore keeps ON_REFRESH.
LORDO_ON_REFRESH = (*ON_REFRESH, "ldadam")
# What `Policy.lordo(variant=...)` sets. "authors": the authors' public research code as
# ALGORITHMS.md section 3 reads it (omega 0.97: its value at 720M, inside its 0.90-0.99 sweep).
VARIANTS = {
    "default": {},
    "authors": dict(omega=0.97, mu=1.0, full_rank_normalizer="scalar", full_rank_input="error_fed",
                    on_refresh="ldadam", sync_optimizer_state=True, first_projection="identity",
                    weight_decay_at="after", clip=None, payload="full", projection="global", method="svd",
                    outer_lr=1.0, outer_momentum=0.0, nesterov=False),
}


@dataclass(frozen=True, kw_only=True)
class LoRDO:
    """LoRDO (ALGORITHMS.md section 3); every open choice of the method is a field.

    Args:
      rank: r, directions kept per selected matrix.
      sync_every: H >= 2, local steps between syncs.
      omega: the quasi-hyperbolic mix: 1 is pure low-rank Adam, below 1 adds the full-rank term.
      mu: scale of the full-rank term's normalizer.
      full_rank_normalizer: D, "column" (v's mean broadcast), "rms" (RMS of the gradient),
        "full" (a full-size second moment: a baseline, it costs m x n per matrix), or "scalar"
        (the mean of the low-rank denominator sqrt(v^) + eps, plus eps).
      full_rank_input: what the full-rank term moves along: "gradient" (the clipped gradient) or
        "error_fed" (the gradient plus the error feedback, the matrix that is projected).
      weight_decay_at: the decoupled decay "before" the update (as AdamW) or "after" it.
      projection: "global" (Q from the averaged pseudo-gradient) or "local" (each worker's Q
        from its own gradient at each sync: the paper's ablation).
      method: how Q is computed: "svd", "randomized" or "subspace" (see LowRank).
      on_refresh: u, v when Q changes: "keep", "reproject" (u by C = Q'^T Q, v by C*C),
        "ldadam" (u by C, v carried as a variance: ops.lordo.ldadam_carry_math) or "reset"
        (which also clears the error feedback and restarts bias correction).
      sync_optimizer_state: also average u and v over workers at every sync (in the basis they
        share, before they are carried to the new Q); the bytes join the sync's all-reduce.
      first_projection: Q until the first sync: "gradient" (from the first gradient, averaged:
        one collective at step 0) or "identity" (the first r basis vectors, no collective).
      payload: what a sync sends for the selected matrices: "full", "low_rank" or "int8".
      sketch_size: extra sketch columns beyond `rank` for the "low_rank" payload.
      outer_lr, outer_momentum, nesterov: the outer SGD (1, 0, False: model averaging).
      fragments: sync the model in this many fragments at staggered steps (streaming; 1: all at once).
      delay: steps a fragment's collectives overlap before their result is merged (tau; 0: the
        sync step waits for them).
      clip: norm clipping of each gradient (None: off).
      params: which matrices (as LowRank.params); group: the process group.

    The defaults (sync_every 32, omega 0.7, payload "int8") are the configuration that met
    the targets in `python -m benchmarks.lordo_sweep` and `benchmarks.lordo` (README, LoRDO).

    Raises:
      ValueError: for a value out of range or an unknown choice, naming the field.
    """

    rank: int
    sync_every: int = 32
    omega: float = 0.7
    mu: float = 1.0
    full_rank_normalizer: str = "column"
    full_rank_input: str = "gradient"
    weight_decay_at: str = "before"
    projection: str = "global"
    method: str = "svd"
    on_refresh: str = "reproject"
    sync_optimizer_state: bool = False
    first_projection: str = "gradient"
    payload: str = "int8"
    sketch_size: int = 8
    oversampling: int = 8
    power_iterations: int = 1
    seed: int = 0
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    nesterov: bool = False
    fragments: int = 1
    delay: int = 0
    clip: float | None = None
    params: object = None
    group: object = None

    def __post_init__(self) -> None:
        ints = {"rank": 1, "sync_every": 2, "sketch_size": 0, "oversampling": 0, "power_iterations": 0, "seed": 0}
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                hint = " (every step would be low-rank DDP: use Policy.low_rank_ddp)" if name == "sync_every" else ""
                raise ValueError(f"LoRDO.{name} must be an int >= {low}, got {value!r}{hint}")
        reals = {"omega": (0, 1, True), "mu": (0, None, False), "outer_lr": (0, None, False),
                 "outer_momentum": (0, 1, "half")}
        for name, (low, high, closed) in reals.items():
            value = getattr(self, name)
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if ok:
                ok = (value >= low if closed else value > low) if closed != "half" else value >= low
                ok = ok and (high is None or (value <= high if closed is True else value < high))
            if not ok:
                raise ValueError(f"LoRDO.{name} is out of range: {value!r}")
        choices = {"full_rank_normalizer": NORMALIZERS, "full_rank_input": FULL_RANK_INPUTS,
                   "weight_decay_at": WEIGHT_DECAY_AT, "projection": PROJECTIONS, "method": METHODS,
                   "on_refresh": LORDO_ON_REFRESH, "payload": PAYLOADS, "first_projection": FIRST_PROJECTIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"LoRDO.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.payload == "low_rank" and self.projection != "global":
            raise ValueError("LoRDO.payload='low_rank' sends Q^T delta, which needs one Q on every worker: "
                             "use projection='global'")
        if not isinstance(self.sync_optimizer_state, bool):
            raise ValueError(f"LoRDO.sync_optimizer_state must be True or False, got {self.sync_optimizer_state!r}")
        if self.sync_optimizer_state and self.projection != "global":
            raise ValueError("LoRDO.sync_optimizer_state=True averages u, v, whose coordinates mean the same only "
                             "under one Q on every worker: use projection='global'")
        if self.sync_optimizer_state and self.on_refresh == "reset":
            raise ValueError("LoRDO.sync_optimizer_state=True averages u, v that on_refresh='reset' then clears: "
                             "use on_refresh='keep', 'reproject' or 'ldadam', or sync_optimizer_state=False")
        if self.nesterov and self.outer_momentum == 0:
            raise ValueError("LoRDO.nesterov=True needs outer_momentum > 0")
        check_streaming("LoRDO", "sync_every", self.sync_every, self.fragments, self.delay)
        if self.delay and self.sync_optimizer_state:
            raise ValueError("LoRDO.sync_optimizer_state=True averages u, v at the sync step, and with delay="
                             f"{self.delay} they move on before the average arrives: use delay=0, or "
                             "sync_optimizer_state=False")
        if self.clip is not None and (not isinstance(self.clip, numbers.Real) or not self.clip > 0):
            raise ValueError(f"LoRDO.clip must be None or > 0, got {self.clip!r}")
        validate_selector("LoRDO", self.params)

    def choose(self, info: ParamInfo, op_name: str) -> str | None:
        reason = choose_matrix(self.params, self.rank, info)
        if reason is None and op_name not in ("adamw", *_INNER_OPS):
            return f"LoRDO's inner step is AdamW, this parameter is updated by lordo.{op_name}"
        return reason

    @property
    def outer(self) -> OuterOptimizer:
        return OuterOptimizer(self.outer_lr, self.outer_momentum, self.nesterov)

    def event(self, fragment: int) -> str:
        return "sync" if self.fragments == 1 else f"sync.{fragment}"

    def merge_event(self, fragment: int) -> str:
        """Where fragment `fragment`'s overlapped collectives are merged (`delay` >= 1)."""
        return "merge" if self.fragments == 1 else f"merge.{fragment}"


def _releases(option: LoRDO, info: ParamInfo, op_name: str) -> tuple[str, ...]:
    return ("exp_avg", "exp_avg_sq") if option.choose(info, op_name) is None else ()



@dataclass
class _Matrix:
    param: str
    shape: tuple[int, int]
    tall: bool
    specs: dict[str, StateSpec]

    @property
    def side(self) -> int:
        return self.shape[1] if self.tall else self.shape[0]

    @property
    def other(self) -> int:
        return self.shape[0] if self.tall else self.shape[1]


def _plan(option: LoRDO, graph: TrainGraph) -> tuple[list[_Matrix], list[str]]:
    matrices, dense = [], []
    for index, site in enumerate(graph.updates()):
        info = graph.params[site.param]
        reason = option.choose(info, site.op.name)
        if reason is not None:
            dense.append(f"{site.param} {list(info.shape)}: {reason}")
            continue
        m, n = info.shape
        tall = m >= n
        matrix = _Matrix(site.param, (m, n), tall, {})
        moment = (m, option.rank) if tall else (option.rank, n)

        def spec(key, shape, dtype=info.dtype, init="zeros", moment=None, counted=False):
            matrix.specs[key] = StateSpec(name=f"lordo.{key}.{site.param}", shape=tuple(shape), dtype=dtype,
                                          owner="lordo", param=site.param, init=init, moment=moment,
                                          counted_by_optimizer=counted)

        spec("u", moment, moment="signed", counted=True)
        spec("v", moment, moment="unsigned", counted=True)
        spec("error", info.shape, moment="signed")
        if option.full_rank_normalizer == "full":
            spec("second_moment", info.shape, moment="unsigned", counted=True)
        spec("projection", (matrix.side, option.rank), torch.float32, "eye")
        if option.method == "randomized":
            spec("sketch", (matrix.other, option.rank + option.oversampling), torch.float32,
                 f"randn:{option.seed + index}")
        if option.payload != "full":
            # Seeded alike on every worker: the averaged sketch is a sketch of the average.
            spec("payload_sketch", (matrix.other, option.rank + option.sketch_size), torch.float32,
                 f"randn:{option.seed + 1000 + index}")
        if option.payload in ("low_rank", "int8"):
            spec("sync_error", info.shape, moment="signed")
        matrices.append(matrix)
    return matrices, dense


def _site(graph: TrainGraph, param: str) -> UpdateSite:
    return next(s for s in graph.updates() if s.param == param)


def _state_nodes(graph: TrainGraph, matrix: _Matrix) -> dict[str, fx.Node]:
    names = {spec.name: key for key, spec in matrix.specs.items()}
    return {names[n.meta[STATE]]: n for n in graph.placeholders() if n.meta.get(STATE) in names}


def _inner(graph: TrainGraph, option: LoRDO, matrices: list[_Matrix]) -> None:
    """Replace each selected AdamW update by lordo_adamw, its state written right after it."""
    g = graph.graph
    op = op_named("lordo_adamw_full" if option.full_rank_normalizer == "full" else "lordo_adamw")
    for matrix in matrices:
        site = _site(graph, matrix.param)
        nodes = {key: graph.add_state(spec) for key, spec in matrix.specs.items()}
        args = [nodes[key] if key in nodes else site.input(key) for key in op.inputs]
        kwargs = {"omega": float(option.omega), "mu": float(option.mu), "normalizer": option.full_rank_normalizer,
                  "full_rank_input": option.full_rank_input, "clip": float(option.clip or 0.0),
                  "weight_decay_at": option.weight_decay_at, "tall": matrix.tall,
                  "maximize": site.node.kwargs["maximize"]}
        with g.inserting_before(site.node):
            new = tag(g.call_function(op.overload, tuple(args), kwargs), Role.OPTIMIZER_UPDATE, matrix.param,
                      name=f"{op.name}_{matrix.param}")
        old_outputs = site.outputs()
        new_outputs = {}
        # Inserting before a fixed node keeps creation order: the outputs, then the state writes.
        point = new.next
        with g.inserting_before(point):
            for i, key in enumerate(op.output_keys):
                new_outputs[key] = tag(g.call_function(operator.getitem, (new, i)), Role.OPTIMIZER_UPDATE,
                                       matrix.param, key, name=f"new_{key}_{matrix.param}")
            for key in op.state:
                if key != "step":
                    tag(g.call_method("copy_", (nodes[key], new_outputs[key])), Role.WRITEBACK, matrix.param, key,
                        name=f"write_{key}_{matrix.param}")
        for key in ("param", "step"):
            old_outputs[key].replace_all_uses_with(new_outputs[key])
        for key in ("exp_avg", "exp_avg_sq"):
            for write in list(old_outputs[key].users):
                g.erase_node(write)
        for key in old_outputs:
            g.erase_node(old_outputs[key])
        g.erase_node(site.node)


def _first_projection(graph: TrainGraph, option: LoRDO, matrices: list[_Matrix], group: str | None) -> None:
    """Event "init": Q from the first gradient averaged over workers (or the worker's own, for
    `projection="local"`), before any update uses it. With a compressed payload only a sketch
    of each gradient is averaged, as at every sync."""
    g = graph.graph
    sites = {m.param: _site(graph, m.param) for m in matrices}
    nodes = {m.param: _state_nodes(graph, m) for m in matrices}
    order = {n: i for i, n in enumerate(g.nodes)}
    point = min((sites[m.param].node for m in matrices), key=order.__getitem__)
    sketched = option.payload != "full" and option.projection == "global"
    sources = []
    with g.inserting_before(point):
        for m in matrices:
            grad = sites[m.param].input("grad")
            if sketched:
                a = g.call_method("t", (grad,)) if m.tall else grad
                sources.append(tag(g.call_function(torch.matmul, (a, nodes[m.param]["payload_sketch"])), Role.GRADIENT,
                                   m.param, name=f"gradient_sketch_{m.param}"))
            else:
                sources.append(grad)
    if option.projection == "global" and group is not None:
        sources = insert_mean_all_reduce(graph, sources, group, Role.GRADIENT, [m.param for m in matrices])
    with g.inserting_before(point):
        for m, source in zip(matrices, sources):
            if sketched and m.tall:
                source = g.call_method("t", (source,))
            new, _ = refreshed_projection(graph, m.param, source, nodes[m.param]["projection"],
                                          nodes[m.param].get("sketch"), rank=option.rank, tall=m.tall, method="svd",
                                          power_iterations=option.power_iterations)
            sites[m.param].node.replace_input_with(nodes[m.param]["projection"], new)
            write_projection(graph, m.param, nodes[m.param]["projection"], new)


@dataclass
class _Payload:
    """What a sync sends: nodes to average (mean all-reduce) and to gather, each with its
    parameter (and, for an int8 payload, what each worker's own codes decode to)."""

    means: list[tuple[str, fx.Node]]
    gathers: list[tuple[str, fx.Node]]
    local: dict[str, fx.Node]


def _full_payload(graph, option, names, selected, state, deltas) -> _Payload:
    return _Payload([(p, deltas[p]) for p in names], [], {})


def _error_fed(g: fx.Graph, matrix: _Matrix, nodes: dict[str, fx.Node], delta: fx.Node) -> fx.Node:
    """y = delta + the sync's error feedback, in the projected side's orientation."""
    p = matrix.param
    y = tag(g.call_function(torch.ops.aten.add.Tensor, (delta, nodes["sync_error"])), Role.GRADIENT, p,
            name=f"sync_input_{p}")
    return tag(g.call_method("t", (y,)), Role.GRADIENT, p) if matrix.tall else y


def _keep_residual(g: fx.Graph, matrix: _Matrix, nodes: dict[str, fx.Node], a: fx.Node, sent: fx.Node) -> None:
    """The sync's error feedback keeps what the payload dropped: y - what was sent."""
    residual = g.call_function(torch.ops.aten.sub.Tensor, (a, sent))
    residual = g.call_method("t", (residual,)) if matrix.tall else residual
    tag(g.call_method("copy_", (nodes["sync_error"], residual)), Role.WRITEBACK, matrix.param, "sync_error",
        name=f"write_sync_error_{matrix.param}")


def _low_rank_payload(graph, option, names, selected, state, deltas) -> _Payload:
    g = graph.graph
    means = []
    for p in names:
        m = selected.get(p)
        if m is None:
            means.append((p, deltas[p]))
            continue
        nodes = state[p]
        a = _error_fed(g, m, nodes, deltas[p])
        q = nodes["projection"]
        coords = tag(g.call_function(torch.matmul, (g.call_method("t", (q,)), a)), Role.GRADIENT, p,
                     name=f"payload_coordinates_{p}")
        sketch = tag(g.call_function(torch.matmul, (a, nodes["payload_sketch"])), Role.GRADIENT, p,
                     name=f"payload_sketch_{p}")
        _keep_residual(g, m, nodes, a, g.call_function(torch.matmul, (q, coords)))
        means += [(p, coords), (p, sketch)]
    return _Payload(means, [], {})


def _int8_payload(graph, option, names, selected, state, deltas) -> _Payload:
    g = graph.graph
    means, gathers, local = [], [], {}
    for p in names:
        m = selected.get(p)
        if m is None:
            means.append((p, deltas[p]))
            continue
        nodes = state[p]
        a = _error_fed(g, m, nodes, deltas[p])
        codes, scales, dequantized = int8_encoded(g, a, p)
        _keep_residual(g, m, nodes, a, dequantized)
        local[p] = dequantized
        gathers += [(p, codes), (p, scales)]
    return _Payload(means, gathers, local)


_PAYLOADS = {"full": _full_payload, "low_rank": _low_rank_payload, "int8": _int8_payload}


def _read(option: LoRDO, selected: dict[str, _Matrix], state: dict[str, dict[str, fx.Node]], averaged: dict,
          gathered: dict, local: dict, g: fx.Graph, p: str) -> tuple[fx.Node, fx.Node]:
    """Parameter `p`'s averaged pseudo-gradient, and the source of its new Q, from what the
    payload's collectives returned (`averaged`: the means, `gathered`: every worker's codes
    and scales; with one worker and no gather, `local`: its own decoded payload)."""
    m = selected.get(p)
    if m is None or option.payload == "full":
        return averaged[p][0], averaged[p][0]
    if option.payload == "low_rank":
        coords, sketch = averaged[p]
        delta_a = g.call_function(torch.matmul, (state[p]["projection"], coords))
        # The averaged sketch spans the average's column space: the new Q is its top singular vectors.
        return (g.call_method("t", (delta_a,)) if m.tall else delta_a), (g.call_method("t", (sketch,)) if m.tall
                                                                          else sketch)
    if p in gathered:
        codes, scales = gathered[p]
        mean_a = g.call_method("mean", (int8_decoded(g, codes, scales), 0))
    else:
        mean_a = local[p]
    mean = g.call_method("t", (mean_a,)) if m.tall else mean_a
    return mean, mean


def _sync(graph: TrainGraph, option: LoRDO, matrices: list[_Matrix], names: list[str], group: str | None,
          world: int) -> None:
    """Event "sync" of the parameters `names` (all, or a fragment's): pseudo-gradients,
    payload, new Q, outer step, reset, moments carried."""
    g = graph.graph
    matrices = [m for m in matrices if m.param in names]
    selected = {m.param: m for m in matrices}
    state = {m.param: _state_nodes(graph, m) for m in matrices}
    # Inserting before one fixed node keeps creation order: deltas, payload, collectives, outer step.
    point = end_of_updates(graph)
    with g.inserting_before(point):
        anchors = hold_anchors(graph, names, "lordo")
        deltas = pseudo_gradients(graph, anchors)
        payload = _PAYLOADS[option.payload](graph, option, names, selected, state, deltas)
    moments = _moments(graph, matrices, state)
    shared = [(p, key) for p in moments for key in ("u", "v")] if option.sync_optimizer_state else []
    averaged: dict[str, list[fx.Node]] = {}
    gathered: dict[str, list[fx.Node]] = {}
    sent = payload.means + [(p, moments[p][key]) for p, key in shared]
    if sent:
        params, values = zip(*sent)
        results = insert_mean_all_reduce(graph, list(values), group, Role.GRADIENT, list(params)) if group \
            else values
        for (p, _), value in zip(payload.means, results):
            averaged.setdefault(p, []).append(value)
        for (p, key), value in zip(shared, results[len(payload.means):]):
            moments[p][key] = value
    if payload.gathers and group:
        params, values = zip(*payload.gathers)
        for p, value in zip(params, insert_all_gather(graph, list(values), group, world, Role.GRADIENT,
                                                      list(params))):
            gathered.setdefault(p, []).append(value)
    with g.inserting_before(point):
        _outer_step(graph, option, names, selected, state, anchors, moments,
                    lambda p: _read(option, selected, state, averaged, gathered, payload.local, g, p))


def _moments(graph: TrainGraph, matrices: list[_Matrix], state: dict) -> dict[str, dict[str, fx.Node]]:
    """What the step writes into each moment: the inner update's, with what later stages fed in."""
    return {m.param: {key: graph.last_write(state[m.param][key]).args[1] for key in ("u", "v")} for m in matrices}


def _outer_step(graph: TrainGraph, option: LoRDO, names: list[str], selected: dict[str, _Matrix], state: dict,
                anchors: dict, moments: dict, read: Callable[[str], tuple[fx.Node, fx.Node]]) -> None:
    """From each parameter's average (`read`): the new Q of each matrix, the outer step, and
    the moments carried to the new Q."""
    means, new_q = {}, {}
    for p in names:
        means[p], source = read(p)
        m = selected.get(p)
        if m is None:
            continue
        if option.projection == "local":
            source = _site(graph, p).input("grad")
        method = "svd" if option.payload == "low_rank" else option.method
        new_q[p], _ = refreshed_projection(graph, p, source, state[p]["projection"], state[p].get("sketch"),
                                           rank=option.rank, tall=m.tall, method=method,
                                           power_iterations=option.power_iterations)
    apply_outer_step(graph, anchors, means, option.outer, "lordo")
    for p, m in selected.items():
        _carry(graph, option, m, state[p], new_q[p], _site(graph, p), moments[p])


@dataclass(frozen=True)
class _Piece:
    """One tensor of a fragment's overlapped payload: its parameter, shape and dtype."""

    param: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _layout(graph: TrainGraph, option: LoRDO, names: list[str],
            selected: dict[str, _Matrix]) -> tuple[list[_Piece], list[_Piece]]:
    """What `_PAYLOADS` sends for `names`, known from shapes alone, so that the graph that merges
    can read what an earlier graph sent: the pieces averaged, and the pieces gathered."""
    means, gathers = [], []
    for p in names:
        info, m = graph.params[p], selected.get(p)
        if m is None or option.payload == "full":
            means.append(_Piece(p, tuple(info.shape), info.dtype))
        elif option.payload == "low_rank":
            dtype = torch.promote_types(info.dtype, torch.float32)
            means += [_Piece(p, (option.rank, m.other), dtype),
                      _Piece(p, (m.side, option.rank + option.sketch_size), dtype)]
        else:
            gathers += [_Piece(p, (m.side, m.other), torch.int8), _Piece(p, (m.side, 1), info.dtype)]
    return means, gathers


def _buffers(graph: TrainGraph, f: int, means: list[_Piece], gathers: list[_Piece],
             world: int) -> dict[str, fx.Node]:
    """Fragment `f`'s payload buffers: the averaged pieces, flat (summed in place: each worker
    writes its share), and the gathered codes and scales (what a worker sends; every worker's,
    in rank order, where they arrive)."""
    buffers = {}
    if means:
        dtype = means[0].dtype
        for piece in means[1:]:
            dtype = torch.promote_types(dtype, piece.dtype)
        buffers["mean"] = graph.state_node(StateSpec(name=f"lordo.payload.{f}", shape=(sum(x.numel for x in means),),
                                                     dtype=dtype, owner="lordo"))
    for part, pieces in (("codes", gathers[0::2]), ("scales", gathers[1::2])):
        if pieces:
            shape, dtype = (sum(x.numel for x in pieces),), pieces[0].dtype
            buffers[part] = graph.state_node(StateSpec(name=f"lordo.payload.{f}.{part}", shape=shape, dtype=dtype,
                                                       owner="lordo"))
            buffers[f"received_{part}"] = graph.state_node(StateSpec(
                name=f"lordo.received.{f}.{part}", shape=(world * shape[0],), dtype=dtype, owner="lordo"))
    return buffers


def _send(graph: TrainGraph, option: LoRDO, matrices: list[_Matrix], names: list[str], f: int, group: str | None,
          world: int) -> int:
    """Event "sync.f" with a delay: fragment `f`'s payload written into its buffers (SENT where a
    group takes it: the runtime sends it after this step); returns the bytes sent."""
    g = graph.graph
    selected = {m.param: m for m in matrices if m.param in names}
    state = {p: _state_nodes(graph, m) for p, m in selected.items()}
    means, gathers = _layout(graph, option, names, selected)
    with g.inserting_before(end_of_updates(graph)):
        payload = _PAYLOADS[option.payload](graph, option, names, selected, state,
                                            pseudo_gradients(graph, hold_anchors(graph, names, "lordo")))
        for piece, (_, node) in zip(means + gathers, payload.means + payload.gathers):
            value = graph.value(node)
            if (tuple(value.shape), value.dtype) != (piece.shape, piece.dtype):
                raise AssertionError(f"LoRDO's payload layout for {piece.param} says {piece}, the payload has "
                                     f"{tuple(value.shape)} {value.dtype}")
        buffers = _buffers(graph, f, means, gathers, world)
        role = Role.SENT if group else Role.OPTIMIZER_UPDATE
        writes = []
        if means:
            flat = g.call_function(torch.cat, ([g.call_method("reshape", (g.call_method(
                "to", (node, graph.value(buffers["mean"]).dtype)), -1)) for _, node in payload.means],))
            # Divided before the sum, so that the buffer holds the average on any number of workers.
            writes.append(("mean", "mean", tag(g.call_function(torch.ops.aten.div.Tensor, (flat, float(world))),
                                                role, name=f"payload_{f}")))
        for k, part in enumerate(("codes", "scales")):
            if f"received_{part}" in buffers:
                flat = g.call_function(torch.cat, ([g.call_method("reshape", (node, -1))
                                                    for _, node in payload.gathers[k::2]],))
                writes.append((part, f"received_{part}", tag(flat, role, name=f"payload_{f}_{part}")))
        return sum(write_payload(graph, f, buffers[key], buffers[received], value, group)
                   for key, received, value in writes)


def _merge(graph: TrainGraph, option: LoRDO, matrices: list[_Matrix], names: list[str], f: int, group: str | None,
           world: int) -> None:
    """Event "merge.f", `delay` steps after fragment `f` sent its payload: the average it received,
    new Q, outer step, reset, moments (as they are now) carried."""
    g = graph.graph
    selected = {m.param: m for m in matrices if m.param in names}
    state = {p: _state_nodes(graph, m) for p, m in selected.items()}
    means, gathers = _layout(graph, option, names, selected)
    role = Role.RECEIVED if group else Role.OPTIMIZER_UPDATE
    averaged: dict[str, list[fx.Node]] = {}
    gathered: dict[str, list[fx.Node]] = {}
    with g.inserting_before(end_of_updates(graph)):
        anchors = hold_anchors(graph, names, "lordo")
        buffers = _buffers(graph, f, means, gathers, world)
        if means:
            pieces = g.call_function(torch.split, (buffers["mean"], [x.numel for x in means]))
            for k, piece in enumerate(means):
                value = tag(g.call_method("view", (g.call_function(operator.getitem, (pieces, k)), piece.shape)),
                            role, piece.param, name=f"received_{piece.param}")
                averaged.setdefault(piece.param, []).append(g.call_method("to", (value, piece.dtype)))
        for k, part in enumerate(("codes", "scales")):
            if f"received_{part}" not in buffers:
                continue
            kind = gathers[k::2]
            rows = g.call_method("view", (buffers[f"received_{part}"], world, -1))
            pieces = g.call_function(torch.split, (rows, [x.numel for x in kind], 1))
            for i, piece in enumerate(kind):
                value = tag(g.call_function(operator.getitem, (pieces, i)), role, piece.param,
                            name=f"received_{part}_{piece.param}")
                gathered.setdefault(piece.param, []).append(g.call_method("reshape", (value, -1, *piece.shape)))
        _outer_step(graph, option, names, selected, state, anchors, _moments(graph, list(selected.values()), state),
                    lambda p: _read(option, selected, state, averaged, gathered, {}, g, p))


def _carry(graph: TrainGraph, option: LoRDO, matrix: _Matrix, nodes: dict[str, fx.Node], new_q: fx.Node,
           site: UpdateSite, moments: dict[str, fx.Node]) -> None:
    """u, v (from `moments`: the step's, or their average) written for the new Q, and the new Q."""
    g = graph.graph
    p = matrix.param
    if option.on_refresh == "reset":
        for key, target in (("u", nodes["u"]), ("v", nodes["v"]), ("error", nodes["error"]),
                            ("step", site.input("step"))):
            zeros = g.call_function(torch.ops.aten.zeros_like.default, (target,))
            tag(g.call_method("copy_", (target, zeros)), Role.WRITEBACK, p, key, name=f"reset_{key}_{p}")
    elif option.on_refresh == "keep":
        # The step's own write stands unless the sync averaged the moments.
        if option.sync_optimizer_state:
            for key, value in moments.items():
                tag(g.call_method("copy_", (nodes[key], value)), Role.WRITEBACK, p, key,
                    name=f"write_averaged_{key}_{p}")
    elif option.on_refresh == "reproject":
        for key in ("u", "v"):
            carried = tag(g.call_function(low_rank_carry, (moments[key], nodes["projection"], new_q),
                                          {"tall": matrix.tall, "squared": key == "v", "mode": "reproject"}),
                          Role.OPTIMIZER_UPDATE, p, key, name=f"carried_{key}_{p}")
            tag(g.call_method("copy_", (nodes[key], carried)), Role.WRITEBACK, p, key, name=f"write_carried_{key}_{p}")
    else:
        step = graph.last_write(site.input("step")).args[1]
        both = tag(g.call_function(ldadam_carry, (moments["u"], moments["v"], step, nodes["projection"], new_q,
                                                  site.input("beta1"), site.input("beta2")), {"tall": matrix.tall}),
                   Role.OPTIMIZER_UPDATE, p, name=f"ldadam_carry_{p}")
        for i, key in enumerate(("u", "v")):
            carried = tag(g.call_function(operator.getitem, (both, i)), Role.OPTIMIZER_UPDATE, p, key,
                          name=f"carried_{key}_{p}")
            tag(g.call_method("copy_", (nodes[key], carried)), Role.WRITEBACK, p, key, name=f"write_carried_{key}_{p}")
    write_projection(graph, p, nodes["projection"], new_q)


def _events(option: LoRDO) -> tuple[Event, ...]:
    firsts = [first_sync_step(option.sync_every, option.fragments, f) for f in range(option.fragments)]
    syncs = tuple(Event(option.event(f), every=option.sync_every, first=first) for f, first in enumerate(firsts))
    if option.delay:
        syncs += tuple(Event(option.merge_event(f), every=option.sync_every, first=first + option.delay)
                       for f, first in enumerate(firsts))
    return (INIT, *syncs) if option.first_projection == "gradient" else syncs


def local_steps(program: Program, option: LoRDO) -> PassResult:
    """Every step: the step's own gradient averaging removed; each worker steps alone."""
    removed = remove_gradient_all_reduces(program.graph.graph, "Policy.lordo")
    return PassResult(program, (f"local steps: removed {removed} gradient all-reduce(s)",))


def synchronize(program: Program, option: LoRDO) -> PassResult:
    """Event "sync": the averaged pseudo-gradient, a new global Q, the outer step."""
    graph = program.graph
    group = group_name(option.group)
    notes = (f"sync every {option.sync_every} steps, payload {option.payload!r}, "
             f"{'one worker: no collective' if group is None else f'{world_size(option.group)} workers'}",)
    fragments = fragments_of_step(graph, option.fragments, "LoRDO.fragments")
    if option.fragments > 1:
        notes += tuple(f"fragment {f} (syncs at event {option.event(f)!r}): {', '.join(names)}"
                       for f, names in enumerate(fragments))
    matrices, _ = _plan(option, graph)
    world = world_size(option.group)
    for f, names in enumerate(fragments):
        if option.event(f) in program.events and not option.delay:
            _sync(graph, option, matrices, names, group, world)
        elif option.event(f) in program.events:
            sent = _send(graph, option, matrices, names, f, group, world)
            notes += (f"fragment {f}: its {option.payload} payload ({sent:,} bytes) written to lordo.payload.{f}; "
                      f"the runtime sends it after this step and it is merged {option.delay} step(s) later",)
        if option.delay and option.merge_event(f) in program.events:
            _merge(graph, option, matrices, names, f, group, world)
            notes += (f"fragment {f}: the average sent {option.delay} step(s) ago merged",)
    return PassResult(program, notes)


_LOW_RANK_TWICE = ("LoRDO is GaLore with one global projection and infrequent sync; with low_rank both would own "
                   "the same projected moments (LoRDO alone has the low-rank inner step)")


@register_pass("lordo", stage=Stage.OPTIMIZER_STATE, option="lordo", option_type=LoRDO, releases=_releases,
               events=_events, also={Stage.COMBINE: local_steps, Stage.SYNC: synchronize}, runtime=Overlap,
               conflicts={"sync": WORKERS_COMBINE,
                          "data_parallel": Conflict(EVERY_STEP_AND_PERIODIC,
                                                    lambda lordo, every_step: over_two_levels(every_step, lordo)),
                          "low_rank": _LOW_RANK_TWICE})
def lordo(program: Program, option: LoRDO) -> PassResult:
    graph = program.graph
    matrices, dense = _plan(option, graph)
    if not matrices:
        raise ValueError("LoRDO selected no matrix for a low-rank update. Left dense: " + "; ".join(dense))
    _inner(graph, option, matrices)
    if "init" in program.events:
        _first_projection(graph, option, matrices, group_name(option.group))
    notes = tuple(f"low-rank: {m.param} {list(m.shape)} -> {'tall' if m.tall else 'wide'}" for m in matrices)
    return PassResult(program, notes + tuple(f"dense: {line}" for line in dense))
