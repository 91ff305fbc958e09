"""ECO: quantized weights with the rounding error fed back into the momentum (ALGORITHMS.md 5).

    before:
        adamw = lordo.adamw(W, grad_W, exp_avg_W, exp_avg_sq_W, step_W, lr, ...)
        W.copy_(adamw[0]); exp_avg_W.copy_(adamw[1]); ...
    after, mode "eco" (every step):
        W.copy_(lordo.eco_decode(eco_codes_W, eco_scales_W, ...))        # at the start: W on the grid
        adamw = lordo.adamw(W, grad_W, exp_avg_W, exp_avg_sq_W, step_W, lr, ...)
        stored = lordo.eco_requantize(adamw[0], eco_step, format=..., rounding=...)   # q(W~)
        error_W = adamw[0] - stored[0]                                   # e = W~ - q(W~)
        exp_avg_W.copy_(lordo.eco_inject_adamw(adamw[1], adamw[2], adamw[3], error_W, lr, ...))
        W.copy_(stored[0]); eco_codes_W.copy_(stored[1]); eco_scales_W.copy_(stored[2])

The pass rewrites at stage WEIGHT_STORAGE: after the update rule, a correction and a
lookahead, so W~ is whatever the step would write into W, and the error goes into the
momentum of whichever update rule made it (`_INJECTIONS`: AdamW, SGD with momentum, and
their projected forms under GaLore, low-rank DDP and LoRDO, where only the projected part
of e can be held: the rest is lost and its share reported). Weights are quantized once
when state is allocated (nearest rounding), so every step starts on the grid. A pass that
keeps a copy of a weight (a sync's anchor) holds it through `ECOStorage` in the same
format. Mode "naive" re-quantizes after each step and drops the error; mode "master" keeps
the weight in full precision and makes the forward read a quantized copy
(straight-through gradient): the two baselines of the paper.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph import PARAM, ROLE, ParamInfo, Role, StateSpec, TrainGraph, UpdateSite, WeightStorage, tag
from ..ops.eco import (
    FORMATS, MODES, ROUNDINGS, SCALES, code_dtype, code_shape, decode_math, eco_decode, eco_inject_adamw,
    eco_inject_projected_adam, eco_inject_projected_sgd_momentum, eco_inject_sgd_momentum, eco_lost_fraction,
    eco_requantize, forward_quantize, requantize_math, scale_shape,
)
from .manager import Lowering, PassResult, PassRuntime, Program, Stage, register_pass
from .select import choose_matrix, validate_selector

OUTER_ERRORS = ("drop", "keep")
_COUNTER = StateSpec(name="eco.step", shape=(), dtype=torch.int64, owner="eco")


@dataclass(frozen=True, kw_only=True)
class ECO:
    """Weights kept quantized, the quantization error fed into the momentum (ALGORITHMS.md 5).

    Args:
      format: "fp8_e4m3", "int8" or "int4" (per group of `group_size`).
      scale: "per_row" or "per_tensor" (fp8 and int8; int4 scales per group).
      rounding: "nearest" or "stochastic" (seeded by `seed`, reproducible).
      mode: "eco", "naive" (error dropped) or "master" (a full-precision master weight, the
        forward reads its quantized copy).
      outer_error: with a sync whose outer step has no momentum (local SGD), what happens to
        the rounding error of the anchor: "drop" it, or "keep" it in a full-size buffer added
        to the next sync's anchor before it is rounded. With outer momentum (DiLoCo) the
        error always goes into the outer momentum.
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
    outer_error: str = "drop"
    params: object = None

    def __post_init__(self) -> None:
        for name, choices in (("format", FORMATS), ("scale", SCALES), ("rounding", ROUNDINGS), ("mode", MODES),
                              ("outer_error", OUTER_ERRORS)):
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


def _codes_specs(option: ECO, info: ParamInfo, prefix: str, owner: str, init: str | None, holds: str
                 ) -> dict[str, StateSpec]:
    shape = tuple(info.shape)
    return {
        "codes": StateSpec(name=f"{prefix}.codes.{info.name}", shape=code_shape(shape, option.format),
                           dtype=code_dtype(option.format), owner=owner, param=info.name, holds=holds,
                           init=f"same:eco.codes.{info.name}" if init else "zeros"),
        "scales": StateSpec(name=f"{prefix}.scales.{info.name}",
                            shape=scale_shape(shape, option.format, option.scale, option.group_size),
                            dtype=torch.float32, owner=owner, param=info.name, holds=holds,
                            init=f"same:eco.scales.{info.name}" if init else "zeros"),
    }


