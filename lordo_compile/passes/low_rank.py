"""Low-rank optimizer state (GaLore): project each eligible gradient, keep moments small.

    before (phase "step"):
        adamw = lordo.adamw(W, grad_W, exp_avg_W, exp_avg_sq_W, step_W, lr, ...)   # m x n moments
    after (phase "step"):
        adamw = lordo.galore_adamw(W, grad_W, low_rank_exp_avg_W, low_rank_exp_avg_sq_W,
                                   step_W, low_rank_projection_W, lr, ..., scale=a, tall=...)  # r x n moments
    after (phase "refresh", every `update_proj_gap` steps, from step 0):
        projection = lordo.low_rank_projection(grad_W, low_rank_projection_W, ...)
        low_rank_projection_W.copy_(projection[0]); failures.add_(~projection[1])
        [moments carried to the new basis: lordo.low_rank_carry, when on_refresh != "keep"]
        adamw = lordo.galore_adamw(..., projection[0], ...)

The full-size moments are released from the optimizer before capture (`releases`), so
the optimizer holds nothing for those parameters but `step`; the low-rank moments,
projections and sketches are runtime state (`step.state_dict()`).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ..graph import PARAM, ROLE, STATE, ParamInfo, Role, StateSpec, TrainGraph, UpdateSite, identifier
from ..ops import op_named
from ..ops.low_rank import METHODS, ON_REFRESH, low_rank_carry, low_rank_projection
from .manager import PassResult, Program, Rule, Schedule, Watch, register_pass

# The optimizer update each low-rank update replaces, and the state it takes over.
_REPLACES = {
    "adamw": ("galore_adamw", ("exp_avg", "exp_avg_sq")),
    "adam": ("galore_adam", ("exp_avg", "exp_avg_sq")),
    "sgd_momentum": ("galore_sgd_momentum", ("momentum_buffer",)),
}
_SQUARED = {"exp_avg_sq"}
_HEAD = re.compile(r"(^|\.)(lm_head|head|output|classifier)\.weight$")


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
        validate_selector("LowRank", self.params)

    def choose(self, info: ParamInfo) -> str | None:
        """None when the parameter gets the low-rank update, else why it stays dense."""
        return choose_matrix(self.params, self.rank, info)


def validate_selector(owner: str, selector: object) -> None:
    """Check a `params=` selector: None, a regex, nn.Module type(s), or a callable."""
    ok = (
        selector is None
        or isinstance(selector, str)
        or (isinstance(selector, type) and issubclass(selector, nn.Module))
        or (isinstance(selector, tuple) and all(isinstance(t, type) and issubclass(t, nn.Module) for t in selector))
        or callable(selector)
    )
    if not ok:
        raise ValueError(
            f"{owner}.params must be None, a regex on parameter names, nn.Module type(s), or "
            f"a callable (name, ParamInfo) -> bool; got {selector!r}"
        )
    if isinstance(selector, str):
        try:
            re.compile(selector)
        except re.error as error:
            raise ValueError(f"{owner}.params is not a valid regex ({error}): {selector!r}") from None


def choose_matrix(selector: object, rank: int, info: ParamInfo) -> str | None:
    """None when a low-rank method takes this parameter, else why it stays dense.

    Default: 2-D weights of nn.Linear, not embeddings, not the output head.
    """
    if len(info.shape) != 2:
        return "not a matrix"
    if selector is None:
        if info.module_type is None:
            return "its module is unknown (select it with params=...)"
        if issubclass(info.module_type, nn.Embedding):
            return "embedding"
        if not issubclass(info.module_type, nn.Linear):
            return f"not an nn.Linear weight ({info.module_type.__name__})"
        if _HEAD.search(info.name):
            return "output head"
    elif isinstance(selector, str):
        if not re.search(selector, info.name):
            return f"name does not match {selector!r}"
    elif isinstance(selector, (type, tuple)):
        if info.module_type is None or not issubclass(info.module_type, selector):
            return "module type not selected"
    elif not selector(info.name, info):
        return "not selected"
    if min(info.shape) <= rank:
        return f"smaller side {min(info.shape)} <= rank {rank}"
    return None


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
                           owner="low_rank", param=site.param)
            for key in keys
        }
        specs["projection"] = StateSpec(name=f"low_rank.projection.{site.param}", shape=(side, option.rank),
                                        dtype=torch.float32, owner="low_rank", param=site.param, init="eye")
        if option.method == "randomized":
            specs["sketch"] = StateSpec(name=f"low_rank.sketch.{site.param}",
                                        shape=(other, option.rank + option.oversampling), dtype=torch.float32,
                                        owner="low_rank", param=site.param, init=f"randn:{option.seed + index}")
        plans.append(MatrixPlan(site.param, info, replacement, tall, specs))
    return plans, dense


_FAILURES = StateSpec(name="low_rank.projection_failures", shape=(), dtype=torch.int64, owner="low_rank")


def _meta(node: fx.Node, role: Role, param: str, state: str | None = None, name: str | None = None) -> fx.Node:
    node.meta.update({ROLE: role, PARAM: param})
    if state is not None:
        node.meta[STATE] = state
    if name is not None:
        node._rename(identifier(f"{name}_{param}"))
    return node


def _rewrite(graph: TrainGraph, site: UpdateSite, plan: MatrixPlan, option: LowRank, refresh: str | None,
             failures: fx.Node | None) -> None:
    """Replace one update by its low-rank form; with `refresh`, compute a new projection first."""
    g = graph.graph
    state = {key: graph.add_state(spec) for key, spec in plan.specs.items()}
    projection = state["projection"]
    moments = {key: state[key] for key in _REPLACES[site.op.name][1]}
    with g.inserting_before(site.node):
        if refresh is not None:
            method = "svd" if refresh == "first" else option.method
            computed = g.call_function(
                low_rank_projection,
                (site.input("grad"), projection, state.get("sketch", projection)),
                {"rank": option.rank, "tall": plan.tall, "method": method,
                 "power_iterations": option.power_iterations},
            )
            _meta(computed, Role.OPTIMIZER_UPDATE, plan.site_param, name="refresh")
            new_projection = _meta(g.call_function(operator.getitem, (computed, 0)), Role.OPTIMIZER_UPDATE,
                                   plan.site_param, "projection", name="new_projection")
            finite = _meta(g.call_function(operator.getitem, (computed, 1)), Role.OPTIMIZER_UPDATE,
                           plan.site_param, name="projection_finite")
            if option.on_refresh != "keep" and refresh != "first":
                for key, moment in list(moments.items()):
                    carried = g.call_function(
                        low_rank_carry, (moment, projection, new_projection),
                        {"tall": plan.tall, "squared": key in _SQUARED, "mode": option.on_refresh},
                    )
                    moments[key] = _meta(carried, Role.OPTIMIZER_UPDATE, plan.site_param, key, name=f"carried_{key}")
            use_projection = new_projection
        else:
            use_projection = projection
        step = site.input("step") if "step" in site.op.state else None
        if step is not None and option.on_refresh == "reset" and refresh == "later":
            step = _meta(g.call_function(torch.ops.aten.zeros_like.default, (step,)), Role.OPTIMIZER_UPDATE,
                         plan.site_param, "step", name="reset_step")
        replacement = op_named(plan.replacement)
        args = []
        for key in replacement.inputs:
            if key in moments:
                args.append(moments[key])
            elif key == "projection":
                args.append(use_projection)
            elif key == "step":
                args.append(step)
            else:
                args.append(site.input(key))
        kwargs = {"scale": float(option.scale), "tall": plan.tall, **site.node.kwargs}
        new = _meta(g.call_function(replacement.overload, tuple(args), kwargs), Role.OPTIMIZER_UPDATE,
                    plan.site_param, name=replacement.name)
    site.node.replace_all_uses_with(new)
    g.erase_node(site.node)
    for key, output in UpdateSite(new, replacement, plan.site_param).outputs().items():
        for write in list(output.users):
            if write.meta.get(ROLE) == Role.WRITEBACK and key in moments:
                write.args = (state[key], output)
    if refresh is not None:
        # After the update: every read of the old projection (carries, the update) precedes it.
        with g.inserting_after(new):
            not_finite = _meta(g.call_function(torch.ops.aten.logical_not.default, (finite,)), Role.OPTIMIZER_UPDATE,
                               plan.site_param, name="projection_failed")
        with g.inserting_after(not_finite):
            count = _meta(g.call_method("add_", (failures, not_finite)), Role.WRITEBACK, plan.site_param,
                          _FAILURES.name, name="count_failures")
        with g.inserting_after(count):
            _meta(g.call_method("copy_", (projection, new_projection)), Role.WRITEBACK, plan.site_param, "projection",
                  name="write_projection")


def _phase(step: TrainGraph, name: str, plans: list[MatrixPlan], option: LowRank, refresh: str | None) -> TrainGraph:
    graph = step.copy(phase=name)
    failures = graph.add_state(_FAILURES) if refresh is not None else None
    by_param = {plan.site_param: plan for plan in plans}
    for site in graph.updates():
        if site.param in by_param:
            _rewrite(graph, site, by_param[site.param], option, refresh, failures)
    return graph


@register_pass("low_rank", option="low_rank", releases=_releases, conflicts=("sync",))
def low_rank(program: Program, option: LowRank) -> PassResult:
    if set(program.phases) != {"step"}:
        raise NotImplementedError(
            f"low_rank runs on a single-phase step; this program already has phases {sorted(program.phases)}"
        )
    step = program.phases["step"]
    plans, dense = plan_matrices(option, step)
    if not plans:
        matrices = [min(i.shape) for i in step.params.values() if len(i.shape) == 2]
        hint = (
            f" rank={option.rank} is >= the smaller side of every matrix (largest: {max(matrices)}); "
            f"choose rank < {max(matrices)}." if matrices and option.rank >= max(matrices) else ""
        )
        raise ValueError(
            f"LowRank selected no parameter for a low-rank update.{hint} Left dense: " + "; ".join(dense)
        )
    phases = {"step": _phase(step, "step", plans, option, None)}
    if option.method == "subspace":
        phases["refresh_first"] = _phase(step, "refresh_first", plans, option, "first")
        rules = (Rule("refresh_first", 0, 0), Rule("refresh", option.update_proj_gap, option.update_proj_gap))
    else:
        rules = (Rule("refresh", option.update_proj_gap, 0),)
    phases["refresh"] = _phase(step, "refresh", plans, option, "later")
    watch = Watch(
        _FAILURES.name, tuple(p for p in phases if p != "step"),
        "low_rank: a gradient with non-finite values reached a projection refresh; the previous "
        "projection was kept",
    )
    summary = tuple(
        f"low-rank: {plan.site_param} {list(plan.info.shape)} -> {'tall' if plan.tall else 'wide'}, "
        f"moments {list(plan.specs[next(iter(plan.specs))].shape)}" for plan in plans
    ) + tuple(f"dense: {line}" for line in dense)
    return PassResult(Program(phases, Schedule("step", rules), program.watches + (watch,)), summary)
