"""The projection-refresh node GaLore, low-rank DDP and LoRDO share; not a pass itself.

    computed = lordo.low_rank_projection(source, projection, sketch, rank=r, tall=..., method=...)
    new_projection = computed[0]        # r leading singular vectors of the source's smaller side
    projection_finite = computed[1]     # False: the source was not finite, the old projection kept

`source` is oriented as the weight (or is a sketch of it oriented so): its right singular
vectors when tall, its left ones when wide, from one SVD of `source` itself, as galore-torch.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from ..graph import Role, TrainGraph, tag
from ..ops.low_rank import low_rank_projection


def refreshed_projection(graph: TrainGraph, param: str, source: fx.Node, projection: fx.Node,
                         sketch: fx.Node | None, *, rank: int, tall: bool, method: str,
                         power_iterations: int) -> tuple[fx.Node, fx.Node]:
    """(new projection, whether it was computed) from `source`, at the insertion point."""
    g = graph.graph
    computed = tag(g.call_function(low_rank_projection, (source, projection, sketch if sketch is not None else projection),
                                   {"rank": rank, "tall": tall, "method": method,
                                    "power_iterations": power_iterations}),
                   Role.OPTIMIZER_UPDATE, param, name=f"refresh_{param}")
    new = tag(g.call_function(operator.getitem, (computed, 0)), Role.OPTIMIZER_UPDATE, param, "projection",
              name=f"new_projection_{param}")
    finite = tag(g.call_function(operator.getitem, (computed, 1)), Role.OPTIMIZER_UPDATE, param,
                 name=f"projection_finite_{param}")
    return new, finite


def write_projection(graph: TrainGraph, param: str, projection: fx.Node, new: fx.Node) -> fx.Node:
    """`projection.copy_(new)` at the insertion point."""
    return tag(graph.graph.call_method("copy_", (projection, new)), Role.WRITEBACK, param, "projection",
               name=f"write_projection_{param}")
