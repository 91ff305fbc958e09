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

Streaming (`fragments=F`, Streaming DiLoCo without overlap; ALGORITHMS.md section 9): the
parameters, in the step's order, are cut into F contiguous fragments of about equal size;
fragment f syncs alone, as above, after steps o_f, o_f + H, ... with o_f = (f + 1) H / F - 1
(event "sync.f"), so each sync sends about 1/F of the model and the last fragment syncs
when the whole model would.
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
    `fragments`: sync the model in this many fragments at staggered steps (streaming).

    Raises:
      ValueError: if `every` < 1, `outer_lr` <= 0, `outer_momentum` is outside [0, 1),
        `nesterov` is set without momentum, or `fragments` is not in [1, every].
    """

    every: int
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    nesterov: bool = False
    group: object = None
    fragments: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"Sync.every (sync_every) must be an int >= 1, got {self.every!r}")
        if not isinstance(self.outer_lr, numbers.Real) or not self.outer_lr > 0:
            raise ValueError(f"Sync.outer_lr must be > 0, got {self.outer_lr!r}")
        if not isinstance(self.outer_momentum, numbers.Real) or not 0 <= self.outer_momentum < 1:
            raise ValueError(f"Sync.outer_momentum must be in [0, 1), got {self.outer_momentum!r}")
        if self.nesterov and self.outer_momentum == 0:
            raise ValueError("Sync.nesterov=True needs outer_momentum > 0")
        if isinstance(self.fragments, bool) or not isinstance(self.fragments, int) or \
                not 1 <= self.fragments <= self.every:
            raise ValueError(f"Sync.fragments must be an int in [1, every={self.every}] (one fragment syncs per "
                             f"step at most), got {self.fragments!r}")

    def event(self, fragment: int) -> str:
        return "sync" if self.fragments == 1 else f"sync.{fragment}"

    @property
    def outer(self) -> OuterOptimizer:
        return OuterOptimizer(self.outer_lr, self.outer_momentum, self.nesterov)


def _events(option: Sync) -> tuple[Event, ...]:
    return tuple(Event(option.event(f), every=option.every, first=(f + 1) * option.every // option.fragments - 1)
                 for f in range(option.fragments))


def fragments_of(names: list[str], sizes: list[int], count: int) -> list[list[str]]:
    """`names` in order, cut into `count` contiguous runs of about equal total size, none empty."""
    if count > len(names):
        raise ValueError(f"Sync.fragments={count} is more than the {len(names)} parameters the step updates")
    total, running, fragments = sum(sizes), 0, [[]]
    for i, (name, size) in enumerate(zip(names, sizes)):
        to_start = count - len(fragments)
        # A parameter goes with the fragment its middle falls in.
        if fragments[-1] and to_start and (running + size / 2 >= total * len(fragments) / count
                                           or len(names) - i == to_start):
            fragments.append([])
        fragments[-1].append(name)
        running += size
    return fragments


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
    graph = program.graph
    everything = [site.param for site in graph.updates()]
    fragments = fragments_of(everything, [math.prod(graph.params[n].shape) for n in everything], option.fragments)
    if option.fragments > 1:
        notes += tuple(f"fragment {f} (syncs at event {option.event(f)!r}): {', '.join(names)}"
                       for f, names in enumerate(fragments))
    names = [n for f, fragment in enumerate(fragments) if option.event(f) in program.events for n in fragment]
    if not names:
        return PassResult(program, notes)
    g = graph.graph
    group = group_name(option.group)
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
