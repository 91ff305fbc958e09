"""Find the optimizers and modules a training step uses, and name its parameters.

A step reaches its model and optimizer through closure cells, module globals, or
`self` when it is a bound method. That is where users keep them, so that is where we
look; `lc.compile(..., optimizers=[...])` overrides the search for optimizers. LR
schedulers are found the same way (a step may call `scheduler.step()`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler


def _namespace(fn: Callable, depth: int = 3) -> list[tuple[str, Any]]:
    """Names a function can reach: closure, referenced globals, defaults, `self`; and, up to
    `depth` calls deep, the same for functions among those (a step calling `loss_fn`)."""
    items = _direct_namespace(fn)
    if depth > 0:
        for _, value in list(items):
            if inspect.isfunction(value) or inspect.ismethod(value):
                items += _namespace(value, depth - 1)
    return items


def _direct_namespace(fn: Callable) -> list[tuple[str, Any]]:
    fn = inspect.unwrap(fn)
    owner = getattr(fn, "__self__", None)
    func = getattr(fn, "__func__", fn)
    items: list[tuple[str, Any]] = []
    if inspect.isfunction(func):
        found = inspect.getclosurevars(func)
        items += list(found.nonlocals.items()) + list(found.globals.items())
        # `lambda x, m=model: ...` binds through a default, not a closure.
        names = func.__code__.co_varnames[: func.__code__.co_argcount]
        defaults = func.__defaults__ or ()
        items += list(zip(names[len(names) - len(defaults):], defaults))
        items += list((func.__kwdefaults__ or {}).items())
    elif callable(fn) and not inspect.isfunction(fn):
        owner = owner or fn
    if owner is not None:
        items.append(("self", owner))
        items += list(getattr(owner, "__dict__", {}).items())
    return items


def _flatten(items: Iterable[tuple[str, Any]]) -> Iterable[tuple[str, Any]]:
    for name, value in items:
        yield name, value
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                yield f"{name}[{i}]", item
        elif isinstance(value, dict):
            for key, item in value.items():
                yield f"{name}[{key!r}]", item


def find_optimizers(fn: Callable, supported: tuple[type, ...]) -> list[torch.optim.Optimizer]:
    """Optimizers `fn` reaches. Those it names directly are returned whatever their type
    (an unsupported one is an error worth raising early); those found deeper, only when
    supported, since a helper module may hold optimizers this step never steps."""
    found: dict[int, torch.optim.Optimizer] = {}
    direct = {id(v) for _, v in _flatten(_direct_namespace(fn))}
    for _, value in _flatten(_namespace(fn)):
        if isinstance(value, torch.optim.Optimizer) and (id(value) in direct or type(value) in supported):
            found.setdefault(id(value), value)
    return list(found.values())


def find_schedulers(fn: Callable) -> list[LRScheduler]:
    """LR schedulers `fn` reaches: the step may call their `step()`."""
    return _instances(_namespace(fn), LRScheduler)


def in_frame(frame, cls: type) -> list:
    """Instances of `cls` among a frame's locals and globals (one level into containers)."""
    return _instances([*frame.f_locals.items(), *frame.f_globals.items()], cls)


def _instances(items: Iterable[tuple[str, Any]], cls: type) -> list:
    found: dict[int, Any] = {}
    for _, value in _flatten(items):
        if isinstance(value, cls):
            found.setdefault(id(value), value)
    return list(found.values())


@dataclass
class Names:
    """Readable names for the tensors a step reads, keyed by `id(tensor)`."""

    params: dict[int, str] = field(default_factory=dict)
    module_types: dict[int, type] = field(default_factory=dict)
    buffers: dict[int, str] = field(default_factory=dict)

    @classmethod
    def of_step(cls, fn: Callable) -> "Names":
        return cls.of_namespace(_namespace(fn))

    @classmethod
    def of_frame(cls, frame) -> "Names":
        return cls.of_namespace([*frame.f_locals.items(), *frame.f_globals.items()])

    @classmethod
    def of_namespace(cls, items: list[tuple[str, Any]]) -> "Names":
        found: dict[int, tuple[str, nn.Module]] = {}
        for var, value in _flatten(items):
            if isinstance(value, nn.Module):
                found.setdefault(id(value), (var, value))
        inner = {id(sub) for _, m in found.values() for sub in m.modules() if sub is not m}
        roots = [item for key, item in found.items() if key not in inner]
        names = cls()
        prefix_needed = len(roots) > 1
        for var, module in roots:
            prefix = f"{var}." if prefix_needed else ""
            for module_name, sub in module.named_modules():
                for pname, p in sub.named_parameters(recurse=False):
                    full = f"{module_name}.{pname}" if module_name else pname
                    names.params.setdefault(id(p), prefix + full)
                    names.module_types.setdefault(id(p), type(sub))
                for bname, b in sub.named_buffers(recurse=False):
                    full = f"{module_name}.{bname}" if module_name else bname
                    names.buffers.setdefault(id(b), prefix + full)
        return names
