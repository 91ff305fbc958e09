"""Low-rank optimizer state (GaLore): project each eligible gradient, keep moments small.

    before:
        adamw = lordo.adamw(W, grad_W, exp_avg_W, exp_avg_sq_W, step_W, lr, ...)   # m x n moments
    after (every step), AdamW:
        projected_grad_W = torch.matmul(grad_W, low_rank_projection_W)     # before the first update
        adamw = lordo.galore_adamw_projected(W, projected_grad_W, low_rank_exp_avg_W,
                    low_rank_exp_avg_sq_W, step_W, low_rank_projection_W, lr, ..., scale=a, tall=...)
    after (every step), Adam (L2 decay in the gradient) and SGD with momentum:
        update = lordo.galore_adam(W, grad_W, ..., low_rank_projection_W, ...)   # projects inside
    after, on event "refresh" (every `update_proj_gap` steps, from step 0; for the "subspace"
    method, an exact SVD on "init" and warm-started iterations from step T):
        projection = lordo.low_rank_projection(grad_W, low_rank_projection_W, ...)
        failures.copy_(failures + sum over matrices of ~projection[1])   # once, after the last refresh
        projected_grad_W = torch.matmul(grad_W, projection[0])
        [moments carried to the new basis: lordo.low_rank_carry, when on_refresh != "keep"]
        adamw = lordo.galore_adamw_projected(..., projection[0], ...)
        low_rank_projection_W.copy_(projection[0])

The refresh reads the gradient the update reads: after any averaging or correction an
earlier stage made, so with DDP every worker refreshes alike and under local SGD each
worker keeps its own projection. An ordinary AdamW step reads the full gradient only to
project it, and the non-finite check reads the projected gradient: code generation then
takes the projection from the factors of the gradient's product, dY^T (X P) rather than
(dY^T X) P, and never forms the gradient (`projection.project_from_factors`).

The full-size moments are released from the optimizer before capture (`releases`), so
the optimizer holds nothing for those parameters but `step`; the low-rank moments,
projections and sketches are runtime state (`step.state_dict()`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph import ROLE, ParamInfo, Role, StateSpec, TrainGraph, UpdateSite, tag
from ..ops import op_named
from ..ops.low_rank import METHODS, NUMERICS, ON_REFRESH, low_rank_carry
from .manager import INIT, Event, PassResult, Program, Stage, register_pass
from .projection import (PROJECTION_STATE, ProjectsFromFactors, projected_gradient, refreshed_projection,
                         write_projection)
from .select import choose_matrix, validate_selector

# The optimizer update each low-rank update replaces, and the state it takes over.
_REPLACES = {
    "adamw": ("galore_adamw_projected", ("exp_avg", "exp_avg_sq")),
    "adam": ("galore_adam", ("exp_avg", "exp_avg_sq")),
    "sgd_momentum": ("galore_sgd_momentum", ("momentum_buffer",)),
}
_SQUARED = {"exp_avg_sq"}


@dataclass(frozen=True, kw_only=True)
class LowRank:
    """GaLore-style low-rank optimizer state (ALGORITHMS.md section 1).

    Args:
      rank: r, the number of directions kept per matrix.
      update_proj_gap: T, steps between projection refreshes (from the current gradient).
      scale: a, multiplies the projected-back update.
      method: "svd" (exact, fp32), "randomized" (range finder with `oversampling` extra
        columns and `power_iterations`), or "subspace" (`power_iterations` of subspace
        iteration warm-started from the previous projection; the first is exact SVD).
      on_refresh: what the moments do when the projection changes: "keep" (GaLore),
        "reproject" into the new basis, or "reset" to zero (and bias correction restarts).
      numerics: the Adam update's arithmetic: "torch" (torch.optim.AdamW's: eps added to the
        bias-corrected sqrt(v)) or "galore_torch" (galore-torch's GaLoreAdamW: eps added to
        sqrt(v) before the bias correction). SGD with momentum has no galore-torch form.
      params: which matrices: None (2-D weights of nn.Linear, not embeddings or the output
        head), a regex on the parameter name, module type(s), or `f(name, ParamInfo) -> bool`.
        Matrices whose smaller side is <= rank always stay dense.
      seed: seeds the randomized method's sketches.

    Raises:
      ValueError: for a rank, gap, scale or count out of range, or an unknown method,
        on_refresh or selector.
    """

    rank: int
    update_proj_gap: int = 200
    scale: float = 0.25
    method: str = "svd"
    on_refresh: str = "keep"
    numerics: str = "torch"
    params: object = None
    oversampling: int = 8
    power_iterations: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for field_name in ("rank", "update_proj_gap"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LowRank.{field_name} must be an int >= 1, got {value!r}")
        for field_name in ("oversampling", "power_iterations", "seed"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LowRank.{field_name} must be an int >= 0, got {value!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not self.scale > 0:
            raise ValueError(f"LowRank.scale must be a number > 0, got {self.scale!r}")
        if self.method not in METHODS:
            raise ValueError(f"LowRank.method must be one of {METHODS}, got {self.method!r}")
        if self.on_refresh not in ON_REFRESH:
            raise ValueError(f"LowRank.on_refresh must be one of {ON_REFRESH}, got {self.on_refresh!r}")
        if self.numerics not in NUMERICS:
            raise ValueError(f"LowRank.numerics must be one of {NUMERICS}, got {self.numerics!r}")
        validate_selector("LowRank", self.params)

    def choose(self, info: ParamInfo) -> str | None:
        """None when the parameter gets the low-rank update, else why it stays dense."""
        return choose_matrix(self.params, self.rank, info)


def _releases(option: LowRank, info: ParamInfo, op_name: str) -> tuple[str, ...]:
    if op_name not in _REPLACES or option.choose(info) is not None:
        return ()
    return _REPLACES[op_name][1]


@dataclass
class MatrixPlan:
    site_param: str
    info: ParamInfo
    replacement: str
    tall: bool
    specs: dict[str, StateSpec]


def plan_matrices(option: LowRank, graph: TrainGraph) -> tuple[list[MatrixPlan], list[str]]:
    plans, dense = [], []
    for index, site in enumerate(graph.updates()):
        info = graph.params[site.param]
        reason = option.choose(info)
        if reason is None and site.op.name not in _REPLACES:
            reason = f"{site.op.qualified_name} has no low-rank form"
        if reason is not None:
            dense.append(f"{site.param} {list(info.shape)}: {reason}")
            continue
        m, n = info.shape
        tall = m >= n
        side, other = (n, m) if tall else (m, n)
        moment_shape = (m, option.rank) if tall else (option.rank, n)
        replacement, keys = _REPLACES[site.op.name]
        specs = {
            key: StateSpec(name=f"low_rank.{key}.{site.param}", shape=moment_shape, dtype=info.dtype,
                           owner="low_rank", param=site.param, moment="unsigned" if key in _SQUARED else "signed",
                           counted_by_optimizer=True)
            for key in keys
        }
        specs["projection"] = StateSpec(name=f"{PROJECTION_STATE}{site.param}", shape=(side, option.rank),
                                        dtype=torch.float32, owner="low_rank", param=site.param, init="eye")
        if option.method == "randomized":
            specs["sketch"] = StateSpec(name=f"low_rank.sketch.{site.param}",
                                        shape=(other, option.rank + option.oversampling), dtype=torch.float32,
                                        owner="low_rank", param=site.param, init=f"randn:{option.seed + index}")
        plans.append(MatrixPlan(site.param, info, replacement, tall, specs))
    return plans, dense


_FAILURES = StateSpec(name="low_rank.projection_failures", shape=(), dtype=torch.int64, owner="low_rank")


@dataclass
class Prepared:
    """What an update's low-rank form reads, computed before the first update: its state, the
    projection it uses (refreshed on a refresh), whether a refresh failed, and its gradient
    (projected where the update reads it projected)."""

    state: dict[str, fx.Node]
    projection: fx.Node
    failed: fx.Node | None
    grad: fx.Node


def _prepare(graph: TrainGraph, site: UpdateSite, plan: MatrixPlan, option: LowRank, refresh: str | None,
             first: fx.Node, order: dict[fx.Node, int]) -> Prepared:
    """The state, refreshed projection and gradient of one update, inserted before `first` (the
    first update of the graph) or, for a gradient computed later, after it (`order`: the graph's
    nodes' positions before any was inserted)."""
    g = graph.graph
    p = plan.site_param
    state = {key: graph.add_state(spec) for key, spec in plan.specs.items()}
    grad = site.input("grad")
    with g.inserting_before(first if order[grad] < order[first] else grad.next):
        projection, failed = state["projection"], None
        if refresh is not None:
            method = "svd" if refresh == "first" else option.method
            projection, finite = refreshed_projection(
                graph, p, grad, projection, state.get("sketch"), rank=option.rank, tall=plan.tall,
                method=method, power_iterations=option.power_iterations)
            failed = tag(g.call_function(torch.ops.aten.logical_not.default, (finite,)), Role.OPTIMIZER_UPDATE,
                         p, name=f"projection_failed_{p}")
        if op_named(plan.replacement).projected_gradient:
            # Projected here, before the first update, the full gradient is read only to be
            # projected (the non-finite check reads the projection too), and code generation
            # may take the projection from the gradient's factors (`ProjectsFromFactors`).
            grad = projected_gradient(graph, p, grad, projection, tall=plan.tall, dtype=plan.info.dtype)
    return Prepared(state, projection, failed, grad)


def _rewrite(graph: TrainGraph, site: UpdateSite, plan: MatrixPlan, option: LowRank, refresh: str | None,
             prepared: Prepared) -> None:
    """Replace one update by its low-rank form, reading what `_prepare` computed."""
    g = graph.graph
    p = plan.site_param
    state = prepared.state
    moments = {key: state[key] for key in _REPLACES[site.op.name][1]}
    with g.inserting_before(site.node):
        if option.on_refresh != "keep" and refresh == "later":
            for key, moment in list(moments.items()):
                carried = g.call_function(
                    low_rank_carry, (moment, state["projection"], prepared.projection),
                    {"tall": plan.tall, "squared": key in _SQUARED, "mode": option.on_refresh},
                )
                moments[key] = tag(carried, Role.OPTIMIZER_UPDATE, p, key, name=f"carried_{key}_{p}")
        step = site.input("step") if "step" in site.op.state else None
        if step is not None and option.on_refresh == "reset" and refresh == "later":
            step = tag(g.call_function(torch.ops.aten.zeros_like.default, (step,)), Role.OPTIMIZER_UPDATE, p, "step",
                       name=f"reset_step_{p}")
        replacement = op_named(plan.replacement)
        args = []
        for key in replacement.inputs:
            if key in moments:
                args.append(moments[key])
            elif key == "projection":
                args.append(prepared.projection)
            elif key == "step":
                args.append(step)
            elif key == "grad":
                args.append(prepared.grad)
            else:
                args.append(site.input(key))
        kwargs = {"scale": float(option.scale), "tall": plan.tall, **site.node.kwargs}
        if "numerics" in replacement.attributes:
            kwargs["numerics"] = option.numerics
        new = tag(g.call_function(replacement.overload, tuple(args), kwargs), Role.OPTIMIZER_UPDATE, p,
                  name=f"{replacement.name}_{p}")
    site.node.replace_all_uses_with(new)
    g.erase_node(site.node)
    for key, output in UpdateSite(new, replacement, p).outputs().items():
        for write in list(output.users):
            if write.meta.get(ROLE) == Role.WRITEBACK and key in moments:
                write.args = (state[key], output)
    if refresh is not None:
        # After the update: every read of the old projection (carries, the update) precedes it.
        with g.inserting_before(new.next):
            write_projection(graph, p, state["projection"], prepared.projection)


def _count_failures(graph: TrainGraph, failed: list[fx.Node]) -> None:
    """One write of the failure count per step, after the last refresh: a count chained through
    the state, matrix by matrix, would read between writes that the non-finite guard moves after
    its check."""
    g = graph.graph
    failures = graph.state_node(_FAILURES)
    order = {n: i for i, n in enumerate(g.nodes)}
    with g.inserting_before(max(failed, key=order.__getitem__).next):
        each = tag(g.call_function(torch.ops.aten.stack.default, (failed,)), Role.OPTIMIZER_UPDATE, name="projections_failed")
        total = tag(g.call_function(torch.ops.aten.sum.default, (each,)), Role.OPTIMIZER_UPDATE,
                    name="projection_failures_now")
        counted = tag(g.call_function(torch.ops.aten.add.Tensor, (failures, total)), Role.OPTIMIZER_UPDATE,
                      name="projection_failures_counted")
        tag(g.call_method("copy_", (failures, counted)), Role.WRITEBACK, state=_FAILURES.name,
            name="count_projection_failures")


def _events(option: LowRank) -> tuple[Event, ...]:
    if option.method == "subspace":
        # Warm-started iterations need a first basis: an exact SVD at the first step.
        return (INIT, Event("refresh", every=option.update_proj_gap, first=option.update_proj_gap))
    return (Event("refresh", every=option.update_proj_gap, first=0),)


class ProjectionWatch(ProjectsFromFactors):
    """After a step that refreshed projections, reads the failure counter (one host read) and
    warns once if a non-finite gradient made a refresh keep its previous projection; asks code
    generation to project gradients from their factors (`ProjectsFromFactors`)."""

    def __init__(self, option: LowRank, context) -> None:
        super().__init__(option, context)
        self.seen = 0
        self.warned = False

    def after_call(self, events: frozenset[str]) -> bool:
        if not events & {"refresh", "init"}:
            return True
        count = int(self.context.runtime.tensors[_FAILURES.name])
        if count > self.seen and not self.warned:
            self.warned = True
            warnings.warn("low_rank: a gradient with non-finite values reached a projection refresh; the previous "
                          f"projection was kept (step {self.context.runtime.step}, {count} so far; warned once)",
                          RuntimeWarning, stacklevel=3)
        self.seen = count
        return True

    def state_dict(self) -> dict:
        return {"failures_seen": self.seen, "warned": self.warned}

    def load_state_dict(self, state) -> None:
        self.seen = int(state.get("failures_seen", 0))
        self.warned = bool(state.get("warned", False))


@register_pass("low_rank", stage=Stage.OPTIMIZER_STATE, option="low_rank", option_type=LowRank,
               releases=_releases, events=_events, runtime=ProjectionWatch)
def low_rank(program: Program, option: LowRank) -> PassResult:
    graph = program.graph
    plans, dense = plan_matrices(option, graph)
    if option.numerics == "galore_torch":
        without = [f"{plan.site_param} ({plan.replacement})" for plan in plans
                   if "numerics" not in op_named(plan.replacement).attributes]
        if without:
            raise ValueError("LowRank(numerics='galore_torch') follows galore-torch's AdamW, which has no form for "
                             f"{', '.join(without)}; use numerics='torch' or an Adam optimizer")
    if not plans:
        matrices = [min(i.shape) for i in graph.params.values() if len(i.shape) == 2]
        hint = (
            f" rank={option.rank} is >= the smaller side of every matrix (largest: {max(matrices)}); "
            f"choose rank < {max(matrices)}." if matrices and option.rank >= max(matrices) else ""
        )
        raise ValueError(
            f"LowRank selected no parameter for a low-rank update.{hint} Left dense: " + "; ".join(dense)
        )
    if "init" in program.events and option.method == "subspace":
        refresh = "first"
    elif "refresh" in program.events:
        refresh = "later"
    else:
        refresh = None
    by_param = {plan.site_param: plan for plan in plans}
    sites = [site for site in graph.updates() if site.param in by_param]
    order = {n: i for i, n in enumerate(graph.graph.nodes)}
    prepared = [_prepare(graph, site, by_param[site.param], option, refresh, sites[0].node, order) for site in sites]
    for site, ready in zip(sites, prepared):
        _rewrite(graph, site, by_param[site.param], option, refresh, ready)
    if refresh is not None:
        _count_failures(graph, [ready.failed for ready in prepared])
    summary = tuple(
        f"low-rank: {plan.site_param} {list(plan.info.shape)} -> {'tall' if plan.tall else 'wide'}, "
        f"moments {list(plan.specs[next(iter(plan.specs))].shape)}" for plan in plans
    ) + tuple(f"dense: {line}" for line in dense)
    return PassResult(program, summary)
