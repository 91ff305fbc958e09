"""`collectives.schedule_collectives` on hand-written aten graphs: which nodes move and which stay.

No process group is needed: the graphs are only reordered, never run.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from lordo_compile.passes.collectives import schedule_collectives

aten = torch.ops.aten
functional = torch.ops._c10d_functional


def _order(module: fx.GraphModule) -> list[str]:
    return [n.name for n in module.graph.nodes if n.op == "call_function"]


def _backward_with_two_buckets(early_ready: bool = False) -> fx.GraphModule:
    """A backward that computes grad_late's bucket first, then grad_early's; as AOTAutograd
    writes it, both buckets are sent after the last matmul and waited for at once.

    With `early_ready`, a third bucket's gradient is ready before any other, but its
    collective is written last."""
    g = fx.Graph()
    x, w_early, w_late = (g.placeholder(name) for name in ("x", "w_early", "w_late"))
    ready = g.call_function(aten.mm.default, (x, x), name="grad_ready") if early_ready else None
    late = g.call_function(aten.mm.default, (x, w_late), name="grad_late")
    early = g.call_function(aten.mm.default, (x, w_early), name="grad_early")
    sent = []
    for grad, bucket in ((late, "late"), (early, "early")) + (((ready, "ready"),) if early_ready else ()):
        flat = g.call_function(aten.view.default, (grad, [-1]), name=f"flat_{bucket}")
        cat = g.call_function(aten.cat.default, ([flat],), name=f"cat_{bucket}")
        sent.append(g.call_function(functional.all_reduce.default, (cat, "avg", "0"), name=f"all_reduce_{bucket}"))
    updates = []
    for reduced, weight in zip(reversed(sent), (w_early, w_late, x)):
        bucket = reduced.name.removeprefix("all_reduce_")
        waited = g.call_function(functional.wait_tensor.default, (reduced,), name=f"wait_{bucket}")
        shaped = g.call_function(aten.view.default, (waited, [4, 4]), name=f"shaped_{bucket}")
        updates.append(g.call_function(aten.sub.Tensor, (weight, shaped), name=f"update_{bucket}"))
    g.output(tuple(updates))
    return fx.GraphModule(torch.nn.Module(), g)


def test_collectives_start_when_their_bucket_exists_and_wait_where_it_is_read():
    module = _backward_with_two_buckets()
    schedule_collectives(module)
    assert _order(module) == [
        "grad_late", "flat_late", "cat_late", "all_reduce_late",
        "grad_early", "flat_early", "cat_early", "all_reduce_early",
        "wait_early", "shaped_early", "update_early",
        "wait_late", "shaped_late", "update_late",
    ]


def test_collectives_keep_their_order_among_themselves():
    """Every worker must issue its collectives in the same order: a bucket whose gradient
    is ready first still goes after the collectives written before it."""
    module = _backward_with_two_buckets(early_ready=True)
    schedule_collectives(module)
    order = _order(module)
    assert order.index("all_reduce_late") < order.index("all_reduce_early") < order.index("all_reduce_ready")
    assert order.index("all_reduce_late") < order.index("grad_early")
