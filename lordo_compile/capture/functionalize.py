"""Make what happens to gradients explicit data flow.

Users average and clip gradients in place (`dist.all_reduce(p.grad); p.grad /= world`,
`clip_grad_norm_`), and dynamo records those mutations as they are:

    t = _c10d_functional.all_reduce(grad_W, 'sum', '0'); w = wait_tensor(t)
    grad_W.copy_(w); grad_W /= 2
    lordo.adamw(W, grad_W, ...)            # reads grad_W *after* the mutations

Here every in-place op on a gradient becomes its out-of-place form, and later readers
get the value it produced:

    t = all_reduce(grad_W, 'sum', '0'); w = wait_tensor(t); truediv = w / 2
    lordo.adamw(W, truediv, ...)

so a pass can see, and replace, exactly which value an update consumes.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

_OUT_OF_PLACE = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


def functionalize_gradients(graph: fx.Graph, grads: set[fx.Node]) -> set[fx.Node]:
    """Rewrite in-place ops on `grads`; returns the nodes now holding their final values."""
    # Each gradient is a storage; `owner` maps every value it has held to it, and `latest`
    # gives its value at the current point of the walk (a read after a mutation sees it).
    owner: dict[fx.Node, fx.Node] = {g: g for g in grads}
    latest: dict[fx.Node, fx.Node] = {g: g for g in grads}

    def resolve(n: fx.Node) -> fx.Node:
        return latest[owner[n]] if n in owner else n

    def replace(node: fx.Node, storage: fx.Node, value: fx.Node) -> None:
        owner[value] = storage
        latest[storage] = value
        owner[node] = storage
        node.replace_all_uses_with(value)
        graph.erase_node(node)

    for node in list(graph.nodes):
        node.args, node.kwargs = fx.node.map_arg((node.args, node.kwargs), resolve)
        first = node.args[0] if node.args else None
        if node.op == "call_method" and isinstance(first, fx.Node) and first in owner:
            if node.target == "copy_":
                replace(node, owner[first], node.args[1])
            elif str(node.target).endswith("_"):
                with graph.inserting_before(node):
                    value = graph.call_method(str(node.target)[:-1], node.args, node.kwargs)
                value.meta = dict(node.meta)
                replace(node, owner[first], value)
        elif node.op == "call_function" and node.target in _OUT_OF_PLACE and isinstance(first, fx.Node) and first in owner:
            with graph.inserting_before(node):
                value = graph.call_function(_OUT_OF_PLACE[node.target], node.args, node.kwargs)
            value.meta = dict(node.meta)
            replace(node, owner[first], value)
        elif node.op == "call_function" and isinstance(first, (list, tuple)) and any(a in owner for a in first):
            out_of_place = _foreach_out_of_place(node.target)
            if out_of_place is None:
                continue
            with graph.inserting_before(node):
                value = graph.call_function(out_of_place, node.args, node.kwargs)
            value.meta = dict(node.meta)
            for i, grad in enumerate(first):
                if grad in owner:
                    with graph.inserting_before(node):
                        item = graph.call_function(operator.getitem, (value, i))
                    owner[item] = owner[grad]
                    latest[owner[grad]] = item
            node.replace_all_uses_with(value)
            graph.erase_node(node)
    return set(latest.values())


def _foreach_out_of_place(target):
    name = getattr(target, "__name__", "")
    if name.startswith("_foreach_") and name.endswith("_"):
        return getattr(torch, name[:-1], None)
    return None