class ECOStorage(WeightStorage):
    """A weight held as ECO's codes and scales: the parameter itself ("eco.codes.W") and any
    copy another pass keeps (a sync's anchor: "<owner>.anchor.codes.W", starting as the
    parameter's codes)."""

    rounds = True

    def __init__(self, option: ECO, salts: dict[str, int]) -> None:
        self.option = option
        self.salts = salts
        self.keeps_outer_error = option.outer_error == "keep"

    def hold(self, graph: TrainGraph, param: str, key: str, owner: str) -> dict[str, fx.Node]:
        info = graph.params[param]
        if key == "param":
            specs = _codes_specs(self.option, info, "eco", "eco", None, "weight")
        else:
            specs = _codes_specs(self.option, info, f"{owner}.{key}", owner, "same", "state")
        return {part: graph.state_node(spec) for part, spec in specs.items()}

    def decode(self, graph: TrainGraph, held: dict[str, fx.Node], param: str) -> fx.Node:
        return tag(graph.graph.call_function(eco_decode, (held["codes"], held["scales"]),
                                             {"format": self.option.format, "group_size": self.option.group_size}),
                   Role.OPTIMIZER_UPDATE, param, name=f"decoded_{param}")

    def encode(self, graph: TrainGraph, value: fx.Node, param: str, key: str) -> tuple[fx.Node, dict[str, fx.Node]]:
        g = graph.graph
        counter = graph.state_node(_COUNTER)
        # An anchor's rounding draws other noise than its parameter's at the same step.
        salt = self.salts[param] + (0 if key == "param" else 1_000_000)
        stored = tag(g.call_function(eco_requantize, (value, counter), {
            **self.option.quantizer(), "rounding": self.option.rounding, "seed": self.option.seed, "salt": salt}),
            Role.OPTIMIZER_UPDATE, param, name=f"requantized_{key}_{param}")
        parts = {}
        for index, part in enumerate(("value", "codes", "scales")):
            parts[part] = tag(g.call_function(operator.getitem, (stored, index)), Role.OPTIMIZER_UPDATE, param,
                              name=f"stored_{key}_{part}_{param}")
        return parts["value"], {"codes": parts["codes"], "scales": parts["scales"]}

    def write(self, graph: TrainGraph, held: dict[str, fx.Node], encoded: dict[str, fx.Node], param: str,
              key: str) -> None:
        for part in ("codes", "scales"):
            tag(graph.graph.call_method("copy_", (held[part], encoded[part])), Role.WRITEBACK, param, part,
                name=f"write_{key}_{part}_{param}")

    def assign(self, graph: TrainGraph, param: str, stored: fx.Node, encoded: dict[str, fx.Node]) -> None:
        self.write(graph, self.hold(graph, param, "param", "eco"), encoded, param, "param")
        tag(graph.graph.call_method("copy_", (graph.parameter(param), stored)), Role.WRITEBACK, param, "param",
            name=f"assign_{param}")


def _site_inputs(site: UpdateSite, *keys: str) -> tuple[fx.Node, ...]:
    return tuple(site.input(k) for k in keys)


def _adamw(site, outputs, error):
    return "exp_avg", eco_inject_adamw, (outputs["exp_avg"], outputs["exp_avg_sq"], outputs["step"], error,
                                         *_site_inputs(site, "lr", "beta1", "beta2", "eps")), {}


def _sgd_momentum(site, outputs, error):
    return "momentum_buffer", eco_inject_sgd_momentum, (outputs["momentum_buffer"], error,
                                                        *_site_inputs(site, "lr", "momentum")), {}


def _projected_adam(site, outputs, error):
    if site.node.kwargs.get("numerics", "torch") != "torch":
        # The injection divides by torch's Adam denominator; galore-torch's puts eps elsewhere.
        raise NotImplementedError(
            f"ECO feeds {site.param}'s rounding error into GaLore's projected moments through torch's Adam "
            f"arithmetic, not numerics={site.node.kwargs['numerics']!r}: use LowRank(numerics='torch') with ECO."
        )
    kwargs = {"scale": float(site.node.kwargs["scale"]), "tall": site.node.kwargs["tall"]}
    return "exp_avg", eco_inject_projected_adam, (outputs["exp_avg"], outputs["exp_avg_sq"], outputs["step"], error,
                                                  *_site_inputs(site, "projection", "lr", "beta1", "beta2", "eps")), \
        kwargs


