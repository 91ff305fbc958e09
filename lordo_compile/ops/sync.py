"""Outer optimizers for infrequent synchronization (ALGORITHMS.md section 2).

The averaged pseudo-gradient plays the gradient of `torch.optim.SGD` on the anchor:
with momentum and dampening 0, torch's first step (buffer = gradient) equals a zero
buffer's first update, so the buffer starts at zero.
"""

from __future__ import annotations

from .registry import define_op


@define_op("outer_sgd", state=(), hyperparameters=(), attributes={"lr": "float"},
           doc="anchor <- anchor - lr * averaged pseudo-gradient")
def outer_sgd(anchor, pseudo_gradient, *, lr):
    return anchor + (-lr) * pseudo_gradient


@define_op(
    "outer_sgd_momentum",
    state=("momentum_buffer",),
    hyperparameters=(),
    attributes={"lr": "float", "momentum": "float", "nesterov": "bool"},
    doc="SGD with (Nesterov) momentum on the anchor, the pseudo-gradient as its gradient",
)
def outer_sgd_momentum(anchor, pseudo_gradient, momentum_buffer, *, lr, momentum, nesterov):
    buf = momentum_buffer * momentum + pseudo_gradient
    direction = pseudo_gradient + momentum * buf if nesterov else buf
    return anchor + (-lr) * direction, buf
