"""Infrequent synchronization (local SGD, DiLoCo): H local steps, then one outer step.

ALGORITHMS.md section 2.

    phase "local" (every step but each H-th): the step with its gradient averaging
        removed; each worker's inner optimizer (state and all) stays local.
    phase "sync" (after steps H, 2H, ...): the local step, then for every parameter
        delta_W = anchor_W - W'                       pseudo-gradient, positive along descent
        avg     = wait(all_reduce(cat(deltas), "avg")) one collective for the whole model
        anchor_W', buf_W' = lordo.outer_sgd_momentum(anchor_W, avg_W, buf_W, lr=, momentum=, nesterov=)
        anchor_W.copy_(anchor_W'); W.copy_(anchor_W')   every worker resets to the same anchor

Every worker computes the same anchor from the same average, so nothing is broadcast.
The anchors (and outer momentum) are runtime state, allocated as copies of the
parameters when the step is first compiled.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass

import torch

from ..graph import Role, StateSpec, TrainGraph, UpdateSite, tag
from ..ops import op_named
from .collectives import group_name, insert_mean_all_reduce, remove_gradient_all_reduces
from .manager import PassResult, Program, Rule, Schedule, register_pass


@dataclass(frozen=True, kw_only=True)
class Sync:
    """Synchronize every `every` steps with an outer SGD step on the averaged pseudo-gradient.

    `outer_lr=1` without momentum is plain model averaging (local SGD); DiLoCo uses
    `outer_lr=0.7, outer_momentum=0.9, nesterov=True`. `group` is the process group (None:
    the default group); its timeout bounds how long a worker waits for a dead peer.

    Raises:
      ValueError: if `every` < 1, `outer_lr` <= 0, `outer_momentum` is outside [0, 1), or
        `nesterov` is set without momentum.
    """

    every: int
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    nesterov: bool = False
    group: object = None

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"Sync.every (sync_every) must be an int >= 1, got {self.every!r}")
        if not isinstance(self.outer_lr, numbers.Real) or not self.outer_lr > 0:
            raise ValueError(f"Sync.outer_lr must be > 0, got {self.outer_lr!r}")
        if not isinstance(self.outer_momentum, numbers.Real) or not 0 <= self.outer_momentum < 1:
            raise ValueError(f"Sync.outer_momentum must be in [0, 1), got {self.outer_momentum!r}")
        if self.nesterov and self.outer_momentum == 0:
            raise ValueError("Sync.nesterov=True needs outer_momentum > 0")



def _outer_step(graph: TrainGraph, option: Sync, group: str | None) -> list[str]:
    """Append the pseudo-gradient, its average and the outer update to a copy of the local step."""
    g = graph.graph
    sites = graph.updates()
    new_params = [site.outputs()["param"] for site in sites]
    names = [site.param for site in sites]
    anchors, buffers = {}, {}
    for site in sites:
        info = graph.params[site.param]
        anchors[site.param] = graph.add_state(StateSpec(
            name=f"sync.anchor.{site.param}", shape=info.shape, dtype=info.dtype, owner="sync",
            param=site.param, init=f"copy:{site.param}"))
        if option.outer_momentum:
            buffers[site.param] = graph.add_state(StateSpec(
                name=f"sync.outer_momentum.{site.param}", shape=info.shape, dtype=info.dtype, owner="sync",
                param=site.param))
    order = {n: i for i, n in enumerate(g.nodes)}
    last_write = max((u for n in new_params for u in n.users), key=order.__getitem__)
    deltas = []
    with g.inserting_before(last_write.next):
        for param, new in zip(names, new_params):
            delta = g.call_function(torch.ops.aten.sub.Tensor, (anchors[param], new))
            delta.meta["val"] = anchors[param].meta["val"]
            deltas.append(tag(delta, Role.GRADIENT, param, name=f"pseudo_gradient_{param}"))
    averaged = insert_mean_all_reduce(g, deltas, group, Role.GRADIENT, names) if group else deltas
    order = {n: i for i, n in enumerate(g.nodes)}
    point = max(averaged, key=order.__getitem__).next
    op = op_named("outer_sgd_momentum" if option.outer_momentum else "outer_sgd")
    kwargs = {"lr": float(option.outer_lr)}
    if option.outer_momentum:
        kwargs.update(momentum=float(option.outer_momentum), nesterov=bool(option.nesterov))
    with g.inserting_before(point):
        for param, delta in zip(names, averaged):
            args = (anchors[param], delta) + ((buffers[param],) if option.outer_momentum else ())
            outer = tag(g.call_function(op.overload, args, kwargs), Role.OPTIMIZER_UPDATE, param,
                         name=f"{op.name}_{param}")
            outputs = UpdateSite(outer, op, param).outputs()
            if option.outer_momentum:
                for key, index in (("param", 0), ("momentum_buffer", 1)):
                    outputs[key] = tag(g.call_function(operator.getitem, (outer, index)),
                                        Role.OPTIMIZER_UPDATE, param, key, name=f"new_outer_{key}_{param}")
                tag(g.call_method("copy_", (buffers[param], outputs["momentum_buffer"])), Role.WRITEBACK, param,
                     "outer_momentum", name=f"write_outer_momentum_{param}")
            anchor = outputs["param"]
            tag(g.call_method("copy_", (anchors[param], anchor)), Role.WRITEBACK, param, "anchor",
                 name=f"write_anchor_{param}")
            placeholder = next(s.input("param") for s in sites if s.param == param)
            tag(g.call_method("copy_", (placeholder, anchor)), Role.WRITEBACK, param, "param",
                 name=f"reset_to_anchor_{param}")
    return names


@register_pass("sync", option="sync", conflicts=("data_parallel", "low_rank"))
def sync(program: Program, option: Sync) -> PassResult:
    if set(program.phases) != {"step"}:
        raise NotImplementedError(f"sync runs on a single-phase step; got phases {sorted(program.phases)}")
    group = group_name(option.group)
    local = program.phases["step"].copy(phase="local")
    removed = remove_gradient_all_reduces(local.graph, "Policy.local_sgd / diloco")
    synced = local.copy(phase="sync")
    names = _outer_step(synced, option, group)
    schedule = Schedule("local", (Rule("sync", option.every, option.every - 1),))
    size = sum(_numel(synced.params[n].shape) for n in names)
    notes = (
        f"local phase: removed {removed} gradient all-reduce(s); inner optimizer state stays local",
        f"sync phase after every {option.every} steps: {len(names)} pseudo-gradients, "
        + (f"one all-reduce (mean) of {size:,} elements" if group else "one worker: no all-reduce"),
        f"outer SGD: lr {option.outer_lr}, momentum {option.outer_momentum}, nesterov {option.nesterov}",
    )
    return PassResult(Program({"local": local, "sync": synced}, schedule, program.watches), notes)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