def _projected_sgd_momentum(site, outputs, error):
    kwargs = {"scale": float(site.node.kwargs["scale"]), "tall": site.node.kwargs["tall"]}
    return "momentum_buffer", eco_inject_projected_sgd_momentum, (
        outputs["momentum_buffer"], error, *_site_inputs(site, "projection", "lr", "momentum")), kwargs


def _lordo(site, outputs, error):
    kwargs = {"scale": float(site.node.kwargs["omega"]), "tall": site.node.kwargs["tall"]}
    return "u", eco_inject_projected_adam, (outputs["u"], outputs["v"], outputs["step"], error,
                                            *_site_inputs(site, "projection", "lr", "beta1", "beta2", "eps")), kwargs


# How the rounding error enters the momentum of each update rule ECO takes.
_INJECTIONS = {
    "adamw": _adamw, "sgd_momentum": _sgd_momentum,
    "galore_adamw_projected": _projected_adam,
    "galore_sgd_momentum": _projected_sgd_momentum,
    "lordo_adamw": _lordo, "lordo_adamw_full": _lordo,
}
_PROJECTED = {"galore_adamw_projected", "galore_sgd_momentum", "lordo_adamw", "lordo_adamw_full"}


def _rebuild_weights(graph: TrainGraph, storage: ECOStorage, chosen: list[str]) -> None:
    """At the graph's start, write each stored weight back from its codes (the runtime gave
    it empty storage of the right size); grad mode is off around the writes, as in an update."""
    g = graph.graph
    first = next(n for n in g.nodes if n.op != "placeholder")
    with g.inserting_before(first):
        tag(g.call_function(torch._C._set_grad_enabled, (False,)), Role.OTHER, None, name="weights_from_codes")
        for name in chosen:
            decoded = storage.decode(graph, storage.hold(graph, name, "param", "eco"), name)
            decoded.meta[ROLE] = Role.FORWARD
            tag(g.call_method("copy_", (graph.parameter(name), decoded)), Role.FORWARD, name, name=f"rebuild_{name}")
        tag(g.call_function(torch._C._set_grad_enabled, (True,)), Role.OTHER, None, name="forward_with_grad")


def _store(graph: TrainGraph, option: ECO, storage: ECOStorage, site: UpdateSite) -> None:
    """The step's write into W becomes q(W~), its codes and scales; with mode "eco" the error
    W~ - q(W~) goes into the momentum of the update that made W~."""
    g = graph.graph
    p = site.param
    write = graph.final_write(p)
    tentative = write.args[1]
    with g.inserting_before(write):
        stored, encoded = storage.encode(graph, tentative, p, "param")
        write.args = (write.args[0], stored)
        storage.write(graph, storage.hold(graph, p, "param", "eco"), encoded, p, "param")
        if option.mode != "eco":
            return
        error = tag(g.call_function(torch.ops.aten.sub.Tensor, (tentative, stored)), Role.OPTIMIZER_UPDATE, p,
                    name=f"rounding_error_{p}")
        outputs = site.outputs()
        key, op, args, kwargs = _INJECTIONS[site.op.name](site, outputs, error)
        fed = tag(g.call_function(op, args, kwargs), Role.OPTIMIZER_UPDATE, p, key, name=f"{key}_with_error_{p}")
        order = {n: i for i, n in enumerate(g.nodes)}
        for momentum_write in [u for u in outputs[key].users if u.meta.get(ROLE) == Role.WRITEBACK]:
            momentum_write.args = (momentum_write.args[0], fed)
            if order[momentum_write] < order[fed]:
                # The update wrote its momentum before the weight was final: write it once the error is in.
                fed.append(momentum_write)
        if site.op.name in _PROJECTED:
            lost = graph.state_node(StateSpec(name=f"eco.lost_error.{p}", shape=(), dtype=torch.float32,
                                              owner="eco", param=p))
            fraction = tag(g.call_function(eco_lost_fraction, (error, site.input("projection")),
                                           {"tall": site.node.kwargs["tall"]}), Role.OPTIMIZER_UPDATE, p,
                           name=f"lost_error_{p}")
            tag(g.call_method("copy_", (lost, fraction)), Role.WRITEBACK, p, "lost_error", name=f"write_lost_error_{p}")


def _master_forward(graph: TrainGraph, option: ECO, chosen: list[str]) -> None:
    g = graph.graph
    for name in chosen:
        node = graph.parameter(name)
        readers = [u for u in node.users if u.meta.get(ROLE) in (Role.FORWARD, Role.LOSS)]
        if not readers:
            continue
        with g.inserting_before(readers[0]):
            copy = g.call_function(forward_quantize, (node,), option.quantizer())
        tag(copy, Role.FORWARD, name, name=f"quantized_copy_{name}")
        for reader in readers:
            reader.replace_input_with(node, copy)


