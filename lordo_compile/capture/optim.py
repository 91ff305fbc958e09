"""Make a `torch.optim` optimizer traceable: one canonical update node per parameter.

`torch.optim.Optimizer.step` graph-breaks on purpose (`_use_grad` calls
`torch._dynamo.graph_break()`), and `zero_grad` is on dynamo's skip list. `prepare`
replaces both on the optimizer *instance* with versions that, while dynamo traces them,
call one canonical op per parameter (`lordo.adamw`, `lordo.sgd_momentum`, ...) and write
the results back with `copy_`; called eagerly, they run the optimizer's own methods.

The optimizer stays the source of truth: state is initialised eagerly into `opt.state`
exactly as `torch.optim` would lazily, the graph reads and writes those tensors, and
`param_groups` keep their Python floats. The adapter mirrors each group's float
hyperparameters into one float64 vector per group (a graph input) before every call, so
schedulers take effect with no recompile. (A vector, indexed inside the graph, rather
than 0-d inputs: dynamo treats a 0-d float64 CPU tensor input as a Python float, makes it
a symbol, and Inductor then restarts the whole trace to specialise it.) What decides the graph's structure (momentum on or off,
nesterov, maximize, the number of groups) is fixed per capture; a change is detected.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..ops import CanonicalOp, op_named

SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)

# Hyperparameters as the canonical ops name them, read from a param group.
_READERS: dict[str, Callable[[dict], float]] = {
    "lr": lambda g: float(g["lr"]),
    "weight_decay": lambda g: float(g["weight_decay"]),
    "momentum": lambda g: float(g["momentum"]),
    "dampening": lambda g: float(g["dampening"]),
    "beta1": lambda g: float(g["betas"][0]),
    "beta2": lambda g: float(g["betas"][1]),
    "eps": lambda g: float(g["eps"]),
}

# State the adapter owns (not `torch.optim`'s): it travels in the compiled step's state_dict.
ADAPTER_STATE_KEYS = frozenset({"buffer_fresh"})


def supported_names() -> str:
    return ", ".join(f"torch.optim.{cls.__name__}" for cls in SUPPORTED_OPTIMIZERS)


def _structure(optimizer: torch.optim.Optimizer, group: dict) -> tuple:
    """What about a group decides the shape of the captured graph."""
    if isinstance(optimizer, torch.optim.SGD):
        return ("sgd", group["momentum"] != 0, group["dampening"] != 0, bool(group["nesterov"]),
                bool(group["maximize"]), len(group["params"]))
    return ("adam", bool(group.get("decoupled_weight_decay", False)), bool(group["amsgrad"]),
            bool(group["maximize"]), len(group["params"]))


def _check_supported(optimizer: torch.optim.Optimizer) -> None:
    name = type(optimizer).__name__
    if type(optimizer) not in SUPPORTED_OPTIMIZERS:
        raise NotImplementedError(
            f"lordo_compile cannot capture the optimizer {type(optimizer).__module__}.{name}: "
            f"it recognises {supported_names()}. Use one of those, or step this optimizer "
            "outside the compiled function."
        )
    for index, group in enumerate(optimizer.param_groups):
        where = f"{name}.param_groups[{index}]"
        if group.get("amsgrad"):
            raise NotImplementedError(
                f"{where} has amsgrad=True, which lordo_compile does not capture yet; "
                "use amsgrad=False."
            )
        if group.get("differentiable"):
            raise NotImplementedError(
                f"{where} has differentiable=True; lordo_compile steps the optimizer "
                "under no_grad. Use differentiable=False."
            )
        if isinstance(group["lr"], Tensor) and group["lr"].requires_grad:
            raise NotImplementedError(f"{where}['lr'] is a tensor that requires grad; pass a float.")
        for p in group["params"]:
            if p.is_complex():
                raise NotImplementedError(f"{where} holds a complex parameter; lordo_compile updates real tensors only.")
            if isinstance(optimizer, torch.optim.SGD) and group["nesterov"] and (
                group["momentum"] <= 0 or group["dampening"] != 0
            ):
                raise ValueError(f"{where}: Nesterov momentum requires a momentum and zero dampening")


@dataclass(eq=False)
class GroupPlan:
    """One param group as the traced step sees it."""

    op: CanonicalOp
    overload: object
    attributes: dict[str, bool]
    params: list[Tensor]
    hyperparameters: Tensor
    values: list[float] = field(default_factory=list)
    structure: tuple = ()


class OptimizerAdapter:
    """Holds the traceable form of one optimizer. Create through `prepare`."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        _check_supported(optimizer)
        self.optimizer = optimizer
        self.extra_state: dict[Tensor, dict[str, Tensor]] = {}
        # State a pass took over: param -> key -> (pass name, bytes the optimizer held).
        self.released: dict[Tensor, dict[str, tuple[str, int]]] = {}
        self.version = 0
        self.groups: list[GroupPlan] = []
        self._plan()
        self._install()

    # -- plan -----------------------------------------------------------------------------

    def _op_for(self, group: dict) -> tuple[CanonicalOp, dict[str, bool]]:
        if isinstance(self.optimizer, torch.optim.SGD):
            if group["momentum"] == 0:
                return op_named("sgd"), {"maximize": bool(group["maximize"])}
            flags = {"nesterov": bool(group["nesterov"]), "maximize": bool(group["maximize"])}
            fresh = any("momentum_buffer" not in self.optimizer.state[p] or
                        self.optimizer.state[p]["momentum_buffer"] is None for p in group["params"])
            if group["dampening"] != 0 and (fresh or any(p in self.extra_state for p in group["params"])):
                return op_named("sgd_momentum_dampened"), flags
            return op_named("sgd_momentum"), flags
        name = "adamw" if group.get("decoupled_weight_decay", False) else "adam"
        return op_named(name), {"maximize": bool(group["maximize"])}

    def _plan(self) -> None:
        self.groups = []
        for group in self.optimizer.param_groups:
            op, flags = self._op_for(group)
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            values = [_READERS[key](group) for key in op.hyperparameters]
            plan = GroupPlan(
                op=op,
                overload=op.overload,
                attributes=flags,
                params=list(group["params"]),
                hyperparameters=torch.tensor(values, dtype=torch.float64, device=device),
                values=values,
                structure=_structure(self.optimizer, group),
            )
            for p in plan.params:
                self._init_state(p, op)
            self.groups.append(plan)
        self.version += 1

    def _init_state(self, p: Tensor, op: CanonicalOp) -> None:
        """Create the state `torch.optim` would create lazily on its first step."""
        state = self.optimizer.state[p]
        fresh = state.get("momentum_buffer") is None
        for key in op.state:
            if key in ADAPTER_STATE_KEYS:
                if key not in self.extra_state.get(p, {}):
                    self.extra_state.setdefault(p, {})[key] = torch.tensor(float(fresh), device=p.device)
            elif key == "step":
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                elif state["step"].device != p.device:
                    # A host step would make every compiled update wait on a host scalar.
                    state["step"] = state["step"].to(p.device)
            elif state.get(key) is None:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def release(self, p: Tensor, key: str, owner: str) -> None:
        """Free `opt.state[p][key]`: pass `owner` keeps that state itself.

        The entry stays as an empty tensor, so `opt.state_dict()` and checkpoints keep
        working and the captured graph keeps one input per state key.
        """
        held = self.released.setdefault(p, {})
        if key in held:
            if held[key][0] != owner:
                raise ValueError(f"optimizer state {key!r} is already taken over by pass {held[key][0]!r}")
            return
        tensor = self.optimizer.state[p][key]
        if tensor.numel() and bool(tensor.ne(0).any()):
            warnings.warn(
                f"the optimizer's {key!r} for a {list(p.shape)} parameter holds values (a loaded "
                f"checkpoint?); pass {owner!r} keeps its own state and starts it from zero, so those "
                "values are dropped",
                UserWarning,
                stacklevel=4,
            )
        # The size torch.optim gives this state: the parameter's shape.
        held[key] = (owner, p.numel() * tensor.element_size())
        self.optimizer.state[p][key] = tensor.new_empty(0)

    # -- per call -------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Copy the groups' float hyperparameters into the graph's tensors.

        Returns False when something structural changed since capture (a group added,
        momentum switched on, ...): the caller must re-plan before the next trace.
        """
        groups = self.optimizer.param_groups
        if len(groups) != len(self.groups):
            return False
        for plan, group in zip(self.groups, groups):
            if _structure(self.optimizer, group) != plan.structure:
                return False
            values = [_READERS[key](group) for key in plan.op.hyperparameters]
            if values != plan.values:
                fresh = torch.tensor(values, dtype=torch.float64)
                if plan.hyperparameters.is_cuda:
                    # A copy from pageable memory waits for the GPU; from pinned memory it queues.
                    fresh = fresh.pin_memory()
                plan.hyperparameters.copy_(fresh, non_blocking=True)
                plan.values = values
        # The LR scheduler warns unless it sees the optimizer was stepped.
        self.optimizer._opt_called = True  # type: ignore[attr-defined]
        return True

    def replan(self) -> None:
        _check_supported(self.optimizer)
        self._plan()

    def structure_change(self) -> str:
        """Describe what changed since capture, for an error message."""
        groups = self.optimizer.param_groups
        if len(groups) != len(self.groups):
            return f"param_groups went from {len(self.groups)} to {len(groups)} groups"
        for index, (plan, group) in enumerate(zip(self.groups, groups)):
            now = _structure(self.optimizer, group)
            if now != plan.structure:
                return f"param_groups[{index}] changed structure from {plan.structure} to {now}"
        return "nothing"

    # -- traced ---------------------------------------------------------------------------

    def state_tensors(self, p: Tensor, op: CanonicalOp) -> list[Tensor]:
        state = self.optimizer.state[p]
        return [self.extra_state[p][k] if k in ADAPTER_STATE_KEYS else state[k] for k in op.state]

    def traced_step(self) -> None:
        with torch.no_grad():
            for plan in self.groups:
                scalars = [plan.hyperparameters[i] for i in range(len(plan.values))]
                for p in plan.params:
                    grad = p.grad
                    if grad is None:
                        continue
                    state = self.state_tensors(p, plan.op)
                    outputs = plan.overload(p, grad, *state, *scalars, **plan.attributes)
                    if not state:
                        outputs = (outputs,)
                    p.copy_(outputs[0])
                    for tensor, new in zip(state, outputs[1:]):
                        tensor.copy_(new)

    def traced_zero_grad(self, set_to_none: bool = True) -> None:
        for plan in self.groups:
            for p in plan.params:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        with torch.no_grad():
                            p.grad.zero_()

    def _install(self) -> None:
        optimizer = self.optimizer
        eager_step, eager_zero_grad = optimizer.step, optimizer.zero_grad
        adapter = self

        def step(self_optimizer, closure=None):
            if torch.compiler.is_compiling():
                if closure is not None:
                    raise NotImplementedError(
                        "optimizer.step(closure) cannot be captured; compute the loss in the step instead"
                    )
                return adapter.traced_step()
            if adapter.released:
                owners = sorted({owner for keys in adapter.released.values() for owner, _ in keys.values()})
                raise RuntimeError(
                    f"this {type(self_optimizer).__name__}'s state for some parameters is held by the "
                    f"compiled step (pass {', '.join(owners)}); step it through the compiled step, "
                    "not with optimizer.step()"
                )
            return eager_step() if closure is None else eager_step(closure)

        def zero_grad(self_optimizer, set_to_none: bool = True):
            if torch.compiler.is_compiling():
                return adapter.traced_zero_grad(set_to_none)
            return eager_zero_grad(set_to_none)

        # An LR scheduler re-wraps a step that lacks this mark, and warns at its first step.
        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        optimizer._lordo_adapter = self  # type: ignore[attr-defined]
        optimizer.step = step.__get__(optimizer)  # type: ignore[method-assign]
        optimizer.zero_grad = zero_grad.__get__(optimizer)  # type: ignore[method-assign]

    # -- queries --------------------------------------------------------------------------

    def parameters(self) -> list[Tensor]:
        return [p for plan in self.groups for p in plan.params]

    def state_dict(self) -> dict:
        """Adapter-owned state, keyed by the parameter's position in the optimizer."""
        index = {p: i for i, p in enumerate(self.parameters())}
        return {index[p]: {k: v.clone() for k, v in keys.items()} for p, keys in self.extra_state.items()}

    def load_state_dict(self, state: dict) -> None:
        params = self.parameters()
        for i, keys in state.items():
            for k, v in keys.items():
                self.extra_state[params[int(i)]][k].copy_(v)


_ADAPTERS: "weakref.WeakSet[OptimizerAdapter]" = weakref.WeakSet()


def prepare(*optimizers: torch.optim.Optimizer) -> list[OptimizerAdapter]:
    """Make optimizers capturable; idempotent. Eager calls keep running `torch.optim`."""
    adapters = []
    for optimizer in optimizers:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"prepare() takes torch.optim optimizers, got {type(optimizer).__name__}")
        adapter = getattr(optimizer, "_lordo_adapter", None)
        if adapter is None:
            adapter = OptimizerAdapter(optimizer)
            _ADAPTERS.add(adapter)
        adapters.append(adapter)
    return adapters


def prepared_adapters() -> list[OptimizerAdapter]:
    return list(_ADAPTERS)
