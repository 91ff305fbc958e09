"""Canonical ops: one custom op per update rule, each with the pure function it lowers to.

A canonical op is what a pass rewrites. It is opaque to dynamo and AOTAutograd (a
`torch.library` op with a fake kernel), so a captured graph shows one node per parameter
update with its state as explicit inputs and outputs. Lowering swaps the node's target
for the op's math, a plain function of torch ops that Inductor fuses.

Every update op has the signature

    (param, grad, *state, *buffers, *hyperparameters, *, **attributes) -> (param, *state)

(`state` is read and written, `buffers` only read, e.g. a projection); an op without
state returns the new parameter alone (a Tensor, not a 1-tuple). Other lordo ops
(projections, quantizers) register with `define_aux_op`: any schema, same lowering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch.library import Library

NAMESPACE = "lordo"
_library = Library(NAMESPACE, "DEF")


@dataclass(frozen=True)
class CanonicalOp:
    """One registered update op: its name, what its inputs are, and its math."""

    name: str
    state: tuple[str, ...]
    buffers: tuple[str, ...]
    hyperparameters: tuple[str, ...]
    attributes: tuple[str, ...]
    math: Callable[..., tuple[torch.Tensor, ...]]
    doc: str
    # False: its "param" is a tensor a pass keeps (a copy of the weights), not a parameter, so
    # the graph's parameter updates leave it out.
    updates_parameter: bool = True
    # Its "grad" is already projected by its "projection" (low-rank DDP averages it so).
    projected_gradient: bool = False

    @property
    def overload(self) -> torch._ops.OpOverload:
        return getattr(getattr(torch.ops, NAMESPACE), self.name).default

    @property
    def qualified_name(self) -> str:
        return f"{NAMESPACE}.{self.name}"

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every tensor input by name, in order."""
        return ("param", "grad") + self.state + self.buffers + self.hyperparameters

    def input_index(self, key: str) -> int:
        return self.inputs.index(key)

    @property
    def output_keys(self) -> tuple[str, ...]:
        """What each output is: the new parameter, then the new state."""
        return ("param",) + self.state


_OPS: dict[str, CanonicalOp] = {}
_BY_OVERLOAD: dict[torch._ops.OpOverload, CanonicalOp] = {}
_MATH: dict[torch._ops.OpOverload, Callable] = {}


def _fresh(outputs, args):
    """Outputs that alias an input are cloned: a custom op must not return its inputs."""
    inputs = {id(a) for a in args if isinstance(a, torch.Tensor)}
    if isinstance(outputs, torch.Tensor):
        return outputs.clone() if id(outputs) in inputs else outputs
    return tuple(o.clone() if id(o) in inputs else o for o in outputs)


def define_op(
    name: str,
    *,
    state: tuple[str, ...],
    hyperparameters: tuple[str, ...],
    buffers: tuple[str, ...] = (),
    attributes: Mapping[str, str] | None = None,
    doc: str,
    updates_parameter: bool = True,
    projected_gradient: bool = False,
) -> Callable[[Callable], Callable]:
    """Register `math` as the canonical update op `lordo.<name>`.

    Used as a decorator on the math function. `attributes` maps keyword-only non-tensor
    arguments to their schema type ("bool", "float", "int", "str"). The op's kernel runs
    the math (so a graph that still holds canonical nodes runs as is); its fake kernel
    gives outputs shaped like the parameter and the state.
    """
    attributes = dict(attributes or {})

    def register(math: Callable) -> Callable:
        if name in _OPS:
            raise ValueError(f"canonical op lordo.{name} is already defined")
        tensors = [f"Tensor {key}" for key in ("param", "grad") + state + buffers + hyperparameters]
        extra = [f"{kind} {key}" for key, kind in attributes.items()]
        args = ", ".join(tensors + (["*"] + extra if extra else []))
        returns = "(" + ", ".join(["Tensor"] * (1 + len(state))) + ")" if state else "Tensor"

        def fake(param, grad, *rest, **kwargs):
            if not state:
                return torch.empty_like(param)
            return (torch.empty_like(param),) + tuple(torch.empty_like(t) for t in rest[: len(state)])

        define_aux_op(name, f"({args}) -> {returns}", math, fake)
        op = CanonicalOp(name, state, buffers, hyperparameters, tuple(attributes), math, doc,
                         updates_parameter, projected_gradient)
        _OPS[name] = op
        _BY_OVERLOAD[op.overload] = op
        return math

    return register


def define_aux_op(name: str, schema: str, math: Callable, fake: Callable,
                  differentiable: bool = False) -> torch._ops.OpOverload:
    """Register any other lordo op (`schema` without the name): kernel = math, lowered to math.

    A `differentiable` op (one output, used before the step's backward) gets the gradient
    of its math with respect to its first input, so a graph that still holds it can be
    differentiated; further tensor inputs (a rotation flag) get no gradient. Any other op's
    outputs are marked non-differentiable: they never claim a gradient that backward cannot give.
    """
    _library.define(f"{name}{schema}")
    _library.impl(name, lambda *args, **kwargs: _fresh(math(*args, **kwargs), args), "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_library)
    if differentiable:
        def setup_context(ctx, inputs, keyword_only_inputs, output):
            ctx.save_for_backward(*inputs)
            ctx.attributes = keyword_only_inputs

        def backward(ctx, grad):
            x, *rest = ctx.saved_tensors
            with torch.enable_grad():
                x = x.detach().requires_grad_()
                dx = torch.autograd.grad(math(x, *rest, **ctx.attributes), x, grad)[0]
            return (dx, *[None] * len(rest)) if rest else dx

        torch.library.register_autograd(f"{NAMESPACE}::{name}", backward, setup_context=setup_context, lib=_library)
    else:
        torch.library.register_autograd(f"{NAMESPACE}::{name}", _no_gradient, setup_context=_non_differentiable,
                                        lib=_library)
    overload = getattr(getattr(torch.ops, NAMESPACE), name).default
    _MATH[overload] = math
    return overload


def _non_differentiable(ctx, inputs, output, keyword_only_inputs=None):
    ctx.mark_non_differentiable(*(output if isinstance(output, tuple) else (output,)))


def _no_gradient(ctx, *grads):
    raise AssertionError("unreachable: every output is marked non-differentiable")


def canonical_op(target: object) -> CanonicalOp | None:
    """The canonical update op an FX node target stands for, or None."""
    return _BY_OVERLOAD.get(target)  # type: ignore[arg-type]


def math_for(target: object) -> Callable | None:
    """The function a lordo op lowers to, or None for anything else."""
    return _MATH.get(target)  # type: ignore[arg-type]


def op_named(name: str) -> CanonicalOp:
    return _OPS[name]


def all_ops() -> tuple[CanonicalOp, ...]:
    return tuple(_OPS.values())