def _choose(graph: TrainGraph, option: ECO) -> tuple[dict[str, UpdateSite], list[str]]:
    chosen, kept = {}, []
    for site in graph.updates():
        info = graph.params[site.param]
        reason = option.choose(info)
        if reason is not None:
            kept.append(f"{site.param} {list(info.shape)}: {reason}")
            continue
        if site.op.name not in _INJECTIONS and option.mode != "master":
            raise NotImplementedError(
                f"ECO has an update for SGD with momentum and for AdamW; {site.param} is updated by "
                f"{site.op.qualified_name}, which has no momentum ECO's error injection is derived for (it feeds the "
                f"rounding error into the momentum of SGD with momentum, AdamW, and their low-rank forms under "
                f"GaLore and LoRDO). Use torch.optim.SGD(momentum>0, nesterov=False) or torch.optim.AdamW, or leave "
                f"{site.param} out with ECO(params=...)"
            )
        if site.node.kwargs.get("nesterov") and option.mode != "master":
            raise NotImplementedError(
                f"ECO's error injection is derived for heavy-ball momentum; {site.param}'s SGD has nesterov=True. "
                f"Use nesterov=False, or leave {site.param} out with ECO(params=...)"
            )
        chosen[site.param] = site
    if not chosen:
        raise ValueError("ECO selected no weight. Kept in full precision: " + "; ".join(kept))
    return chosen, kept


def _nbytes(tensor: torch.Tensor) -> int:
    """The bytes of the tensor's own storage; where a capture before this one freed it, what
    the tensor spans."""
    return tensor.untyped_storage().nbytes() or (tensor.storage_offset() + tensor.numel()) * tensor.element_size()


class StoredWeights(PassRuntime):
    """Frees each stored weight's own storage between calls (the graph rebuilds it from its
    codes at its start), quantizes the weights once before the first call, and decodes them
    for `materialized()`.

    Where the compiler keeps the graph's writes into its inputs in the aten graph (Inductor),
    the writes into the stored weights are dropped there (`_drop_weight_writes`) and the
    weights get no storage during the call: the forward reads the decoded value, which the
    graph holds as its own buffer, and the value written would be freed right after the call
    anyway. Elsewhere (aot_eager writes after the graph, eager inside it) they get storage.

    A weight an earlier capture stored and this one does not update (frozen since) keeps its
    codes and is not rebuilt by this capture's graphs: it holds its decoded value in full
    storage while they run, as any frozen weight does."""

    def __init__(self, option: ECO, context) -> None:
        super().__init__(option, context)
        graph = next(iter(context.graphs.values()))
        self.names = [name for name, storage in graph.storage.items() if isinstance(storage, ECOStorage)]
        self.tensors = [context.params[name] for name in self.names]
        self.nbytes = [_nbytes(t) for t in self.tensors]
        self.frozen = [name for name in context.params
                       if name not in self.names and f"eco.codes.{name}" in context.runtime.tensors]
        self.unwritten: set[frozenset[str]] = set()  # events of the graphs that never touch the weights' storage

    def lowering(self, graph: TrainGraph) -> Lowering | None:
        stored = {graph.parameter(name) for name, storage in graph.storage.items() if isinstance(storage, ECOStorage)}
        if set(self.names) != {node.meta[PARAM] for node in stored}:
            return None
        placeholders = graph.placeholders()
        positions = [i for i, node in enumerate(placeholders) if node in stored]
        shapes = [tuple(self.context.params[placeholders[i].meta[PARAM]].shape) for i in positions]

        def drop(aten: fx.GraphModule) -> None:
            if _drop_weight_writes(aten, len(placeholders), positions, shapes):
                self.unwritten.add(graph.events)
        return Lowering((drop,))

    def _decode(self, name: str, weight: torch.Tensor) -> None:
        tensors = self.context.runtime.tensors
        weight.copy_(decode_math(tensors[f"eco.codes.{name}"], tensors[f"eco.scales.{name}"],
                                 format=self.option.format, group_size=self.option.group_size))

    def _restore_frozen(self) -> None:
        """Another capture's call freed them (it updated them then): decode them once again."""
        with torch.no_grad():
            for name in self.frozen:
                weight = self.context.params[name]
                if weight.untyped_storage().nbytes() == 0:
                    weight.untyped_storage().resize_(_nbytes(weight))
                    self._decode(name, weight)

    def setup(self, fresh: set[str]) -> None:
        self._restore_frozen()
        tensors = self.context.runtime.tensors
        with torch.no_grad():
            for name, weight in zip(self.names, self.tensors):
                if f"eco.codes.{name}" not in fresh:
                    continue
                value, codes, scales = requantize_math(
                    weight.detach().float(), torch.zeros((), dtype=torch.int64, device=weight.device),
                    **self.option.quantizer(), rounding="nearest", seed=0, salt=0)
                tensors[f"eco.codes.{name}"].copy_(codes)
                tensors[f"eco.scales.{name}"].copy_(scales)
                weight.copy_(value)

    @contextlib.contextmanager
    def _allocated(self, needed: bool = True):
        self._restore_frozen()
        if needed:
            for tensor, nbytes in zip(self.tensors, self.nbytes):
                if tensor.untyped_storage().nbytes() == 0:
                    tensor.untyped_storage().resize_(nbytes)
        try:
            yield
        finally:
            for tensor in self.tensors:
                tensor.untyped_storage().resize_(0)

    def around_call(self, events: frozenset[str]):
        return self._allocated(needed=events not in self.unwritten)

    @contextlib.contextmanager
    def _decoded(self):
        with self._allocated(), torch.no_grad():
            for name, weight in zip(self.names, self.tensors):
                self._decode(name, weight)
            yield

    def materialized(self):
        return self._decoded() if self.tensors else None

    def describe(self) -> list[str]:
        lost = {key.removeprefix("eco.lost_error."): float(value)
                for key, value in self.context.runtime.tensors.items() if key.startswith("eco.lost_error.")}
        if not lost:
            return []
        return ["share of the last step's rounding error the projected momentum could not hold (|e - PP^T e| / "
                "|e|): " + ", ".join(f"{name} {share:.3f}" for name, share in lost.items())]


