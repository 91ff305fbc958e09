"""Canonical optimizer updates: `torch.optim` SGD, Adam and AdamW as pure functions.

Each function reproduces the single-tensor path of `torch.optim` (`_single_tensor_sgd`,
`_single_tensor_adam`) operation for operation, in the same order, so that the compiled
step rounds as eager does. Hyperparameters arrive as 0-d float64 tensors that the runtime
refreshes from `param_groups` before every call: a scheduler that changes `lr` (or
`betas`, as `OneCycleLR` does) takes effect without a recompile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import define_op


@define_op(
    "sgd",
    state=(),
    hyperparameters=("lr", "weight_decay"),
    attributes={"maximize": "bool"},
    doc="SGD without momentum: p <- p - lr * (g + wd * p)",
)
def sgd(param: Tensor, grad: Tensor, lr: Tensor, weight_decay: Tensor, *, maximize: bool):
    grad = -grad if maximize else grad
    grad = grad + weight_decay * param
    return param + (-lr) * grad


def _momentum_direction(grad, buf, momentum, nesterov):
    return grad + momentum * buf if nesterov else buf


@define_op(
    "sgd_momentum",
    state=("momentum_buffer",),
    hyperparameters=("lr", "momentum", "dampening", "weight_decay"),
    attributes={"nesterov": "bool", "maximize": "bool"},
    doc="SGD with a momentum buffer (heavy ball or Nesterov)",
)
def sgd_momentum(
    param, grad, momentum_buffer, lr, momentum, dampening, weight_decay, *, nesterov, maximize
):
    grad = -grad if maximize else grad
    grad = grad + weight_decay * param
    buf = momentum_buffer * momentum + (1 - dampening) * grad
    return param + (-lr) * _momentum_direction(grad, buf, momentum, nesterov), buf


@define_op(
    "sgd_momentum_dampened",
    state=("momentum_buffer", "buffer_fresh"),
    hyperparameters=("lr", "momentum", "dampening", "weight_decay"),
    attributes={"nesterov": "bool", "maximize": "bool"},
    doc="SGD with momentum and dampening, whose first step copies the gradient into the buffer",
)
def sgd_momentum_dampened(
    param,
    grad,
    momentum_buffer,
    buffer_fresh,
    lr,
    momentum,
    dampening,
    weight_decay,
    *,
    nesterov,
    maximize,
):
    # torch.optim creates the buffer as a copy of the first gradient; with dampening != 0
    # that differs from a zero buffer's first update, so the first step is flagged.
    grad = -grad if maximize else grad
    grad = grad + weight_decay * param
    buf = torch.where(
        buffer_fresh > 0, grad, momentum_buffer * momentum + (1 - dampening) * grad
    )
    direction = _momentum_direction(grad, buf, momentum, nesterov)
    return param + (-lr) * direction, buf, torch.zeros_like(buffer_fresh)


def _adam(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, *, decoupled, maximize):
    grad = -grad if maximize else grad
    step = step + 1
    if decoupled:
        param = param * (1 - lr * weight_decay)
    else:
        grad = grad + weight_decay * param
    # Tensor.lerp_ with weight w < 0.5 computes self + w * (end - self).
    exp_avg = exp_avg + (1 - beta1) * (grad - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    count = step.to(torch.float64)
    bias_correction1 = 1 - beta1**count
    bias_correction2_sqrt = (1 - beta2**count).sqrt()
    denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps
    step_size = lr / bias_correction1
    return param + (-step_size) * exp_avg / denom, exp_avg, exp_avg_sq, step


_ADAM_STATE = ("exp_avg", "exp_avg_sq", "step")
_ADAM_HYPERPARAMETERS = ("lr", "beta1", "beta2", "eps", "weight_decay")


@define_op(
    "adam",
    state=_ADAM_STATE,
    hyperparameters=_ADAM_HYPERPARAMETERS,
    attributes={"maximize": "bool"},
    doc="Adam with L2 weight decay added to the gradient",
)
def adam(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, *, maximize):
    return _adam(
        param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay,
        decoupled=False, maximize=maximize,
    )


@define_op(
    "adamw",
    state=_ADAM_STATE,
    hyperparameters=_ADAM_HYPERPARAMETERS,
    attributes={"maximize": "bool"},
    doc="Adam with decoupled weight decay (AdamW)",
)
def adamw(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, *, maximize):
    return _adam(
        param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay,
        decoupled=True, maximize=maximize,
    )
