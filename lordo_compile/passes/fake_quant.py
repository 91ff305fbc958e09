"""Fake quantization with a straight-through gradient, and CAGE's correction (ALGORITHMS.md 4).

    before (every graph):
        linear = torch._C._nn.linear(x, W, b)                              # forward
        adamw = lordo.adamw(W, grad_W, ..., lr, ...)                       # optimizer
    after:
        fake_quantize_W = lordo.fake_quantize(W, bits=4, quantizer=..., ...)   # forward reads Q(W)
        [fake_quantize_input = lordo.fake_quantize(x, ...)]                    # activations, per token
        linear = torch._C._nn.linear(fake_quantize_input, fake_quantize_W, b)
        cage_lambda = lordo.cage_lambda(fake_quant_step, lam=..., silence_steps=..., ramp_steps=...)
        coupled:    adamw = lordo.adamw(W, lordo.cage_coupled(grad_W, W, fake_quantize_W, cage_lambda), ...)
        decoupled:  new_W = lordo.cage_decoupled(adamw[0], W, fake_quantize_W, cage_lambda, lr)

The gradient reaches W through the straight-through estimator, so the step's own
`backward()` is untouched. The correction pulls W toward Q(W) along e = W - Q(W):
coupled adds lambda_t e to the gradient before the base update; decoupled subtracts
lr lambda_t e next to it, as AdamW decays. lambda_t is 0 for the first `silence_ratio *
total_steps` steps, then ramps linearly to `lam` at `total_steps` (or jumps to it,
`ramp="constant"`); the runtime counts steps in `fake_quant.step`.

The pass rewrites at three stages: the forward's reads (FORWARD, first, so a pass that
repeats the forward repeats it quantized), the coupled correction (GRADIENT: after the
workers' gradients are combined, before any projection), the decoupled one (UPDATE: after
the update rule, before a lookahead or a requantization). With a low-rank update (GaLore,
LoRDO) the coupled correction enters the gradient before projection, so only its part
inside the subspace moves W (and, under LoRDO, the rest goes to the error-feedback
buffer); the decoupled correction is added full rank after the projected update. Under
ECO the forward quantizes the stored weight further, and e = W - Q(W) is its error.

With `adaptive_rotation`, each layer chooses at run time whether it quantizes in the
Hadamard basis (RoSTE; `adaptive_rotation.py`), on the event "choose_rotation".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph import PARAM, ROLE, ParamInfo, Role, StateSpec, TrainGraph, tag
from ..ops.quant import (
    BITS, QUANTIZERS, STE, QuantizedModel, cage_coupled, cage_coupled_projected, cage_decoupled, cage_lambda, export,
)
from ..ops.quant import fake_quantize
from ..ops.rotation import fake_quantize_rotated
from .adaptive_rotation import CHOOSE, AdaptiveRotation, rotate, rotation_state
from .manager import Event, PassResult, PassRuntime, Program, Stage, register_pass
from .select import choose_matrix, validate_selector

FORMS = ("coupled", "decoupled")
RAMPS = ("linear", "constant")
_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)


@dataclass(frozen=True, kw_only=True)
class CAGE:
    """CAGE's curvature-aware correction lambda_t (W - Q(W)) (ALGORITHMS.md section 4).

    Args:
      lam: lambda, the correction's strength after the ramp.
      total_steps: T, the length of the run the schedule spans.
      silence_ratio: s, lambda_t = 0 for the first s*T steps.
      ramp: "linear" (from 0 at s*T to `lam` at T) or "constant" (`lam` from s*T on).
      form: "decoupled" (next to the base update, scaled by lr) or "coupled" (into the gradient).
    """

    lam: float = 10.0
    total_steps: int
    silence_ratio: float = 0.8
    ramp: str = "linear"
    form: str = "decoupled"

    def __post_init__(self) -> None:
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not self.lam >= 0:
            raise ValueError(f"CAGE.lam must be a number >= 0, got {self.lam!r}")
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"CAGE.total_steps must be an int >= 1 (the run's length), got {self.total_steps!r}")
        ratio = self.silence_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"CAGE.silence_ratio must be in [0, 1), got {ratio!r}")
        if self.ramp not in RAMPS:
            raise ValueError(f"CAGE.ramp must be one of {RAMPS}, got {self.ramp!r}")
        if self.form not in FORMS:
            raise ValueError(f"CAGE.form must be one of {FORMS}, got {self.form!r}")

    @property
    def silence_steps(self) -> int:
        return int(self.silence_ratio * self.total_steps)


@dataclass(frozen=True, kw_only=True)
class FakeQuant:
    """Quantization-aware training: the forward reads Q(W) for every selected weight.

    Args:
      bits: 2, 3, 4 or 8.
      quantizer: "rms_gaussian" (per row, c_b RMS scale, no zero level) or "absmax" (per
        group of `group_size`, torchao's symmetric int-b convention).
      group_size: absmax group along the input dimension (None: the whole row).
      hadamard: rotate rows in blocks of 128 before quantizing (QuEST), every layer, always.
      adaptive_rotation: an `AdaptiveRotation`: each layer rotates or not, whichever
        quantizes its weight and input with the smaller error, chosen every K steps (RoSTE).
      ste: "identity" or "masked" (no gradient where W lies outside the clipping range).
      activation_bits: also fake-quantize the inputs of the selected nn.Linear layers per
        token with this many bits (None: weights only), same quantizer and rotation.
      correction: a `CAGE` correction, or None for plain STE QAT.
      params: which weights, as LowRank.params (default: nn.Linear weights but the head).

    Raises:
      ValueError: for a value out of range or an unknown choice, naming the field.
    """

    bits: int = 4
    quantizer: str = "rms_gaussian"
    group_size: int | None = None
    hadamard: bool = False
    ste: str = "identity"
    activation_bits: int | None = None
    correction: CAGE | None = None
    params: object = None
    adaptive_rotation: AdaptiveRotation | None = None

    def __post_init__(self) -> None:
        for name in ("bits", "activation_bits"):
            value = getattr(self, name)
            if value is None and name == "activation_bits":
                continue
            if isinstance(value, bool) or value not in BITS:
                raise ValueError(f"FakeQuant.{name} must be one of {BITS}, got {value!r}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"FakeQuant.quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.group_size is not None:
            if self.quantizer != "absmax":
                raise ValueError("FakeQuant.group_size applies to quantizer='absmax'; rms_gaussian scales per row")
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
                raise ValueError(f"FakeQuant.group_size must be an int >= 2 or None, got {self.group_size!r}")
        if self.ste not in STE:
            raise ValueError(f"FakeQuant.ste must be one of {STE}, got {self.ste!r}")
        if self.correction is not None and not isinstance(self.correction, CAGE):
            raise ValueError(f"FakeQuant.correction must be a lordo_compile.CAGE or None, got {self.correction!r}")
        if self.adaptive_rotation is not None:
            if not isinstance(self.adaptive_rotation, AdaptiveRotation):
                raise ValueError(f"FakeQuant.adaptive_rotation must be a lordo_compile.AdaptiveRotation or None, "
                                 f"got {self.adaptive_rotation!r}")
            if self.hadamard:
                raise ValueError("FakeQuant.adaptive_rotation chooses per layer whether to rotate; it cannot be "
                                 "combined with hadamard=True (every layer rotated). Set hadamard=False")
        validate_selector("FakeQuant", self.params)

    def choose(self, info: ParamInfo) -> str | None:
        """None when the forward reads this weight quantized, else why it stays full precision."""
        reason = choose_matrix(self.params, 0, info)
        if reason is None and self.group_size is not None and info.shape[-1] % self.group_size:
            reason = f"input size {info.shape[-1]} is not a multiple of group_size {self.group_size}"
        return reason

    def rotates(self, name: str, state: dict[str, torch.Tensor]) -> bool:
        """Whether the forward quantizes `name` in the Hadamard basis; `state` is the runtime's."""
        if self.adaptive_rotation is None:
            return self.hadamard
        return bool(state[rotation_state(name).name])

    def quantizer_kwargs(self, bits: int | None = None) -> dict:
        return {"bits": bits or self.bits, "quantizer": self.quantizer, "group_size": self.group_size or 0,
                "hadamard": self.hadamard}


_STEP = StateSpec(name="fake_quant.step", shape=(), dtype=torch.int64, owner="fake_quant")


def _quantize_weights(graph: TrainGraph, option: FakeQuant, selected: dict[str, fx.Node]) -> dict[str, fx.Node]:
    """Forward reads of each selected weight go through a fake-quant node; returns those nodes."""
    g = graph.graph
    forward = (Role.FORWARD, Role.LOSS)
    quantized = {}
    for name, weight in selected.items():
        readers = [u for u in weight.users if u.meta.get(ROLE) in forward]
        if not readers:
            continue
        with g.inserting_before(readers[0]):
            node = g.call_function(fake_quantize, (weight,), {**option.quantizer_kwargs(), "ste": option.ste})
        tag(node, Role.FORWARD, name, name=f"fake_quantize_{name}")
        for reader in readers:
            reader.replace_input_with(weight, node)
        quantized[name] = node
        if option.activation_bits is not None:
            for reader in readers:
                if reader.target in _LINEAR and reader.args[1] is node:
                    with g.inserting_before(reader):
                        act = g.call_function(fake_quantize, (reader.args[0],),
                                              {**option.quantizer_kwargs(option.activation_bits),
                                               "group_size": 0, "ste": "identity"})
                    tag(act, Role.FORWARD, None, name=f"fake_quantize_input_{name}")
                    reader.replace_input_with(reader.args[0], act)
    return quantized


def _quantized(graph: TrainGraph) -> dict[str, fx.Node]:
    """The fake-quant node of each quantized weight (what the forward multiplies by)."""
    return {n.meta[PARAM]: n for n in graph.nodes(Role.FORWARD)
            if n.target in (fake_quantize, fake_quantize_rotated) and PARAM in n.meta
            and n.args[0].meta.get(ROLE) == Role.PARAMETER}


def _lambda(graph: TrainGraph, correction: CAGE) -> fx.Node:
    """lambda_t from the runtime's step counter, and the counter's advance at the step's end."""
    g = graph.graph
    step = graph.add_state(_STEP)
    with g.inserting_after(step):
        lam = tag(g.call_function(cage_lambda, (step,), {"lam": float(correction.lam),
                                                         "silence_steps": correction.silence_steps,
                                                         "ramp_steps": correction.total_steps - correction.silence_steps,
                                                         "constant": correction.ramp == "constant"}),
                  Role.OPTIMIZER_UPDATE, None, name="cage_lambda")
    with g.inserting_after(lam):
        next_step = tag(g.call_function(torch.ops.aten.add.Scalar, (step, 1)), Role.OPTIMIZER_UPDATE, None,
                        name="next_fake_quant_step")
    with g.inserting_before(next(n for n in reversed(g.nodes) if n.op == "output")):
        tag(g.call_method("copy_", (step, next_step)), Role.WRITEBACK, state=_STEP.name, name="write_fake_quant_step")
    return lam


def _corrected(program: Program, option: FakeQuant, form: str):
    """(graph, the updates of quantized weights, their fake-quant nodes, lambda_t) where the
    policy asks for the correction in `form`, else None.

    The counter behind lambda_t advances also where no quantized weight is updated (all
    frozen): the schedule counts the run's steps, as `total_steps` does."""
    correction = option.correction
    if correction is None or correction.form != form:
        return None
    graph = program.graph
    quantized = _quantized(graph)
    sites = [s for s in graph.updates() if s.param in quantized and "lr" in s.op.hyperparameters]
    lam = _lambda(graph, correction)
    if not sites:
        graph.graph.erase_node(lam)  # the counter's advance stays
        lam = None
    return graph, sites, quantized, lam


def coupled_correction(program: Program, option: FakeQuant) -> PassResult | None:
    """g <- g + lambda_t (W - Q(W)) before the update, after the gradient is combined."""
    found = _corrected(program, option, "coupled")
    if found is None:
        return None
    graph, sites, quantized, lam = found
    g = graph.graph
    for site in sites:
        weight, fake = quantized[site.param].args[0], quantized[site.param]
        raw = site.input("grad")
        # After the gradient and lambda_t, before every update node that reads the gradient.
        order = {n: i for i, n in enumerate(g.nodes)}
        with g.inserting_after(max(raw, lam, key=order.__getitem__)):
            if site.op.projected_gradient:
                # The update reads its gradient projected (and averaged): project the correction alike.
                corrected = g.call_function(cage_coupled_projected, (raw, weight, fake, lam, site.input("projection")),
                                            {"tall": site.node.kwargs["tall"]})
            else:
                corrected = g.call_function(cage_coupled, (raw, weight, fake, lam))
            grad = tag(corrected, Role.OPTIMIZER_UPDATE, site.param, name=f"cage_grad_{site.param}")
        for user in list(raw.users):
            if user is not grad and user.meta.get(ROLE) == Role.OPTIMIZER_UPDATE:
                user.replace_input_with(raw, grad)
    return PassResult(program)


def decoupled_correction(program: Program, option: FakeQuant) -> PassResult | None:
    """W+ <- W+ - lr lambda_t (W - Q(W)) after the update rule, as AdamW decays."""
    found = _corrected(program, option, "decoupled")
    if found is None:
        return None
    graph, sites, quantized, lam = found
    g = graph.graph
    for site in sites:
        weight, fake = quantized[site.param].args[0], quantized[site.param]
        new_param = site.outputs()["param"]
        with g.inserting_after(new_param):
            corrected = tag(g.call_function(cage_decoupled, (new_param, weight, fake, lam, site.input("lr"))),
                            Role.OPTIMIZER_UPDATE, site.param, name=f"cage_param_{site.param}")
        new_param.replace_all_uses_with(corrected, delete_user_cb=lambda user: user is not corrected)
    return PassResult(program)


def _events(option: FakeQuant) -> tuple[Event, ...]:
    if option.adaptive_rotation is None:
        return ()
    return (Event(CHOOSE, every=option.adaptive_rotation.every, first=0),)


class QuantizedExport(PassRuntime):
    """`export_quantized()`: the weights as the forward quantizes them now (in the basis each
    layer's current rotation choice says)."""

    def export_quantized(self) -> QuantizedModel:
        option = self.option
        graph = next(iter(self.context.graphs.values()))
        tensors = self.context.params
        runtime = self.context.runtime
        return QuantizedModel({
            name: export(tensors[name].detach(), bits=option.bits, quantizer=option.quantizer,
                         group_size=option.group_size, hadamard=option.rotates(name, runtime.tensors))
            for name, info in graph.params.items() if name in tensors and option.choose(info) is None
        })


@register_pass("fake_quant", stage=Stage.FORWARD, option="fake_quant", option_type=FakeQuant, events=_events,
               runtime=QuantizedExport,
               also={Stage.GRADIENT: coupled_correction, Stage.UPDATE: decoupled_correction})
def fake_quant(program: Program, option: FakeQuant) -> PassResult:
    graph = program.graph
    selected, kept = {}, []
    for node in graph.placeholders():
        if node.meta.get(ROLE) != Role.PARAMETER:
            continue
        name = node.meta[PARAM]
        reason = option.choose(graph.params[name])
        if reason is None:
            selected[name] = node
        else:
            kept.append(f"{name} {list(graph.params[name].shape)}: {reason}")
    if not selected:
        raise ValueError("FakeQuant selected no weight to quantize. Kept in full precision: " + "; ".join(kept))
    quantized = sorted(_quantize_weights(graph, option, selected))
    summary = (
        f"fake-quant: {option.bits}-bit {option.quantizer}{' + hadamard' if option.hadamard else ''}"
        f"{f', activations {option.activation_bits}-bit' if option.activation_bits else ''}: {', '.join(quantized)}",
    )
    correction = option.correction
    if correction is not None:
        summary += (f"cage: {correction.form} correction, lambda {correction.lam} after step "
                    f"{correction.silence_steps} ({correction.ramp} to step {correction.total_steps})",)
    if option.adaptive_rotation is not None:
        summary += rotate(graph, option.adaptive_rotation, choose=CHOOSE in program.events)
    return PassResult(program, summary + tuple(f"full precision: {line}" for line in kept))
