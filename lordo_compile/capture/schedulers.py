"""`scheduler.step()` inside the step: run eagerly after each compiled call.

Dynamo does not trace `torch.optim.lr_scheduler` (the file is on its skip list), so a
step that calls `scheduler.step()` would not capture as one graph. `defer` gives each
scheduler the step reaches a `step` that, while dynamo traces it, records the call
(`torch._dynamo.comptime` runs Python at trace time) and, called eagerly, is the
scheduler's own. The compiled step runs the recorded calls after its graph; the new lr,
momentum or betas reach the next call through the optimizer adapter's hyperparameters,
as for a scheduler stepped outside the step:

    def train_step(x, y):               compiled graph: forward, backward, opt.step()
        ...; opt.step(); opt.zero_grad()
        scheduler.step()                then, eagerly, after the graph: scheduler.step()
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable

import torch
import torch.fx as fx
from torch._dynamo.comptime import comptime
from torch._dynamo.exc import UserError, UserErrorType
from torch.optim.lr_scheduler import LRScheduler

from ..ops import canonical_op

# The schedulers `defer` prepared, by id: the traced step knows a scheduler only by `id(self)`.
_SCHEDULERS: "weakref.WeakValueDictionary[int, LRScheduler]" = weakref.WeakValueDictionary()
# Per graph under trace: the calls to make after each run of it (a restarted trace gets a new graph).
_RECORDED: "weakref.WeakKeyDictionary[fx.Graph, list[Callable[[], None]]]" = weakref.WeakKeyDictionary()
_DEFERRING: dict[type, type] = {}


class SchedulerStepError(UserError):
    """`scheduler.step()` inside the step cannot run after the compiled call.

    A `UserError`: dynamo passes those through, where it wraps any other exception raised
    while tracing in an `InternalTorchDynamoError`.
    """

    def __init__(self, message: str) -> None:
        super().__init__(UserErrorType.INVALID_INPUT, message)
        # Dynamo appends the user's stack to the message; this keeps what we said.
        self.reason = message


def defer(*schedulers: LRScheduler) -> None:
    """Make each scheduler's `step()` inside a compiled step run after the call; idempotent.

    The scheduler's class becomes a subclass that overrides `step` only. Not an instance
    attribute: `state_dict()` returns every instance attribute, and a function there would
    not save.
    """
    for scheduler in schedulers:
        cls = type(scheduler)
        if cls not in _DEFERRING.values():
            scheduler.__class__ = _deferring(cls)
        _SCHEDULERS[id(scheduler)] = scheduler


def take_recorded(graph: fx.Graph) -> list[Callable[[], None]]:
    """The scheduler steps the trace of `graph` met, in order, as calls to make after each run."""
    return _RECORDED.pop(graph, [])


def _deferring(cls: type) -> type:
    if cls not in _DEFERRING:
        def step(self, *args, **kwargs):
            if torch.compiler.is_compiling():
                scheduler_id = id(self)  # noqa: F841  (read by _record through comptime)
                comptime(_record)
                return None
            return cls.step(self, *args, **kwargs)

        step.__qualname__ = f"{cls.__qualname__}.step"
        _DEFERRING[cls] = type(cls.__name__, (cls,), {"step": step, "__qualname__": cls.__qualname__})
    return _DEFERRING[cls]


def _record(ctx) -> None:
    """At trace time, inside the deferring `step`: check the call and record it."""
    scheduler = _SCHEDULERS[ctx.get_local("scheduler_id").as_python_constant()]
    args, kwargs = ctx.get_local("args"), ctx.get_local("kwargs")
    name = type(scheduler).__name__
    if not (args.is_python_constant() and kwargs.is_python_constant()):
        raise SchedulerStepError(
            f"{name}.step() is called inside the step with a value computed in the step (a metric, "
            "for ReduceLROnPlateau); lordo_compile steps schedulers after the compiled call, where that "
            f"value does not exist. Return the value from the step and call {name}.step(value) after it."
        )
    graph = ctx.graph()
    if not any(canonical_op(node.target) is not None for node in graph.nodes):
        raise SchedulerStepError(
            f"{name}.step() is called inside the step before any optimizer.step(); lordo_compile steps "
            "schedulers after the compiled call, so this step's update would use the old learning rate where "
            f"eager PyTorch uses the new one. Call {name}.step() after optimizer.step()."
        )
    call = functools.partial(scheduler.step, *args.as_python_constant(), **kwargs.as_python_constant())
    _RECORDED.setdefault(graph, []).append(call)
