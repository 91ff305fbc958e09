"""Ops for compressed gossip (DoCoM-SGT, passes/gossip.py): messages and the neighbour exchange.

    indices, values = lordo.top_k_message(x, k=k)      the k entries of largest |x| of a flat x
    sum             = lordo.message_sum(indices, values, weights, size=n)
                      sum_j weights[j] * (row j as a dense vector of n); indices None: rows are dense
    received        = lordo.neighbour_exchange(buffer, group, send_to, recv_from)
                      `buffer` to every rank of `send_to`, one buffer back from every rank of
                      `recv_from` (the rows of the result, in that order)

The exchange is point to point (`torch.distributed.batch_isend_irecv`): what crosses the
network is `buffer` once per rank in `send_to`, and nothing goes to any other rank. It is
a custom op that stays opaque through AOTAutograd and Inductor (which calls it as an
extern kernel); `exchange_bytes` gives what a node of it sends.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import Tensor

from .registry import define_aux_op


def top_k_message_math(x: Tensor, *, k: int) -> tuple[Tensor, Tensor]:
    indices = x.abs().topk(k, sorted=False).indices
    return indices.to(torch.int32), x.gather(0, indices)


top_k_message = define_aux_op(
    "top_k_message",
    "(Tensor x, *, int k) -> (Tensor, Tensor)",
    top_k_message_math,
    lambda x, *, k: (torch.empty(k, dtype=torch.int32, device=x.device), x.new_empty(k)),
)


def message_sum_math(indices: Tensor | None, values: Tensor, weights: list[float], *, size: int) -> Tensor:
    total = values.new_zeros(size)
    for j, weight in enumerate(weights):
        row = values[j] if indices is None else values.new_zeros(size).scatter(0, indices[j].long(), values[j])
        total = total + weight * row
    return total


message_sum = define_aux_op(
    "message_sum",
    "(Tensor? indices, Tensor values, float[] weights, *, SymInt size) -> Tensor",
    message_sum_math,
    lambda indices, values, weights, *, size: values.new_empty(size),
)


@torch.library.custom_op("lordo::neighbour_exchange", mutates_args=())
def neighbour_exchange(buffer: Tensor, group: str, send_to: list[int], recv_from: list[int]) -> Tensor:
    process_group = dist.distributed_c10d._resolve_process_group(group)
    received = buffer.new_empty((len(recv_from), buffer.numel()))
    payload = buffer.contiguous()
    ops = [dist.P2POp(dist.isend, payload, dist.get_global_rank(process_group, peer), process_group)
           for peer in send_to]
    ops += [dist.P2POp(dist.irecv, received[i], dist.get_global_rank(process_group, peer), process_group)
            for i, peer in enumerate(recv_from)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return received


@neighbour_exchange.register_fake
def _(buffer, group, send_to, recv_from):
    return buffer.new_empty((len(recv_from), buffer.numel()))


NEIGHBOUR_EXCHANGE = torch.ops.lordo.neighbour_exchange.default


def exchange_bytes(node: fx.Node) -> int:
    """Bytes a `neighbour_exchange` node puts on the wire per call: its buffer, once per receiver."""
    buffer, _, send_to, _ = node.args
    value = buffer.meta["val"]
    return value.numel() * value.element_size() * len(send_to)
