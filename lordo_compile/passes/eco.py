"""ECO: quantized weights with the rounding error fed back into the momentum (ALGORITHMS.md 5).

    before (phase "step"):
        adamw = lordo.adamw(W, grad_W, exp_avg_W, exp_avg_sq_W, step_W, lr, ...)
    after, mode "eco" (phase "step"):
        adamw = lordo.eco_adamw(W, grad_W, exp_avg_W, exp_avg_sq_W, step_W, eco_step, lr, ...,
                                format=..., rounding=..., mode="eco")   # W+ on the grid, error into m
    after (phase "init", step 0 only): the same, with W replaced by its quantized value first
        quantized_W = lordo.eco_forward_quantize(W, ...); forward and update read quantized_W

The weight is on the quantization grid after every step, so the forward reads it as it is.
Mode "naive" re-quantizes after each step and drops the error; mode "master" keeps the
weight in full precision and makes the forward read a quantized copy (straight-through
gradient): the two baselines of the paper.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph import PARAM, ROLE, ParamInfo, Role, StateSpec, TrainGraph, tag
from ..ops import op_named
from ..ops.eco import (
    FORMATS, MODES, ROUNDINGS, SCALES, code_dtype, code_shape, eco_decode, forward_quantize, scale_shape,
)
from .low_rank import choose_matrix, validate_selector
from .manager import PassResult, Program, Rule, Schedule, register_pass

_REPLACES = {"adamw": "eco_adamw", "sgd_momentum": "eco_sgd_momentum"}
_COUNTER = StateSpec(name="eco.step", shape=(), dtype=torch.int64, owner="eco")
_WHY_NOT = (
    "ECO stores each weight on a quantization grid and feeds the rounding error into a full-size "
    "momentum; {other} {reason}"
)


@dataclass(frozen=True, kw_only=True)
class ECO:
    """Weights kept quantized, the quantization error fed into the momentum (ALGORITHMS.md 5).

    Args:
      format: "fp8_e4m3", "int8" or "int4" (per group of `group_size`).
      scale: "per_row" or "per_tensor" (fp8 and int8; int4 scales per group).
      rounding: "nearest" or "stochastic" (seeded by `seed`, reproducible).
      mode: "eco", "naive" (error dropped) or "master" (a full-precision master weight, the
        forward reads its quantized copy).
      params: which weights, as LowRank.params (default: nn.Linear weights but the head).

    Raises:
      ValueError: for a value out of range or an unknown choice, naming the field.
    """

    format: str = "fp8_e4m3"
    scale: str = "per_row"
    rounding: str = "nearest"
    group_size: int = 32
    mode: str = "eco"
    seed: int = 0
    params: object = None

    def __post_init__(self) -> None:
        for name, choices in (("format", FORMATS), ("scale", SCALES), ("rounding", ROUNDINGS), ("mode", MODES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"ECO.{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name, low in (("group_size", 2), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ECO.{name} must be an int >= {low}, got {value!r}")
        if self.format == "int4" and self.group_size % 2:
            raise ValueError(f"ECO.group_size must be even for int4 (two codes per byte), got {self.group_size}")
        validate_selector("ECO", self.params)

    def choose(self, info: ParamInfo) -> str | None:
        reason = choose_matrix(self.params, 0, info)
        if reason is None and self.format == "int4" and info.shape[-1] % self.group_size:
            reason = f"input size {info.shape[-1]} is not a multiple of group_size {self.group_size}"
        return reason

    def quantizer(self) -> dict:
        return {"format": self.format, "scale": self.scale, "group_size": self.group_size}


def _storage(option: ECO, info: ParamInfo) -> dict[str, StateSpec]:
    shape = tuple(info.shape)
    return {
        "codes": StateSpec(name=f"eco.codes.{info.name}", shape=code_shape(shape, option.format),
                           dtype=code_dtype(option.format), owner="eco", param=info.name, holds="weight"),
        "scales": StateSpec(name=f"eco.scales.{info.name}", shape=scale_shape(shape, option.format, option.scale,
                                                                             option.group_size),
                            dtype=torch.float32, owner="eco", param=info.name, holds="weight"),
    }


def _rebuild_weights(graph: TrainGraph, option: ECO, stored: dict[str, dict[str, fx.Node]],
                     weights: dict[str, fx.Node]) -> None:
    """At the graph's start, write each stored weight back from its codes (the runtime gave
    it empty storage of the right size); grad mode is off around the writes, as in an update."""
    g = graph.graph
    first = next(n for n in g.nodes if n.meta.get(ROLE) in (Role.FORWARD, Role.LOSS))
    with g.inserting_before(first):
        tag(g.call_function(torch._C._set_grad_enabled, (False,)), Role.OTHER, None, name="weights_from_codes")
        for name, state in stored.items():
            decoded = g.call_function(eco_decode, (state["codes"], state["scales"]),
                                      {"format": option.format, "group_size": option.group_size})
            tag(decoded, Role.FORWARD, name, name=f"decoded_{name}")
            tag(g.call_method("copy_", (weights[name], decoded)), Role.FORWARD, name, name=f"rebuild_{name}")
        tag(g.call_function(torch._C._set_grad_enabled, (True,)), Role.OTHER, None, name="forward_with_grad")


def _rewrite(graph: TrainGraph, option: ECO, chosen: dict[str, str], initial: bool) -> None:
    g = graph.graph
    counter = graph.add_state(_COUNTER)
    with g.inserting_after(counter):
        next_counter = tag(g.call_function(torch.ops.aten.add.Scalar, (counter, 1)), Role.OPTIMIZER_UPDATE,
                             None, name="next_eco_step")
    with g.inserting_before(list(g.nodes)[-1]):
        tag(g.call_method("copy_", (counter, next_counter)), Role.WRITEBACK, state=_COUNTER.name, name="write_eco_step")
    weights = {n.meta[PARAM]: n for n in graph.placeholders() if n.meta.get(ROLE) == Role.PARAMETER}
    stored = {name: {key: graph.add_state(spec) for key, spec in _storage(option, graph.params[name]).items()}
              for name in chosen}
    if not initial:
        _rebuild_weights(graph, option, stored, weights)
    for salt, site in enumerate(graph.updates()):
        if site.param not in chosen:
            continue
        weight = weights[site.param]
        if initial:
            # The weight starts on the grid: forward and update read Q(W0) (the gradient still
            # reaches W0, straight through).
            readers = [u for u in weight.users if u.meta.get(ROLE) in (Role.FORWARD, Role.LOSS)] + [site.node]
            with g.inserting_before(readers[0]):
                start = g.call_function(forward_quantize, (weight,), option.quantizer())
            tag(start, Role.FORWARD, site.param, name=f"quantized_{site.param}")
            for reader in readers:
                reader.replace_input_with(weight, start)
        replacement = op_named(chosen[site.param])
        state = stored[site.param]
        args = [counter if key == "counter" else state[key] if key in state else site.input(key)
                for key in replacement.inputs]
        kwargs = {**{k: v for k, v in site.node.kwargs.items() if k != "nesterov"}, **option.quantizer(),
                  "rounding": option.rounding, "mode": option.mode, "seed": option.seed, "salt": salt}
        with g.inserting_before(site.node):
            new = tag(g.call_function(replacement.overload, tuple(args), kwargs), Role.OPTIMIZER_UPDATE,
                        site.param, name=f"{replacement.name}_{site.param}")
        site.node.replace_all_uses_with(new)
        g.erase_node(site.node)
        last = new
        for key in ("codes", "scales"):
            index = replacement.output_keys.index(key)
            with g.inserting_after(last):
                output = tag(g.call_function(operator.getitem, (new, index)), Role.OPTIMIZER_UPDATE, site.param,
                             name=f"new_{key}_{site.param}")
            with g.inserting_after(output):
                last = tag(g.call_method("copy_", (state[key], output)), Role.WRITEBACK, site.param, state=key,
                           name=f"write_{key}_{site.param}")


def _master_forward(graph: TrainGraph, option: ECO, chosen: dict[str, str]) -> None:
    g = graph.graph
    for node in graph.placeholders():
        if node.meta.get(ROLE) != Role.PARAMETER or node.meta[PARAM] not in chosen:
            continue
        readers = [u for u in node.users if u.meta.get(ROLE) in (Role.FORWARD, Role.LOSS)]
        if not readers:
            continue
        with g.inserting_before(readers[0]):
            copy = g.call_function(forward_quantize, (node,), option.quantizer())
        tag(copy, Role.FORWARD, node.meta[PARAM], name=f"quantized_copy_{node.meta[PARAM]}")
        for reader in readers:
            reader.replace_input_with(node, copy)


def _choose(graph: TrainGraph, option: ECO) -> tuple[dict[str, str], list[str]]:
    chosen, kept = {}, []
    for site in graph.updates():
        info = graph.params[site.param]
        reason = option.choose(info)
        if reason is not None:
            kept.append(f"{site.param} {list(info.shape)}: {reason}")
            continue
        if site.op.name not in _REPLACES:
            raise NotImplementedError(
                f"ECO has an update for SGD with momentum and for AdamW; {site.param} is updated by "
                f"{site.op.qualified_name}. Use torch.optim.SGD(momentum>0, nesterov=False, dampening=0) or "
                f"torch.optim.AdamW, or leave {site.param} out with ECO(params=...)"
            )
        if site.node.kwargs.get("nesterov"):
            raise NotImplementedError(
                f"ECO's error injection is derived for heavy-ball momentum; {site.param}'s SGD has nesterov=True. "
                f"Use nesterov=False, or leave {site.param} out with ECO(params=...)"
            )
        chosen[site.param] = _REPLACES[site.op.name]
    if not chosen:
        raise ValueError("ECO selected no weight. Kept in full precision: " + "; ".join(kept))
    return chosen, kept


@register_pass("eco", option="quantized_weights", after=("data_parallel",), conflicts={
    "fake_quant": _WHY_NOT.format(other="fake_quant", reason="would quantize the forward's weights a second "
                                  "time; use ECO(mode='master') for a quantized forward over a master weight"),
    "low_rank": _WHY_NOT.format(other="low_rank", reason="keeps a projected momentum, which cannot hold a "
                                "full-size error"),
    "lordo": _WHY_NOT.format(other="LoRDO", reason="keeps a projected momentum and an anchor in full "
                             "precision: its error feedback would need ECO's error projected too"),
    "low_rank_ddp": _WHY_NOT.format(other="low_rank_ddp", reason="keeps a projected momentum"),
    "sync": _WHY_NOT.format(other="sync", reason="averages models, whose average is off the grid"),
})
def eco(program: Program, option: ECO) -> PassResult:
    if set(program.phases) != {"step"}:
        raise NotImplementedError(f"eco runs on a single-phase step; this program has phases {sorted(program.phases)}")
    step = program.phases["step"]
    chosen, kept = _choose(step, option)
    if option.mode == "master":
        graph = step.copy()
        _master_forward(graph, option, chosen)
        graph.recompile()
        phases, schedule = {"step": graph}, program.schedule
    else:
        phases = {}
        for name, initial in (("init", True), ("step", False)):
            graph = step.copy(phase=name)
            _rewrite(graph, option, chosen, initial)
            graph.recompile()
            phases[name] = graph
        schedule = Schedule("step", (Rule("init", 0, 0),))
    stored = () if option.mode == "master" else tuple(sorted(chosen))
    summary = (f"eco ({option.mode}): {option.format} {option.scale if option.format != 'int4' else 'per group'}, "
               f"{option.rounding} rounding: {', '.join(sorted(chosen))}",)
    return PassResult(Program(phases, schedule, program.watches, stored),
                      summary + tuple(f"full precision: {k}" for k in kept))