def _drop_weight_writes(aten: fx.GraphModule, inputs: int, positions: list[int], shapes: list[tuple]) -> bool:
    """Removes the aten graph's writes into the inputs at `positions` (the stored weights) and
    says whether afterwards nothing in the graph touches those inputs. Changes nothing, and
    says False, unless the graph has the step graph's inputs in order (each stored weight's
    shape where expected) and each stored weight's only use is one write whose result nothing
    reads (AOTAutograd's write-back of the weight's value after the step). A cached compile
    that skips this leaves the runtime lending storage, as before."""
    placeholders = [n for n in aten.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != inputs:
        return False
    weights = [placeholders[i] for i in positions]
    if any(tuple(getattr(w.meta.get("val"), "shape", ())) != shape for w, shape in zip(weights, shapes)):
        return False
    writes = []
    for weight in weights:
        users = list(weight.users)
        if len(users) != 1 or users[0].target is not torch.ops.aten.copy_.default or users[0].args[0] is not weight \
                or users[0].users:
            return False
        writes.append(users[0])
    for write in writes:
        aten.graph.erase_node(write)
    aten.recompile()
    return True


@register_pass("eco", stage=Stage.WEIGHT_STORAGE, option="eco", option_type=ECO, runtime=StoredWeights,
               conflicts={})
def eco(program: Program, option: ECO) -> PassResult:
    graph = program.graph
    chosen, kept = _choose(graph, option)
    if option.mode == "master":
        _master_forward(graph, option, list(chosen))
    else:
        salts = {site.param: salt for salt, site in enumerate(graph.updates())}
        storage = ECOStorage(option, salts)
        for name in chosen:
            graph.storage[name] = storage
        g = graph.graph
        counter = graph.state_node(_COUNTER)
        with g.inserting_after(counter):
            next_counter = tag(g.call_function(torch.ops.aten.add.Scalar, (counter, 1)), Role.OPTIMIZER_UPDATE,
                               None, name="next_eco_step")
        with g.inserting_before(next(n for n in reversed(g.nodes) if n.op == "output")):
            tag(g.call_method("copy_", (counter, next_counter)), Role.WRITEBACK, state=_COUNTER.name,
                name="write_eco_step")
        _rebuild_weights(graph, storage, list(chosen))
        for site in chosen.values():
            _store(graph, option, storage, site)
    summary = (f"eco ({option.mode}): {option.format} {option.scale if option.format != 'int4' else 'per group'}, "
               f"{option.rounding} rounding: {', '.join(sorted(chosen))}",)
    return PassResult(program, summary + tuple(f"full precision: {k}" for k in kept))
