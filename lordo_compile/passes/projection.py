"""The projection nodes GaLore, low-rank DDP and LoRDO share; not a pass itself.

    computed = lordo.low_rank_projection(source, projection, sketch, rank=r, tall=..., method=...)
    new_projection = computed[0]        # r leading singular vectors of the source's smaller side
    projection_finite = computed[1]     # False: the source was not finite, the old projection kept

    projected_grad = torch.matmul(grad, projection)         # tall: R = G P
    projected_grad = torch.matmul(projection.t(), grad)     # wide: R = P^T G

`source` is oriented as the weight (or is a sketch of it oriented so): its right singular
vectors when tall, its left ones when wide, from one SVD of `source` itself, as galore-torch.

A pass whose updates read projected gradients takes `ProjectsFromFactors` as its runtime: it
asks code generation for `project_from_factors`, which projects a weight's gradient from the
factors of its product, dY^T (X P), and so never forms the gradient.
"""

from __future__ import annotations

import functools
import operator

import torch
import torch.fx as fx

from ..graph import STATE, Role, TrainGraph, tag
from ..ops.low_rank import low_rank_projection
from .manager import Lowering, PassRuntime


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


def projected_gradient(graph: TrainGraph, param: str, grad: fx.Node, projection: fx.Node, *, tall: bool,
                       dtype: torch.dtype) -> fx.Node:
    """R = G P (tall) or P^T G (wide) at the insertion point, in float32 as the projection (a
    gradient of another `dtype` is cast first, as the low-rank update ops cast it)."""
    g = graph.graph
    if dtype != torch.float32:
        grad = g.call_method("to", (grad, torch.float32))
    factors = (grad, projection) if tall else (g.call_method("t", (projection,)), grad)
    return tag(g.call_function(torch.matmul, factors), Role.GRADIENT, param, name=f"projected_grad_{param}")


_MM = torch.ops.aten.mm.default
# The state name of each matrix's projection, before its parameter's name (`low_rank.plan_matrices`).
PROJECTION_STATE = "low_rank.projection."


class ProjectsFromFactors(PassRuntime):
    """The run-time side of a pass whose updates read projected gradients: their projections
    are formed from the factors of the gradients' products where that is cheaper."""

    def lowering(self, graph: TrainGraph) -> Lowering | None:
        return projections_from_factors(graph)


def projections_from_factors(graph: TrainGraph) -> Lowering | None:
    """The aten rewrite `project_from_factors` for `graph`'s projections (`PROJECTION_STATE`);
    None when it has none."""
    placeholders = graph.placeholders()
    positions = [i for i, node in enumerate(placeholders) if (node.meta.get(STATE) or "").startswith(PROJECTION_STATE)]
    if not positions:
        return None
    return Lowering((functools.partial(project_from_factors, inputs=len(placeholders), positions=positions),))


def project_from_factors(aten: fx.GraphModule, inputs: int, positions: list[int]) -> int:
    """Where an aten graph projects a matrix product that nothing else reads, R = (A B) P or
    R = P^T (A B) with P one of the graph's inputs at `positions` (a projection), multiply as
    A (B P) or (P^T A) B when that takes fewer multiplications; returns how many it rewrote.

    Why: a linear layer's weight gradient is such a product, G = dY^T X (m x n), whose inner
    side k is the batch's rows. Formed and projected, it costs m n (k + r) multiplications;
    from its factors, r k (m + n), and G is never held. The result differs from the product
    taken in the other order by rounding only. Changes nothing unless the graph has `inputs`
    inputs (the step graph's, in order)."""
    placeholders = [n for n in aten.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != inputs:
        return 0
    projections = {placeholders[i] for i in positions}
    rewritten = 0
    for node in [n for n in aten.graph.nodes if n.target is _MM]:
        left, right = node.args
        tall = _projection(right, projections) is not None
        side = _projection(right if tall else left, projections)
        found = _product(left if tall else right) if side is not None else None
        if found is None:
            continue
        (a, b), transposed, chain = found
        m, k = _shape(a)
        n = _shape(b)[1]
        rank = _shape(right)[1] if tall else _shape(left)[0]
        # A symbolic size (a step captured with dynamic shapes) is not compared: that would guard on it.
        if not all(isinstance(size, int) for size in (m, k, n, rank)) or rank * k * (m + n) >= m * n * (k + rank):
            continue
        # At the product, where its factors are last read: a projection is an input, there already.
        with aten.graph.inserting_before(chain[-1]):
            if transposed:
                a, b = _transposed(aten, b), _transposed(aten, a)
            projection, projection_transposed = side
            if projection_transposed:
                projection = _transposed(aten, projection)
            projected = _mm(aten, a, _mm(aten, b, projection)) if tall else _mm(aten, _mm(aten, projection, a), b)
        node.replace_all_uses_with(projected)
        for dead in [node, *chain]:
            aten.graph.erase_node(dead)
        rewritten += 1
    if rewritten:
        aten.graph.lint()
        aten.recompile()
    return rewritten


def _is_transpose(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is torch.ops.aten.t.default:
        return True
    return node.target is torch.ops.aten.permute.default and list(node.args[1]) == [1, 0]


def _under_transposes(node: fx.Node) -> tuple[fx.Node, bool, list[fx.Node]]:
    """(what `node` transposes, through any number of transposes; whether that number is odd;
    the nodes from `node` to it, both included)."""
    chain, transposed = [node], False
    while isinstance(node, fx.Node) and _is_transpose(node):
        transposed = not transposed
        node = node.args[0]
        chain.append(node)
    return node, transposed, chain


def _projection(node: fx.Node, projections: set[fx.Node]) -> tuple[fx.Node, bool] | None:
    """(the projection, whether `node` is its transpose) when `node` is a projection or
    transposes of one."""
    base, transposed, _ = _under_transposes(node)
    return (base, transposed) if base in projections else None


def _product(node: fx.Node) -> tuple[tuple[fx.Node, fx.Node], bool, list[fx.Node]] | None:
    """((A, B), whether `node` is (A B)^T rather than A B, the nodes from `node` to the product):
    `node` is a matrix product or transposes of one, each read by the next alone."""
    base, transposed, chain = _under_transposes(node)
    if not isinstance(base, fx.Node) or base.target is not _MM or any(len(n.users) != 1 for n in chain):
        return None
    return tuple(base.args), transposed, chain


def _shape(node: fx.Node) -> tuple[int, int]:
    return tuple(node.meta["val"].shape)


def _transposed(aten: fx.GraphModule, node: fx.Node) -> fx.Node:
    transposed = aten.graph.call_function(torch.ops.aten.permute.default, (node, [1, 0]))
    transposed.meta["val"] = node.meta["val"].permute(1, 0)
    return transposed


def _mm(aten: fx.GraphModule, left: fx.Node, right: fx.Node) -> fx.Node:
    product = aten.graph.call_function(_MM, (left, right))
    product.meta["val"] = torch.ops.aten.mm.default(left.meta["val"], right.meta["val"])
    return product
