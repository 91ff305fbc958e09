"""Adaptive rotation (RoSTE): each layer quantizes in the Hadamard basis only while that
quantizes better (ALGORITHMS.md section 6). Part of `fake_quant`, not a pass itself.

    before (fake_quant's forward):
        fake_quantize_W = lordo.fake_quantize(W, bits=4, ..., hadamard=False, ...)
        fake_quantize_input_W = lordo.fake_quantize(x, bits=4, ..., hadamard=False, ...)
        linear = torch._C._nn.linear(fake_quantize_input_W, fake_quantize_W, b)
    after, every step:
        fake_quant_rotate_W: b8[]                                          # state, per layer
        fake_quantize_W = lordo.fake_quantize_rotated(W, fake_quant_rotate_W, bits=4, ...)
        fake_quantize_input_W = lordo.fake_quantize_rotated(x, fake_quant_rotate_W, bits=4, ...)
        linear = torch._C._nn.linear(fake_quantize_input_W, fake_quantize_W, b)
    after, on the event "choose_rotation" (step 0, then every `every` steps):
        choose_rotation_W = lordo.choose_rotation(W, x, bits=4, input_bits=4, ...)
        fake_quantize_W = lordo.fake_quantize_rotated(W, choose_rotation_W, bits=4, ...)
        ...
        write_rotate_W = fake_quant_rotate_W.copy_(choose_rotation_W)

The choice is a comparison inside the graph (`ops/rotation.py`), so nothing is read on
the host; the step that chooses already trains with its choice, and CAGE's correction
reads the same `Q_eff(W)` as the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph import DECISION, PARAM, Role, StateSpec, TrainGraph, tag
from ..ops.quant import fake_quantize, hadamard_block
from ..ops.rotation import choose_rotation, fake_quantize_rotated

CHOOSE = "choose_rotation"


@dataclass(frozen=True, kw_only=True)
class AdaptiveRotation:
    """Per layer, quantize weight and input in the Hadamard basis or not, whichever has the
    smaller relative quantization error, chosen again every `every` steps (RoSTE).

    Args:
      every: K, steps between choices; the first is made at step 0, before the first forward.

    Raises:
      ValueError: if `every` is not an int >= 1.
    """

    every: int = 100

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"AdaptiveRotation.every must be an int >= 1 (steps between choices), got {self.every!r}")


def rotation_state(param: str) -> StateSpec:
    """The per-layer choice: True while `param` is quantized in the Hadamard basis."""
    return StateSpec(name=f"fake_quant.rotate.{param}", shape=(), dtype=torch.bool, owner="fake_quant", param=param)


def _layers(graph: TrainGraph) -> list[tuple[fx.Node, fx.Node | None]]:
    """(weight quantizer, quantizer of its linear layer's input or None) for each quantized weight."""
    layers = []
    for node in graph.nodes(Role.FORWARD):
        if node.target is not fake_quantize or PARAM not in node.meta:
            continue
        param = node.meta[PARAM]
        inputs = [user.args[0] for user in node.users
                  if len(user.args) > 1 and user.args[1] is node and isinstance(user.args[0], fx.Node)
                  and user.args[0].target is fake_quantize]
        if len(inputs) > 1:
            raise NotImplementedError(
                f"FakeQuant.adaptive_rotation: {param} is read by {len(inputs)} linear layers with quantized "
                "inputs; one choice per weight needs one input. Exclude it with FakeQuant.params=..."
            )
        features = graph.params[param].shape[-1]
        try:
            hadamard_block(features)
        except ValueError:
            raise ValueError(
                f"FakeQuant.adaptive_rotation: {param} has rows of {features} values; a "
                "Hadamard rotation needs a multiple of 128 or a power of two below it. Exclude it with "
                "FakeQuant.params=... or set adaptive_rotation=None"
            ) from None
        layers.append((node, inputs[0] if inputs else None))
    return layers


def _read_rotated(quantizer: fx.Node, flag: fx.Node) -> None:
    """`quantizer` (a lordo.fake_quantize node) becomes lordo.fake_quantize_rotated reading `flag`."""
    quantizer.target = fake_quantize_rotated
    quantizer.args = (quantizer.args[0], flag)
    quantizer.kwargs = {key: value for key, value in quantizer.kwargs.items() if key != "hadamard"}


def rotate(graph: TrainGraph, option: AdaptiveRotation, choose: bool) -> tuple[str, ...]:
    """Every weight fake_quant quantizes reads a per-layer rotation choice; with `choose`
    (the event "choose_rotation"), the graph makes the choice first. Returns a summary."""
    g = graph.graph
    output = next(iter(reversed(g.nodes)))
    layers = _layers(graph)
    for weight_quantizer, input_quantizer in layers:
        param = weight_quantizer.meta[PARAM]
        spec = rotation_state(param)
        state = flag = graph.add_state(spec)
        if choose:
            x = input_quantizer.args[0] if input_quantizer is not None else None
            with g.inserting_before(weight_quantizer):
                flag = g.call_function(choose_rotation, (weight_quantizer.args[0], x), {
                    "bits": weight_quantizer.kwargs["bits"],
                    "input_bits": input_quantizer.kwargs["bits"] if input_quantizer is not None else 0,
                    "quantizer": weight_quantizer.kwargs["quantizer"],
                    "group_size": weight_quantizer.kwargs["group_size"],
                })
            tag(flag, Role.FORWARD, param, name=f"choose_rotation_{param}")
            flag.meta[DECISION] = True
            with g.inserting_before(output):
                tag(g.call_method("copy_", (state, flag)), Role.WRITEBACK, param, spec.name,
                    name=f"write_rotate_{param}")
        _read_rotated(weight_quantizer, flag)
        if input_quantizer is not None:
            _read_rotated(input_quantizer, flag)
    inputs = " and its input" if any(input_quantizer is not None for _, input_quantizer in layers) else ""
    return (f"adaptive rotation: each weight{inputs} quantized in the Hadamard basis or not, whichever has the "
            f"smaller relative error, chosen at step 0 and every {option.every} steps: "
            + ", ".join(sorted(q.meta[PARAM] for q, _ in layers)),)
