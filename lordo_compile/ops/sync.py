"""Outer optimizers for infrequent synchronization (ALGORITHMS.md section 2).

The averaged pseudo-gradient plays the gradient of `torch.optim.SGD` on the anchor:
with momentum and dampening 0, torch's first step (buffer = gradient) equals a zero
buffer's first update, so the buffer starts at zero.
"""

from __future__ import annotations

import torch

from .registry import define_aux_op, define_op


@define_op("outer_sgd", state=(), hyperparameters=(), attributes={"lr": "float"}, updates_parameter=False,
           doc="anchor <- anchor - lr * averaged pseudo-gradient")
def outer_sgd(anchor, pseudo_gradient, *, lr):
    return anchor + (-lr) * pseudo_gradient


@define_op(
    "outer_sgd_momentum",
    state=("momentum_buffer",),
    hyperparameters=(),
    attributes={"lr": "float", "momentum": "float", "nesterov": "bool"},
    doc="SGD with (Nesterov) momentum on the anchor, the pseudo-gradient as its gradient",
    updates_parameter=False,
)
def outer_sgd_momentum(anchor, pseudo_gradient, momentum_buffer, *, lr, momentum, nesterov):
    buf = momentum_buffer * momentum + pseudo_gradient
    direction = pseudo_gradient + momentum * buf if nesterov else buf
    return anchor + (-lr) * direction, buf


def outer_error_feedback_math(momentum_buffer, error, *, lr: float, momentum: float, nesterov: bool):
    """The outer momentum with a rounding error `error = W~ - q(W~)` of the anchor fed in, so
    that the later outer steps add back exactly +error (ALGORITHMS.md sections 5 and 7).

    With heavy ball, what is added to the buffer moves the anchor by -lr * momentum^k at the
    k-th later step, -lr * momentum / (1 - momentum) in all: injecting (1/lr)(1 - 1/momentum) e
    adds back +e. Nesterov's step reads momentum * buffer, one more factor of momentum, so it
    injects that divided by momentum.
    """
    gain = (1 - 1 / momentum) / lr
    if nesterov:
        gain = gain / momentum
    return momentum_buffer + gain * error


outer_error_feedback = define_aux_op(
    "outer_error_feedback",
    "(Tensor momentum_buffer, Tensor error, *, float lr, float momentum, bool nesterov) -> Tensor",
    outer_error_feedback_math,
    lambda momentum_buffer, error, **kwargs: torch.empty_like(momentum_buffer),
)
