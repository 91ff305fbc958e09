"""Data parallelism: average every gradient over workers, every step (DDP's semantics).

    before:  grad_W = grad[0]; ...; lordo.adamw(W, grad_W, ...)
    after:   grad_W = grad[0]; ...
             bucket = cat([grad_W.reshape(-1), ...]); avg = wait(all_reduce(bucket, "avg"))
             grad_W' = split(avg)[0].view(W.shape); ...; lordo.adamw(W, grad_W', ...)

Gradients are averaged where backward produced them, before any clipping or scaling the
step does, as torch's DistributedDataParallel does during backward. A step that already
averages its gradients over the same group keeps its own collectives. One worker: nothing is
inserted.

Two levels: with `group=inner` and a periodic sync (local SGD, DiLoCo, LoRDO) over `outer`,
the two groups being the levels of a 2-D arrangement of the workers (`distributed.levels`),
gradients are averaged over `inner` every step and the models over `outer` every H steps:
each inner group trains as one worker with the inner group's batch (ALGORITHMS.md section 9).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ..graph import PARAM, ROLE, Role
from .collectives import EVERY_STEP_AND_PERIODIC, group_name, insert_mean_all_reduce, is_all_reduce, over_two_levels
from .manager import Conflict, PassResult, Program, Stage, register_pass


@dataclass(frozen=True, kw_only=True)
class DataParallel:
    """All-reduce (mean) every gradient every step.

    Args:
      group: the process group (None: the default group). Its timeout bounds how long a
        worker waits for a dead or stuck peer.
    """

    group: object = None


@register_pass("data_parallel", stage=Stage.COMBINE, option="data_parallel", option_type=DataParallel,
               conflicts={"sync": Conflict(EVERY_STEP_AND_PERIODIC, over_two_levels)})
def data_parallel(program: Program, option: DataParallel) -> PassResult:
    group = group_name(option.group)
    if group is None:
        return PassResult(program, ("one worker (torch.distributed not initialised or world size 1): no collective",))
    graph = program.graph
    g = graph.graph
    if any(is_all_reduce(n) and n.args[2] == group for n in g.nodes):
        return PassResult(program, ("the step averages its own gradients; kept as written",))
    grads = [n for n in g.nodes if n.meta.get(ROLE) == Role.GRADIENT and _is_backward_output(n)]
    averaged = insert_mean_all_reduce(graph, grads, group, Role.GRADIENT, [n.meta[PARAM] for n in grads])
    for raw, mean in zip(grads, averaged):
        bucket_input = next(u for u in raw.users if u.op == "call_method" and u.target == "reshape")
        raw.replace_all_uses_with(mean, delete_user_cb=lambda user, keep=bucket_input: user is not keep)
    size = sum(graph.value(n).numel() * graph.value(n).element_size() for n in grads)
    return PassResult(program, (f"one all-reduce (mean) of {len(grads)} gradients, {size:,} bytes per step",))


def _is_backward_output(node: fx.Node) -> bool:
    source = node.args[0] if node.args else None
    return isinstance(source, fx.Node) and source.meta.get(ROLE) == Role.BACKWARD
