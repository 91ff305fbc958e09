"""Canonical ops: one custom op per update rule, each with the pure function it lowers to.

A canonical op is what a pass rewrites. It is opaque to dynamo and AOTAutograd (a
`torch.library` op with a fake kernel), so a captured graph shows one node per parameter
update with its state as explicit inputs and outputs. Lowering swaps the node's target
for `CanonicalOp.math`, a plain function of torch ops that Inductor fuses.

Every op has the signature

    (param, grad, *state, *hyperparameters, *, **flags) -> (param, *state)

and an op without state returns the new parameter alone (a Tensor, not a 1-tuple).

so generic code (roles, passes, the runtime) can read which input is which from the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.library import Library

NAMESPACE = "lordo"
_library = Library(NAMESPACE, "DEF")


@dataclass(frozen=True)
class CanonicalOp:
    """One registered op: its name, what its inputs are, and its math."""

    name: str
    state: tuple[str, ...]
    hyperparameters: tuple[str, ...]
    flags: tuple[str, ...]
    math: Callable[..., tuple[torch.Tensor, ...]]
    doc: str

    @property
    def overload(self) -> torch._ops.OpOverload:
        return getattr(getattr(torch.ops, NAMESPACE), self.name).default

    @property
    def qualified_name(self) -> str:
        return f"{NAMESPACE}.{self.name}"

    def state_input_index(self, key: str) -> int:
        return 2 + self.state.index(key)

    def hyperparameter_index(self, key: str) -> int:
        return 2 + len(self.state) + self.hyperparameters.index(key)

    @property
    def output_keys(self) -> tuple[str, ...]:
        """What each output is: the new parameter, then the new state."""
        return ("param",) + self.state


_OPS: dict[str, CanonicalOp] = {}
_BY_OVERLOAD: dict[torch._ops.OpOverload, CanonicalOp] = {}


def define_op(
    name: str,
    *,
    state: tuple[str, ...],
    hyperparameters: tuple[str, ...],
    flags: tuple[str, ...] = (),
    doc: str,
) -> Callable[[Callable], Callable]:
    """Register `math` as the canonical op `lordo.<name>`.

    Used as a decorator on the math function. The op's kernel runs the math (so a graph
    that still holds canonical nodes runs as is); its fake kernel gives outputs shaped like
    the parameter and the state.
    """

    def register(math: Callable) -> Callable:
        if name in _OPS:
            raise ValueError(f"canonical op lordo.{name} is already defined")
        tensors = ["Tensor param", "Tensor grad"]
        tensors += [f"Tensor {key}" for key in state + hyperparameters]
        flag_args = [f"bool {flag}" for flag in flags]
        args = ", ".join(tensors + (["*"] + flag_args if flag_args else []))
        returns = "(" + ", ".join(["Tensor"] * (1 + len(state))) + ")" if state else "Tensor"
        _library.define(f"{name}({args}) -> {returns}")

        def kernel(*args, **kwargs):
            outputs = math(*args, **kwargs)
            inputs = {id(a) for a in args if isinstance(a, torch.Tensor)}
            if not state:
                return outputs.clone() if id(outputs) in inputs else outputs
            return tuple(o.clone() if id(o) in inputs else o for o in outputs)

        def fake(param, grad, *rest, **kwargs):
            if not state:
                return torch.empty_like(param)
            return (torch.empty_like(param),) + tuple(torch.empty_like(t) for t in rest[: len(state)])

        _library.impl(name, kernel, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_library)
        op = CanonicalOp(name, state, hyperparameters, flags, math, doc)
        _OPS[name] = op
        _BY_OVERLOAD[op.overload] = op
        return math

    return register


def canonical_op(target: object) -> CanonicalOp | None:
    """The canonical op an FX node target stands for, or None."""
    return _BY_OVERLOAD.get(target)  # type: ignore[arg-type]


def op_named(name: str) -> CanonicalOp:
    return _OPS[name]


def all_ops() -> tuple[CanonicalOp, ...]:
    return tuple(_OPS.values())
