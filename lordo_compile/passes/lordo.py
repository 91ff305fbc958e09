"""LoRDO: low-rank inner steps under one global projection, infrequent sync (ALGORITHMS.md 3).

    phase "init" (step 0):   Q_W = top-r singular vectors of mean_k(grad_W)   (global; or own grad)
                             then the local step below
    phase "local":           lordo.lordo_adamw(W, grad_W, u_W, v_W, E_W, step_W, Q_W, ...)
                             (the step's own gradient averaging removed; dense params keep AdamW)
    phase "sync" (after steps H, 2H, ...): the local step, then
        delta = anchor - W' for every parameter, averaged over workers by `payload`:
          "full"      one all-reduce of every delta
          "low_rank"  all-reduce Q^T y and a sketch y Omega (y = delta + sync error feedback);
                      delta ~ Q mean(Q^T y); the error feedback keeps y - Q Q^T y locally
          "int8"      all-gather int8 codes of y = delta + error feedback, per-row scales
        Q' from the averaged delta (or its sketch) on every worker alike: Q is never sent;
        outer SGD on the anchor; every worker reset to the anchor; u, v (E) carried to Q'.

Ablations: `projection="local"` (each worker's Q from its own gradient at each sync) and
`omega=1` (no full-rank term).
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph import ROLE, STATE, ParamInfo, Role, StateSpec, TrainGraph, UpdateSite, tag
from ..ops import op_named
from ..ops.lordo import NORMALIZERS, int8_rows
from ..ops.low_rank import METHODS, ON_REFRESH, low_rank_carry, low_rank_projection
from .collectives import (
    group_name,
    insert_all_gather,
    insert_mean_all_reduce,
    remove_gradient_all_reduces,
    world_size,
)
from .low_rank import choose_matrix, validate_selector
from .manager import PassResult, Program, Rule, Schedule, register_pass

PAYLOADS = ("full", "low_rank", "int8")
PROJECTIONS = ("global", "local")


@dataclass(frozen=True, kw_only=True)
class LoRDO:
    """LoRDO (ALGORITHMS.md section 3); every open choice of the method is a field.

    Args:
      rank: r, directions kept per selected matrix.
      sync_every: H >= 2, local steps between syncs.
      omega: the quasi-hyperbolic mix: 1 is pure low-rank Adam, below 1 adds the full-rank term.
      mu: scale of the full-rank term's normalizer.
      full_rank_normalizer: D, "column" (v's mean broadcast), "rms" (RMS of the gradient), or
        "full" (a full-size second moment: a baseline, it costs m x n per matrix).
      projection: "global" (Q from the averaged pseudo-gradient) or "local" (each worker's Q
        from its own gradient at each sync: the paper's ablation).
      method: how Q is computed: "svd", "randomized" or "subspace" (see LowRank).
      on_refresh: u, v when Q changes: "keep", "reproject" or "reset" (which also clears
        the error feedback and restarts bias correction).
      payload: what a sync sends for the selected matrices: "full", "low_rank" or "int8".
      sketch_size: extra sketch columns beyond `rank` for the "low_rank" payload.
      outer_lr, outer_momentum, nesterov: the outer SGD (1, 0, False: model averaging).
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
    projection: str = "global"
    method: str = "svd"
    on_refresh: str = "reproject"
    payload: str = "int8"
    sketch_size: int = 8
    oversampling: int = 8
    power_iterations: int = 1
    seed: int = 0
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    nesterov: bool = False
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
        choices = {"full_rank_normalizer": NORMALIZERS, "projection": PROJECTIONS, "method": METHODS,
                   "on_refresh": ON_REFRESH, "payload": PAYLOADS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"LoRDO.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.payload == "low_rank" and self.projection != "global":
            raise ValueError("LoRDO.payload='low_rank' sends Q^T delta, which needs one Q on every worker: "
                             "use projection='global'")
        if self.nesterov and self.outer_momentum == 0:
            raise ValueError("LoRDO.nesterov=True needs outer_momentum > 0")
        if self.clip is not None and (not isinstance(self.clip, numbers.Real) or not self.clip > 0):
            raise ValueError(f"LoRDO.clip must be None or > 0, got {self.clip!r}")
        validate_selector("LoRDO", self.params)

    def choose(self, info: ParamInfo, op_name: str) -> str | None:
        reason = choose_matrix(self.params, self.rank, info)
        if reason is None and op_name != "adamw":
            return f"LoRDO's inner step is AdamW, this parameter is updated by lordo.{op_name}"
        return reason


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

        def spec(key, shape, dtype=info.dtype, init="zeros"):
            matrix.specs[key] = StateSpec(name=f"lordo.{key}.{site.param}", shape=tuple(shape), dtype=dtype,
                                          owner="lordo", param=site.param, init=init)

        spec("u", moment)
        spec("v", moment)
        spec("error", info.shape)
        if option.full_rank_normalizer == "full":
            spec("second_moment", info.shape)
        spec("projection", (matrix.side, option.rank), torch.float32, "eye")
        if option.method == "randomized":
            spec("sketch", (matrix.other, option.rank + option.oversampling), torch.float32,
                 f"randn:{option.seed + index}")
        if option.payload != "full":
            # Seeded alike on every worker: the averaged sketch is a sketch of the average.
            spec("payload_sketch", (matrix.other, option.rank + option.sketch_size), torch.float32,
                 f"randn:{option.seed + 1000 + index}")
        if option.payload in ("low_rank", "int8"):
            spec("sync_error", info.shape)
        matrices.append(matrix)
    return matrices, dense


def _site(graph: TrainGraph, param: str) -> UpdateSite:
    return next(s for s in graph.updates() if s.param == param)


def _inner(graph: TrainGraph, option: LoRDO, matrices: list[_Matrix]) -> dict[str, dict[str, fx.Node]]:
    """Replace each selected AdamW update by lordo_adamw; returns each matrix's state nodes."""
    g = graph.graph
    op = op_named("lordo_adamw_full" if option.full_rank_normalizer == "full" else "lordo_adamw")
    state = {}
    for matrix in matrices:
        site = _site(graph, matrix.param)
        nodes = {key: graph.add_state(spec) for key, spec in matrix.specs.items()}
        state[matrix.param] = nodes
        args = [nodes[key] if key in nodes else site.input(key) for key in op.inputs]
        kwargs = {"omega": float(option.omega), "mu": float(option.mu), "normalizer": option.full_rank_normalizer,
                  "clip": float(option.clip or 0.0), "tall": matrix.tall, "maximize": site.node.kwargs["maximize"]}
        with g.inserting_before(site.node):
            new = tag(g.call_function(op.overload, tuple(args), kwargs), Role.OPTIMIZER_UPDATE, matrix.param,
                       name=f"{op.name}_{matrix.param}")
        old_outputs = site.outputs()
        new_outputs = {}
        with g.inserting_after(new):
            for i, key in enumerate(op.output_keys):
                new_outputs[key] = tag(g.call_function(operator.getitem, (new, i)), Role.OPTIMIZER_UPDATE,
                                        matrix.param, key, name=f"new_{key}_{matrix.param}")
        for key in ("param", "step"):
            old_outputs[key].replace_all_uses_with(new_outputs[key])
        for key in ("exp_avg", "exp_avg_sq"):
            for write in list(old_outputs[key].users):
                g.erase_node(write)
        for key in old_outputs:
            g.erase_node(old_outputs[key])
        g.erase_node(site.node)
        point = next(u for u in new_outputs["param"].users if u.meta.get(ROLE) == Role.WRITEBACK)
        with g.inserting_after(point):
            for key in op.state:
                if key != "step":
                    tag(g.call_method("copy_", (nodes[key], new_outputs[key])), Role.WRITEBACK, matrix.param, key,
                         name=f"write_{key}_{matrix.param}")
        nodes.update({f"new_{k}": v for k, v in new_outputs.items()})
    return state


def _projection(g: fx.Graph, option: LoRDO, matrix: _Matrix, nodes: dict[str, fx.Node], source: fx.Node,
                method: str) -> fx.Node:
    computed = tag(g.call_function(
        low_rank_projection, (source, nodes["projection"], nodes.get("sketch", nodes["projection"])),
        {"rank": option.rank, "tall": matrix.tall, "method": method, "power_iterations": option.power_iterations}),
        Role.OPTIMIZER_UPDATE, matrix.param, name=f"refresh_{matrix.param}")
    return tag(g.call_function(operator.getitem, (computed, 0)), Role.OPTIMIZER_UPDATE, matrix.param,
                "projection", name=f"new_projection_{matrix.param}")


def _first_projection(graph: TrainGraph, option: LoRDO, matrices: list[_Matrix], group: str | None) -> None:
    """Phase "init": Q from the first gradient averaged over workers (or the worker's own, for
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
                sketch = tag(g.call_function(torch.matmul, (a, nodes[m.param]["payload_sketch"])), Role.GRADIENT,
                              m.param, name=f"gradient_sketch_{m.param}")
                sketch.meta["val"] = torch.empty((m.side, option.rank + option.sketch_size), device="meta")
                sources.append(sketch)
            else:
                sources.append(grad)
    if option.projection == "global" and group is not None:
        sources = insert_mean_all_reduce(g, sources, group, Role.GRADIENT, [m.param for m in matrices])
    with g.inserting_before(point):
        for m, source in zip(matrices, sources):
            if sketched and m.tall:
                source = g.call_method("t", (source,))
            new = _projection(g, option, m, nodes[m.param], source, "svd")
            sites[m.param].node.replace_input_with(nodes[m.param]["projection"], new)
            tag(g.call_method("copy_", (nodes[m.param]["projection"], new)), Role.WRITEBACK, m.param, "projection",
                 name=f"write_projection_{m.param}")


def _state_nodes(graph: TrainGraph, matrix: _Matrix) -> dict[str, fx.Node]:
    names = {spec.name: key for key, spec in matrix.specs.items()}
    return {names[n.meta[STATE]]: n for n in graph.placeholders() if n.meta.get(STATE) in names}


def _sync(graph: TrainGraph, option: LoRDO, matrices: list[_Matrix], group: str | None, world: int) -> None:
    """Phase "sync": pseudo-gradients, payload, new Q, outer step, reset, moments carried."""
    g = graph.graph
    sites = graph.updates()
    names = [s.param for s in sites]
    selected = {m.param: m for m in matrices}
    anchors, buffers = {}, {}
    for site in sites:
        info = graph.params[site.param]
        anchors[site.param] = graph.add_state(StateSpec(
            name=f"sync.anchor.{site.param}", shape=info.shape, dtype=info.dtype, owner="lordo", param=site.param,
            init=f"copy:{site.param}"))
        if option.outer_momentum:
            buffers[site.param] = graph.add_state(StateSpec(
                name=f"sync.outer_momentum.{site.param}", shape=info.shape, dtype=info.dtype, owner="lordo",
                param=site.param))
    new_params = {s.param: s.outputs()["param"] for s in sites}
    order = {n: i for i, n in enumerate(g.nodes)}
    last = max((u for n in new_params.values() for u in n.users), key=order.__getitem__)
    # Everything below goes before this node, in creation order, after the local step.
    boundary = last.next
    state = {m.param: _state_nodes(graph, m) for m in matrices}
    averaged: dict[str, fx.Node] = {}
    new_q: dict[str, fx.Node] = {}
    with g.inserting_before(boundary):
        deltas = {}
        for p in names:
            delta = g.call_function(torch.ops.aten.sub.Tensor, (anchors[p], new_params[p]))
            delta.meta["val"] = anchors[p].meta["val"]
            deltas[p] = tag(delta, Role.GRADIENT, p, name=f"pseudo_gradient_{p}")
        sends, send_params, gathers, gather_params = [], [], [], []
        payload = {}
        for p in names:
            if p not in selected or option.payload == "full":
                sends.append(deltas[p])
                send_params.append(p)
                continue
            m, nodes = selected[p], state[p]
            y = tag(g.call_function(torch.ops.aten.add.Tensor, (deltas[p], nodes["sync_error"])), Role.GRADIENT, p,
                     name=f"sync_input_{p}")
            a = tag(g.call_method("t", (y,)), Role.GRADIENT, p) if m.tall else y
            if option.payload == "low_rank":
                q = nodes["projection"]
                coords = tag(g.call_function(torch.matmul, (g.call_method("t", (q,)), a)), Role.GRADIENT, p,
                              name=f"payload_coordinates_{p}")
                sketch = tag(g.call_function(torch.matmul, (a, nodes["payload_sketch"])), Role.GRADIENT, p,
                              name=f"payload_sketch_{p}")
                for node, shape in ((coords, (option.rank, m.other)), (sketch, (m.side, option.rank + option.sketch_size))):
                    node.meta["val"] = torch.empty(shape, device="meta")
                kept = g.call_function(torch.matmul, (q, coords))
                residual = g.call_function(torch.ops.aten.sub.Tensor, (a, kept))
                residual = g.call_method("t", (residual,)) if m.tall else residual
                tag(g.call_method("copy_", (nodes["sync_error"], residual)), Role.WRITEBACK, p, "sync_error",
                     name=f"write_sync_error_{p}")
                payload[p] = (coords, sketch)
                sends += [coords, sketch]
                send_params += [p, p]
            else:
                codes_scales = g.call_function(int8_rows, (a,))
                codes = tag(g.call_function(operator.getitem, (codes_scales, 0)), Role.GRADIENT, p,
                             name=f"int8_codes_{p}")
                scales = tag(g.call_function(operator.getitem, (codes_scales, 1)), Role.GRADIENT, p,
                              name=f"int8_scales_{p}")
                codes.meta["val"] = torch.empty((m.side, m.other), dtype=torch.int8, device="meta")
                scales.meta["val"] = torch.empty((m.side, 1), dtype=torch.float32, device="meta")
                dequantized = g.call_function(torch.mul, (g.call_method("float", (codes,)), scales))
                residual = g.call_function(torch.ops.aten.sub.Tensor, (a, dequantized))
                residual = g.call_method("t", (residual,)) if m.tall else residual
                tag(g.call_method("copy_", (nodes["sync_error"], residual)), Role.WRITEBACK, p, "sync_error",
                     name=f"write_sync_error_{p}")
                payload[p] = (codes, scales, dequantized)
                gathers += [codes, scales]
                gather_params += [p, p]
    reduced = dict(zip(range(len(sends)), insert_mean_all_reduce(g, sends, group, Role.GRADIENT, send_params)
                       if group else sends))
    gathered = insert_all_gather(g, gathers, group, world, Role.GRADIENT, gather_params) if group and gathers else []
    with g.inserting_before(boundary):
        cursor = 0
        gather_cursor = 0
        for p in names:
            m = selected.get(p)
            if m is None or option.payload == "full":
                averaged[p] = reduced[cursor]
                cursor += 1
                source = averaged[p]
            elif option.payload == "low_rank":
                coords, sketch = reduced[cursor], reduced[cursor + 1]
                cursor += 2
                delta_a = g.call_function(torch.matmul, (state[p]["projection"], coords))
                averaged[p] = g.call_method("t", (delta_a,)) if m.tall else delta_a
                source = sketch
            else:
                if group:
                    codes, scales = gathered[gather_cursor], gathered[gather_cursor + 1]
                    gather_cursor += 2
                    values = g.call_function(torch.mul, (g.call_method("float", (codes,)), scales))
                    mean_a = g.call_method("mean", (values, 0))
                else:
                    mean_a = payload[p][2]
                averaged[p] = g.call_method("t", (mean_a,)) if m.tall else mean_a
                source = averaged[p]
            if m is not None:
                if option.projection == "local":
                    source = _site(graph, p).input("grad")
                method = option.method
                if option.payload == "low_rank":
                    # The averaged sketch spans the average's column space: its top singular vectors.
                    sketch_source = g.call_method("t", (source,)) if m.tall else source
                    new_q[p] = _projection(g, option, m, {**state[p], "sketch": state[p]["projection"]},
                                           sketch_source, "svd")
                else:
                    new_q[p] = _projection(g, option, m, state[p], source, method)
        _outer_updates(g, graph, option, names, averaged, anchors, buffers, sites)
        for m in matrices:
            _carry(g, option, m, state[m.param], new_q[m.param], _site(graph, m.param))


def _outer_updates(g, graph, option, names, averaged, anchors, buffers, sites) -> None:
    op = op_named("outer_sgd_momentum" if option.outer_momentum else "outer_sgd")
    kwargs = {"lr": float(option.outer_lr)}
    if option.outer_momentum:
        kwargs.update(momentum=float(option.outer_momentum), nesterov=bool(option.nesterov))
    for p in names:
        args = (anchors[p], averaged[p]) + ((buffers[p],) if option.outer_momentum else ())
        outer = tag(g.call_function(op.overload, args, kwargs), Role.OPTIMIZER_UPDATE, p, name=f"{op.name}_{p}")
        anchor = outer
        if option.outer_momentum:
            anchor = tag(g.call_function(operator.getitem, (outer, 0)), Role.OPTIMIZER_UPDATE, p, "param")
            buf = tag(g.call_function(operator.getitem, (outer, 1)), Role.OPTIMIZER_UPDATE, p, "momentum_buffer")
            tag(g.call_method("copy_", (buffers[p], buf)), Role.WRITEBACK, p, "outer_momentum",
                 name=f"write_outer_momentum_{p}")
        tag(g.call_method("copy_", (anchors[p], anchor)), Role.WRITEBACK, p, "anchor", name=f"write_anchor_{p}")
        placeholder = next(s.input("param") for s in sites if s.param == p)
        tag(g.call_method("copy_", (placeholder, anchor)), Role.WRITEBACK, p, "param", name=f"reset_to_anchor_{p}")


def _carry(g: fx.Graph, option: LoRDO, matrix: _Matrix, nodes: dict[str, fx.Node], new_q: fx.Node,
           site: UpdateSite) -> None:
    p = matrix.param
    outputs = site.outputs()
    if option.on_refresh == "reproject":
        for key in ("u", "v"):
            carried = tag(g.call_function(low_rank_carry, (outputs[key], nodes["projection"], new_q),
                                           {"tall": matrix.tall, "squared": key == "v", "mode": "reproject"}),
                           Role.OPTIMIZER_UPDATE, p, key, name=f"carried_{key}_{p}")
            tag(g.call_method("copy_", (nodes[key], carried)), Role.WRITEBACK, p, key, name=f"write_carried_{key}_{p}")
    elif option.on_refresh == "reset":
        for key in ("u", "v", "error"):
            tag(g.call_method("zero_", (nodes[key],)), Role.WRITEBACK, p, key, name=f"reset_{key}_{p}")
        tag(g.call_method("zero_", (site.input("step"),)), Role.WRITEBACK, p, "step", name=f"reset_step_{p}")
    tag(g.call_method("copy_", (nodes["projection"], new_q)), Role.WRITEBACK, p, "projection",
         name=f"write_projection_{p}")


@register_pass("lordo", option="low_rank_sync", releases=_releases, conflicts=("sync", "data_parallel", "low_rank"))
def lordo(program: Program, option: LoRDO) -> PassResult:
    if set(program.phases) != {"step"}:
        raise NotImplementedError(f"lordo runs on a single-phase step; got phases {sorted(program.phases)}")
    group = group_name(option.group)
    world = world_size(option.group)
    step = program.phases["step"]
    matrices, dense = _plan(option, step)
    if not matrices:
        raise ValueError("LoRDO selected no matrix for a low-rank update. Left dense: " + "; ".join(dense))
    local = step.copy(phase="local")
    removed = remove_gradient_all_reduces(local.graph, "Policy.lordo")
    _inner(local, option, matrices)
    init = local.copy(phase="init")
    _first_projection(init, option, matrices, group)
    synced = local.copy(phase="sync")
    _sync(synced, option, matrices, group, world)
    schedule = Schedule("local", (Rule("init", 0, 0), Rule("sync", option.sync_every, option.sync_every - 1)))
    notes = tuple(f"low-rank: {m.param} {list(m.shape)} -> {'tall' if m.tall else 'wide'}" for m in matrices)
    notes += tuple(f"dense: {line}" for line in dense)
    notes += (f"local phase: removed {removed} gradient all-reduce(s)",
              f"sync every {option.sync_every} steps, payload {option.payload!r}, "
              f"{'one worker: no collective' if group is None else f'{world} workers'}")
    return PassResult(Program({"init": init, "local": local, "sync": synced}, schedule, program.watches), notes)
