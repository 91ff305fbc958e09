"""Low-rank DDP (LoRDO's main baseline): GaLore with the projected gradient averaged every step.

    phase "step":     R_W = P_W^T grad_W (or grad_W P_W); one all-reduce (mean) of every R_W and
                      of the other parameters' full gradients;
                      lordo.galore_adamw_projected(W, mean R_W, m_W, v_W, step_W, P_W, ...)
    phase "refresh" (every update_proj_gap steps, from step 0): one all-reduce of the full
                      gradients; P_W from the averaged gradient (the same on every worker),
                      R_W projected from it, then the same update.

The step's own gradient averaging is replaced: the pass decides what crosses the network.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph import PARAM, ROLE, STATE, Role, TrainGraph, identifier
from ..ops import op_named
from ..ops.low_rank import low_rank_projection
from .collectives import group_name, insert_mean_all_reduce, remove_gradient_all_reduces
from .low_rank import LowRank, MatrixPlan, plan_matrices
from .manager import PassResult, Program, Rule, Schedule, register_pass


@dataclass(frozen=True, kw_only=True)
class LowRankDDP:
    """GaLore's low-rank AdamW with every step's projected gradient averaged over workers.

    `low_rank` gives rank, update_proj_gap, scale, method and parameter selection
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


def _tag(node: fx.Node, param: str, role: Role = Role.OPTIMIZER_UPDATE, state: str | None = None,
         name: str | None = None) -> fx.Node:
    node.meta.update({ROLE: role, PARAM: param})
    if state is not None:
        node.meta[STATE] = state
    if name is not None:
        node._rename(identifier(name))
    return node


def _phase(step: TrainGraph, name: str, plans: list[MatrixPlan], option: LowRankDDP, group: str | None,
           refresh: bool) -> TrainGraph:
    graph = step.copy(phase=name)
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
            grads = insert_mean_all_reduce(g, grads, group, Role.GRADIENT, [s.param for s in sites]) if group else grads
        sends = []
        for site, grad in zip(sites, grads):
            plan = by_param.get(site.param)
            if plan is None:
                sends.append(grad)
                continue
            nodes = state[site.param]
            projection = nodes["projection"]
            if refresh:
                computed = _tag(g.call_function(
                    low_rank_projection, (grad, projection, nodes.get("sketch", projection)),
                    {"rank": low_rank.rank, "tall": plan.tall, "method": low_rank.method,
                     "power_iterations": low_rank.power_iterations}), site.param, name=f"refresh_{site.param}")
                projection = _tag(g.call_function(operator.getitem, (computed, 0)), site.param, state="projection",
                                  name=f"new_projection_{site.param}")
                _tag(g.call_method("copy_", (nodes["projection"], projection)), site.param, Role.WRITEBACK,
                     "projection", name=f"write_projection_{site.param}")
            projections[site.param] = projection
            transposed = g.call_method("t", (projection,))
            r = g.call_function(torch.matmul, (grad, projection) if plan.tall else (transposed, grad))
            r.meta["val"] = torch.empty(plan.specs["exp_avg"].shape, device="meta")
            sends.append(_tag(r, site.param, Role.GRADIENT, name=f"projected_grad_{site.param}"))
    if refresh:
        averaged = sends
    else:
        averaged = insert_mean_all_reduce(g, sends, group, Role.GRADIENT, [s.param for s in sites]) if group else sends
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
            new = _tag(g.call_function(op.overload, tuple(args),
                                       {"scale": float(low_rank.scale), "tall": plan.tall, **site.node.kwargs}),
                       site.param, name=f"{op.name}_{site.param}")
        site.node.replace_all_uses_with(new)
        g.erase_node(site.node)
        for user in list(new.users):
            for write in list(user.users):
                key = user.meta.get(STATE)
                if write.meta.get(ROLE) == Role.WRITEBACK and key in ("exp_avg", "exp_avg_sq"):
                    write.args = (nodes[key], user)
    return graph


@register_pass("low_rank_ddp", option="low_rank_data_parallel", releases=_releases,
               conflicts=("sync", "data_parallel", "low_rank", "lordo"))
def low_rank_ddp(program: Program, option: LowRankDDP) -> PassResult:
    if set(program.phases) != {"step"}:
        raise NotImplementedError(f"low_rank_ddp runs on a single-phase step; got phases {sorted(program.phases)}")
    group = group_name(option.group)
    step = program.phases["step"].copy()
    removed = remove_gradient_all_reduces(step.graph, "Policy.low_rank_ddp")
    plans, dense = plan_matrices(option.low_rank, step)
    plans = [p for p in plans if p.replacement == "galore_adamw"]
    if not plans:
        raise ValueError("low-rank DDP selected no AdamW matrix. Left dense: " + "; ".join(dense))
    for plan in plans:
        plan.specs = {k: v for k, v in plan.specs.items() if k in ("exp_avg", "exp_avg_sq", "projection", "sketch")}
    phases = {
        "step": _phase(step, "step", plans, option, group, refresh=False),
        "refresh": _phase(step, "refresh", plans, option, group, refresh=True),
    }
    schedule = Schedule("step", (Rule("refresh", option.low_rank.update_proj_gap, 0),))
    notes = tuple(f"low-rank: {p.site_param} {list(p.info.shape)}" for p in plans)
    notes += tuple(f"dense: {line}" for line in dense)
    notes += (f"removed {removed} gradient all-reduce(s) of the step; "
              + ("one worker: no collective" if group is None else "projected gradients averaged every step"),)
    return PassResult(Program(phases, schedule, program.watches), notes)
