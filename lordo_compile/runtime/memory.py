"""What a compiled step holds, in bytes, counted from the tensors themselves.

Weight bytes are what holds each weight between steps: its own storage, or the codes and
scales a pass keeps instead (ECO). "Before" is what the user's optimizer held for a parameter when it was prepared (state a
pass took over counted at the size it had then); "after" is what is held now: the
optimizer's state plus the state passes declared for that parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ..capture.optim import OptimizerAdapter
from .state import RuntimeState


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass(frozen=True)
class ParamMemory:
    name: str
    shape: tuple[int, ...]
    weight_bytes: int
    gradient_bytes: int
    state_bytes_before: int
    state_bytes_after: int


@dataclass(frozen=True)
class MemoryReport:
    params: tuple[ParamMemory, ...]
    unassigned_state_bytes: int

    @property
    def weight_bytes(self) -> int:
        return sum(p.weight_bytes for p in self.params)

    @property
    def gradient_bytes(self) -> int:
        return sum(p.gradient_bytes for p in self.params)

    @property
    def state_bytes_before(self) -> int:
        return sum(p.state_bytes_before for p in self.params)

    @property
    def state_bytes_after(self) -> int:
        return sum(p.state_bytes_after for p in self.params) + self.unassigned_state_bytes

    def row(self, name: str) -> ParamMemory:
        return next(p for p in self.params if p.name == name)

    def __str__(self) -> str:
        width = max([len("total")] + [len(p.name) for p in self.params])
        head = f"{'parameter':<{width}}  {'shape':>12}  {'weight':>10}  {'gradient':>10}  {'state before':>12}  {'state after':>12}"
        lines = [head]
        for p in self.params:
            shape = "x".join(str(s) for s in p.shape) or "scalar"
            lines.append(f"{p.name:<{width}}  {shape:>12}  {p.weight_bytes:>10,}  {p.gradient_bytes:>10,}  "
                         f"{p.state_bytes_before:>12,}  {p.state_bytes_after:>12,}")
        if self.unassigned_state_bytes:
            lines.append(f"{'(pass state)':<{width}}  {'':>12}  {'':>10}  {'':>10}  {0:>12,}  "
                         f"{self.unassigned_state_bytes:>12,}")
        ratio = self.state_bytes_after / self.state_bytes_before if self.state_bytes_before else 1.0
        lines.append(f"{'total':<{width}}  {'':>12}  {self.weight_bytes:>10,}  {self.gradient_bytes:>10,}  "
                     f"{self.state_bytes_before:>12,}  {self.state_bytes_after:>12,}")
        lines.append(f"optimizer state after / before: {ratio:.3f}")
        return "\n".join(lines)


def memory_report(
    adapters: list[OptimizerAdapter], runtime: RuntimeState, names: Mapping[int, str]
) -> MemoryReport:
    """`names` maps `id(parameter)` to its name in the graphs."""
    owned: dict[str, int] = {}
    stored: dict[str, int] = {}
    unassigned = 0
    for name, tensor in runtime.tensors.items():
        spec = runtime.specs[name]
        if spec.param is None:
            unassigned += nbytes(tensor)
        elif spec.holds == "weight":
            stored[spec.param] = stored.get(spec.param, 0) + nbytes(tensor)
        else:
            owned[spec.param] = owned.get(spec.param, 0) + nbytes(tensor)
    rows = []
    for adapter in adapters:
        for i, p in enumerate(adapter.parameters()):
            name = names.get(id(p), f"{type(adapter.optimizer).__name__}.params[{i}]")
            held = {k: nbytes(v) for k, v in adapter.optimizer.state[p].items() if isinstance(v, torch.Tensor)}
            extra = sum(nbytes(v) for v in adapter.extra_state.get(p, {}).values())
            released = {k: size for k, (_, size) in adapter.released.get(p, {}).items()}
            before = sum({**held, **released}.values()) + extra
            after = sum(held.values()) + extra + owned.get(name, 0)
            # A weight held in another form (ECO's codes) has no storage of its own between steps.
            weight = p.untyped_storage().nbytes() + stored.get(name, 0)
            rows.append(ParamMemory(name, tuple(p.shape), weight, nbytes(p), before, after))
    return MemoryReport(tuple(rows), unassigned)
