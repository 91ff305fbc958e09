"""Data parallelism: average every gradient over workers, every step (DDP's semantics).

    before:  grad_W = grad[0]; ...; lordo.adamw(W, grad_W, ...)
    after:   grad_W = grad[0]; ...
             bucket = cat([grad_W.reshape(-1), ...]); avg = wait(all_reduce(bucket, "avg"))
             grad_W' = split(avg)[0].view(W.shape); ...; lordo.adamw(W, grad_W', ...)

Gradients are averaged where backward produced them, before any clipping or scaling the
step does, as torch's DistributedDataParallel does during backward: by default one bucket
of every gradient after the backward. With `bucket_cap_mb`, buckets are filled as DDP fills
them, in reverse parameter order (the order backward produces the gradients), the first up to
1 MiB and the others up to the cap, and code generation (`OverlappedBuckets`) starts each
bucket's all-reduce as soon as its gradients exist and waits for it only where its result is
first read, so it runs while the rest of the backward computes. A step that already
averages its gradients over the same group keeps its own collectives. One worker: nothing is
inserted.

Two levels: with `group=inner` and a periodic sync (local SGD, DiLoCo, LoRDO) over `outer`,
the two groups being the levels of a 2-D arrangement of the workers (`distributed.levels`),
gradients are averaged over `inner` every step and the models over `outer` every H steps:
each inner group trains as one worker with the inner group's batch (ALGORITHMS.md section 9).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph import PARAM, ROLE, Role, TrainGraph
from .collectives import (EVERY_STEP_AND_PERIODIC, OVERLAP, group_name, insert_mean_all_reduce, is_all_reduce,
                          over_two_levels, schedule_collectives)
from .manager import Conflict, Lowering, PassResult, PassRuntime, Program, Stage, register_pass


@dataclass(frozen=True, kw_only=True)
class DataParallel:
    """All-reduce (mean) every gradient every step.

    Args:
      group: the process group (None: the default group). Its timeout bounds how long a
        worker waits for a dead or stuck peer.
      bucket_cap_mb: None: one all-reduce of every gradient after the backward (on 2 CPU
        cores with gloo the faster: `benchmarks.ddp_step`). A number: buckets of at most that
        many MiB after the first (which, as in DistributedDataParallel, carries at most 1 MiB),
        each issued during the backward as soon as its gradients exist (DDP's default is 25),
        for links that move data beside the compute (NCCL, a NIC).
    """

    group: object = None
    bucket_cap_mb: float | None = None

    def __post_init__(self) -> None:
        if self.bucket_cap_mb is not None and (
                isinstance(self.bucket_cap_mb, bool) or not isinstance(self.bucket_cap_mb, numbers.Real)
                or not self.bucket_cap_mb > 0):
            raise ValueError(f"DataParallel.bucket_cap_mb must be a number of MiB > 0 or None, got "
                             f"{self.bucket_cap_mb!r}")


class OverlappedBuckets(PassRuntime):
    """Asks code generation to keep each bucket's all-reduce early and its wait late in the
    graphs that hold them: `schedule_collectives` on the aten graph, and Inductor's peak-memory
    reordering off, since it computes each weight's gradient just before its update reads it,
    which would leave nothing for a collective to overlap."""

    def lowering(self, graph: TrainGraph) -> Lowering | None:
        if not any(node.meta.get(OVERLAP) for node in graph.graph.nodes):
            return None
        return Lowering((schedule_collectives,), {"reorder_for_peak_memory": False})


@register_pass("data_parallel", stage=Stage.COMBINE, option="data_parallel", option_type=DataParallel,
               conflicts={"sync": Conflict(EVERY_STEP_AND_PERIODIC, over_two_levels)}, runtime=OverlappedBuckets)
def data_parallel(program: Program, option: DataParallel) -> PassResult:
    group = group_name(option.group)
    if group is None:
        return PassResult(program, ("one worker (torch.distributed not initialised or world size 1): no collective",))
    graph = program.graph
    g = graph.graph
    if any(is_all_reduce(n) and n.args[2] == group for n in g.nodes):
        return PassResult(program, ("the step averages its own gradients; kept as written",))
    grads = [n for n in g.nodes if n.meta.get(ROLE) == Role.GRADIENT and _is_backward_output(n)][::-1]
    caps = None if option.bucket_cap_mb is None else (
        min(FIRST_BUCKET_BYTES, _mib(option.bucket_cap_mb)), _mib(option.bucket_cap_mb))
    averaged = insert_mean_all_reduce(graph, grads, group, Role.GRADIENT, [n.meta[PARAM] for n in grads], caps)
    for raw, mean in zip(grads, averaged):
        bucket_input = next(u for u in raw.users if u.op == "call_method" and u.target == "reshape")
        raw.replace_all_uses_with(mean, delete_user_cb=lambda user, keep=bucket_input: user is not keep)
    size = sum(graph.value(n).numel() * graph.value(n).element_size() for n in grads)
    buckets = len({_bucket_of(n) for n in averaged})
    return PassResult(program, (f"{buckets} all-reduce(s) (mean) of {len(grads)} gradients, {size:,} bytes per step",))


# DistributedDataParallel's first bucket (torch.distributed._DEFAULT_FIRST_BUCKET_BYTES).
FIRST_BUCKET_BYTES = 1024 * 1024


def _mib(mb: float) -> int:
    return int(mb * 1024 * 1024)


def _bucket_of(averaged: fx.Node) -> fx.Node:
    while averaged.op != "call_function" or averaged.target is not torch.split:
        averaged = averaged.args[0]
    return averaged


def _is_backward_output(node: fx.Node) -> bool:
    source = node.args[0] if node.args else None
    return isinstance(source, fx.Node) and source.meta.get(ROLE) == Role.BACKWARD
