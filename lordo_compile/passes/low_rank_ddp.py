"""Low-rank DDP (LoRDO's main baseline): GaLore with the projected gradient averaged every step.

    every step:       R_W = P_W^T grad_W (or grad_W P_W); one all-reduce (mean) of every R_W and
                      of the other parameters' full gradients;
                      lordo.galore_adamw_projected(W, mean R_W, m_W, v_W, step_W, P_W, ...)
    event "refresh" (every update_proj_gap steps, from step 0): one all-reduce of the full
                      gradients; P_W from the averaged gradient (the same on every worker),
                      R_W projected from it, then the same update.

The step's own gradient averaging is replaced: the pass decides what crosses the network.
With `group=inner` and local SGD or DiLoCo over `outer` (two levels of a 2-D arrangement of
the workers), each inner group trains as low-rank DDP and the groups sync every H steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..graph import ROLE, STATE, Role, TrainGraph, tag
from ..ops import op_named
from .collectives import (
    EVERY_STEP_AND_PERIODIC,
    WORKERS_COMBINE,
    group_name,
    insert_mean_all_reduce,
    over_two_levels,
    remove_gradient_all_reduces,
)
from .low_rank import LowRank, MatrixPlan, plan_matrices
from .manager import Conflict, Event, PassResult, Program, Stage, register_pass
from .projection import ProjectsFromFactors, projected_gradient, refreshed_projection, write_projection


@dataclass(frozen=True, kw_only=True)
class LowRankDDP:
    """GaLore's low-rank AdamW with every step's projected gradient averaged over workers.

    `low_rank` gives rank, update_proj_gap, scale, method, numerics and parameter selection
    (`on_refresh` is GaLore's "keep": the averaged moments need no carrying).
    """

    low_rank: LowRank
    group: object = None

    def __post_init__(self) -> None:
        if not isinstance(self.low_rank, LowRank):
            raise ValueError(f"LowRankDDP.low_rank must be a LowRank, got {self.low_rank!r}")


def _releases(option: LowRankDDP, info, op_name: str) -> tuple[str, ...]:
    if op_name != "adamw" or option.low_rank.choose(info) is not None:
        return ()
    return ("exp_avg", "exp_avg_sq")


def _rewrite(graph: TrainGraph, plans: list[MatrixPlan], option: LowRankDDP, group: str | None,
             refresh: bool) -> None:
    g = graph.graph
    low_rank = option.low_rank
    by_param = {plan.site_param: plan for plan in plans}
    sites = graph.updates()
    state = {p.site_param: {k: graph.add_state(spec) for k, spec in p.specs.items()} for p in plans}
    order = {n: i for i, n in enumerate(g.nodes)}
    first = min((s.node for s in sites), key=order.__getitem__)
    grads = [s.input("grad") for s in sites]
    projections = {}
    with g.inserting_before(first):
        if refresh:
            # Refresh: average the full gradients, then project them here, identically everywhere.
            grads = insert_mean_all_reduce(graph, grads, group, Role.GRADIENT, [s.param for s in sites]) \
                if group else grads
        sends = []
        for site, grad in zip(sites, grads):
            plan = by_param.get(site.param)
            if plan is None:
                sends.append(grad)
                continue
            nodes = state[site.param]
            projection = nodes["projection"]
            if refresh:
                projection, _ = refreshed_projection(
                    graph, site.param, grad, projection, nodes.get("sketch"), rank=low_rank.rank, tall=plan.tall,
                    method=low_rank.method, power_iterations=low_rank.power_iterations)
                write_projection(graph, site.param, nodes["projection"], projection)
            projections[site.param] = projection
            sends.append(projected_gradient(graph, site.param, grad, projection, tall=plan.tall,
                                            dtype=plan.info.dtype))
    if refresh:
        averaged = sends
    else:
        averaged = insert_mean_all_reduce(graph, sends, group, Role.GRADIENT, [s.param for s in sites]) \
            if group else sends
    op = op_named("galore_adamw_projected")
    for site, value in zip(sites, averaged):
        plan = by_param.get(site.param)
        if plan is None:
            site.node.replace_input_with(site.input("grad"), value)
            continue
        nodes = state[site.param]
        args = [nodes["exp_avg"] if k == "exp_avg" else nodes["exp_avg_sq"] if k == "exp_avg_sq"
                else projections[site.param] if k == "projection" else value if k == "grad" else site.input(k)
                for k in op.inputs]
        with g.inserting_before(site.node):
            new = tag(g.call_function(op.overload, tuple(args),
                                      {"scale": float(low_rank.scale), "tall": plan.tall,
                                       "numerics": low_rank.numerics, **site.node.kwargs}),
                      Role.OPTIMIZER_UPDATE, site.param, name=f"{op.name}_{site.param}")
        site.node.replace_all_uses_with(new)
        g.erase_node(site.node)
        for user in list(new.users):
            for write in list(user.users):
                key = user.meta.get(STATE)
                if write.meta.get(ROLE) == Role.WRITEBACK and key in ("exp_avg", "exp_avg_sq"):
                    write.args = (nodes[key], user)


def _events(option: LowRankDDP) -> tuple[Event, ...]:
    return (Event("refresh", every=option.low_rank.update_proj_gap, first=0),)


@register_pass("low_rank_ddp", stage=Stage.COMBINE, option="low_rank_ddp", option_type=LowRankDDP,
               releases=_releases, events=_events, runtime=ProjectsFromFactors, conflicts={
                   "sync": Conflict(EVERY_STEP_AND_PERIODIC, over_two_levels),
                   "data_parallel": WORKERS_COMBINE, "lordo": WORKERS_COMBINE,
                   "low_rank": "low-rank DDP is GaLore with its projected gradient averaged; both would own the "
                               "same projected moments (use Policy.low_rank_ddp alone)",
               })
def low_rank_ddp(program: Program, option: LowRankDDP) -> PassResult:
    group = group_name(option.group)
    graph = program.graph
    removed = remove_gradient_all_reduces(graph.graph, "Policy.low_rank_ddp")
    plans, dense = plan_matrices(option.low_rank, graph)
    plans = [p for p in plans if p.replacement == "galore_adamw_projected"]
    if not plans:
        raise ValueError("low-rank DDP selected no AdamW matrix. Left dense: " + "; ".join(dense))
    for plan in plans:
        plan.specs = {k: v for k, v in plan.specs.items() if k in ("exp_avg", "exp_avg_sq", "projection", "sketch")}
    _rewrite(graph, plans, option, group, refresh="refresh" in program.events)
    notes = tuple(f"low-rank: {p.site_param} {list(p.info.shape)}" for p in plans)
    notes += tuple(f"dense: {line}" for line in dense)
    notes += (f"removed {removed} gradient all-reduce(s) of the step; "
              + ("one worker: no collective" if group is None else "projected gradients averaged every step"),)
    return PassResult(program, notes)
