"""Infrequent synchronization (local SGD, DiLoCo): H local steps, then one outer step.

ALGORITHMS.md section 2.

    every step (stage COMBINE): the step's own gradient averaging removed; each worker's
        inner optimizer (state and all) stays local.
    event "sync" (after steps H, 2H, ...; stage SYNC): after the local step, for every parameter
        delta_W = anchor_W - W'                       pseudo-gradient, positive along descent
        avg     = wait(all_reduce(cat(deltas), "avg")) one collective for the whole model
        anchor_W', buf_W' = lordo.outer_sgd_momentum(anchor_W, avg_W, buf_W, lr=, momentum=, nesterov=)
        anchor_W.copy_(anchor_W'); W.copy_(anchor_W')   every worker resets to the same anchor

The outer step is `outer.py`'s: the anchors are held as the weights are (full precision,
or a weight-storage pass's form, whose rounding error goes into the outer momentum).
W' is what the local step writes into W, after every earlier rewrite (a CAGE correction,
a lookahead, a requantization).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from ..graph import Role
from .collectives import group_name, insert_mean_all_reduce, remove_gradient_all_reduces
from .manager import Event, PassResult, Program, Stage, register_pass
from .outer import OuterOptimizer, apply_outer_step, end_of_updates, hold_anchors, pseudo_gradients


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

    @property
    def outer(self) -> OuterOptimizer:
        return OuterOptimizer(self.outer_lr, self.outer_momentum, self.nesterov)


def _events(option: Sync) -> tuple[Event, ...]:
    return (Event("sync", every=option.every, first=option.every - 1),)


def local_steps(program: Program, option: Sync) -> PassResult:
    """Every step: the step's own gradient averaging removed; inner optimizer state stays local."""
    removed = remove_gradient_all_reduces(program.graph.graph, "Policy.local_sgd / diloco")
    return PassResult(program, (f"local steps: removed {removed} gradient all-reduce(s); inner optimizer state "
                                "stays local",))


@register_pass("sync", stage=Stage.SYNC, option="sync", option_type=Sync, events=_events,
               also={Stage.COMBINE: local_steps})
def sync(program: Program, option: Sync) -> PassResult:
    notes = (f"sync after every {option.every} steps; outer SGD: lr {option.outer_lr}, momentum "
             f"{option.outer_momentum}, nesterov {option.nesterov}",)
    if "sync" not in program.events:
        return PassResult(program, notes)
    graph = program.graph
    g = graph.graph
    group = group_name(option.group)
    names = [site.param for site in graph.updates()]
    # Inserting before one fixed node keeps creation order: anchors, deltas, their average, the outer step.
    point = end_of_updates(graph)
    with g.inserting_before(point):
        anchors = hold_anchors(graph, names, "sync")
        deltas = pseudo_gradients(graph, anchors)
    values = [deltas[p] for p in names]
    averaged = insert_mean_all_reduce(graph, values, group, Role.GRADIENT, names) if group else values
    with g.inserting_before(point):
        apply_outer_step(graph, anchors, dict(zip(names, averaged)), option.outer, "sync")
    size = sum(math.prod(graph.params[n].shape) for n in names)
    return PassResult(program, notes + (
        f"sync: {len(names)} pseudo-gradients, "
        + (f"one all-reduce (mean) of {size:,} elements" if group else "one worker: no all-reduce"),))
