"""Low-rank optimizer updates (GaLore) and the projections they use.

ALGORITHMS.md section 1. The projection side follows the smaller dimension of `W (m x n)`:

    tall (m >= n): P is n x r (right singular vectors), R = G P (m x r),  dW = a N P^T
    wide (m <  n): P is m x r (left singular vectors),  R = P^T G (r x n), dW = a P N

Moments live on R. Scalars are computed as in `optim.py` (float64 0-d, cast by the ops
that use them); the projection is float32 whatever the parameter's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import define_aux_op, define_op


def project(grad: Tensor, projection: Tensor, tall: bool) -> Tensor:
    g = grad.to(projection.dtype)
    return g @ projection if tall else projection.T @ g


def project_back(update: Tensor, projection: Tensor, tall: bool) -> Tensor:
    return update @ projection.T if tall else projection @ update


def _adam_direction(r, exp_avg, exp_avg_sq, step, beta1, beta2, eps):
    step = step + 1
    exp_avg = exp_avg + (1 - beta1) * (r - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * r * r
    count = step.to(torch.float64)
    bias_correction1 = 1 - beta1**count
    bias_correction2_sqrt = (1 - beta2**count).sqrt()
    direction = (exp_avg / bias_correction1) / (exp_avg_sq.sqrt() / bias_correction2_sqrt + eps)
    return direction, exp_avg, exp_avg_sq, step


def _galore_adam(param, grad, exp_avg, exp_avg_sq, step, projection, lr, beta1, beta2, eps, weight_decay,
                 *, scale, tall, maximize, decoupled, projected=False):
    grad = -grad if maximize else grad
    if projected:
        r = grad.to(exp_avg.dtype)
    else:
        if not decoupled:
            grad = grad + weight_decay * param
        r = project(grad, projection, tall).to(exp_avg.dtype)
    direction, exp_avg, exp_avg_sq, step = _adam_direction(r, exp_avg, exp_avg_sq, step, beta1, beta2, eps)
    update = project_back(direction.to(projection.dtype), projection, tall).to(param.dtype)
    param = param + (-lr * scale) * update
    if decoupled:
        # GaLore (ALGORITHMS.md section 1) decays after the projected step.
        param = param * (1 - lr * weight_decay)
    return param, exp_avg, exp_avg_sq, step


_ADAM = dict(
    state=("exp_avg", "exp_avg_sq", "step"),
    buffers=("projection",),
    hyperparameters=("lr", "beta1", "beta2", "eps", "weight_decay"),
    attributes={"scale": "float", "tall": "bool", "maximize": "bool"},
)


@define_op("galore_adamw", **_ADAM, doc="AdamW whose moments live on the projected gradient")
def galore_adamw(param, grad, exp_avg, exp_avg_sq, step, projection, lr, beta1, beta2, eps, weight_decay,
                 *, scale, tall, maximize):
    return _galore_adam(param, grad, exp_avg, exp_avg_sq, step, projection, lr, beta1, beta2, eps,
                        weight_decay, scale=scale, tall=tall, maximize=maximize, decoupled=True)


@define_op("galore_adam", **_ADAM, doc="Adam (L2 decay in the gradient) with projected moments")
def galore_adam(param, grad, exp_avg, exp_avg_sq, step, projection, lr, beta1, beta2, eps, weight_decay,
                *, scale, tall, maximize):
    return _galore_adam(param, grad, exp_avg, exp_avg_sq, step, projection, lr, beta1, beta2, eps,
                        weight_decay, scale=scale, tall=tall, maximize=maximize, decoupled=False)


@define_op("galore_adamw_projected", **_ADAM, projected_gradient=True,
           doc="AdamW on a gradient already projected (and averaged): low-rank DDP's update")
def galore_adamw_projected(param, projected_grad, exp_avg, exp_avg_sq, step, projection, lr, beta1, beta2, eps,
                           weight_decay, *, scale, tall, maximize):
    return _galore_adam(param, projected_grad, exp_avg, exp_avg_sq, step, projection, lr, beta1, beta2, eps,
                        weight_decay, scale=scale, tall=tall, maximize=maximize, decoupled=True, projected=True)


@define_op(
    "galore_sgd_momentum",
    state=("momentum_buffer",),
    buffers=("projection",),
    hyperparameters=("lr", "momentum", "dampening", "weight_decay"),
    attributes={"scale": "float", "tall": "bool", "nesterov": "bool", "maximize": "bool"},
    doc="SGD whose momentum buffer lives on the projected gradient",
)
def galore_sgd_momentum(param, grad, momentum_buffer, projection, lr, momentum, dampening, weight_decay,
                        *, scale, tall, nesterov, maximize):
    grad = -grad if maximize else grad
    grad = grad + weight_decay * param
    r = project(grad, projection, tall).to(momentum_buffer.dtype)
    buf = momentum_buffer * momentum + (1 - dampening) * r
    direction = r + momentum * buf if nesterov else buf
    update = project_back(direction.to(projection.dtype), projection, tall).to(param.dtype)
    return param + (-lr * scale) * update, buf


METHODS = ("svd", "randomized", "subspace")


def _orthonormal(y: Tensor) -> Tensor:
    return torch.linalg.qr(y).Q


def _rayleigh_ritz(a: Tensor, basis: Tensor, rank: int) -> Tensor:
    """Leading left singular vectors of `a` within span(basis), via a small SVD."""
    small, _, _ = torch.linalg.svd(basis.T @ a, full_matrices=False)
    return (basis @ small)[:, :rank]


def projection_math(grad: Tensor, previous: Tensor, sketch: Tensor, *, rank: int, tall: bool, method: str,
                    power_iterations: int) -> tuple[Tensor, Tensor]:
    """A new projection from `grad` and whether it was computed (False: `previous` kept).

    A gradient with a non-finite entry gives no usable subspace, and LAPACK would raise
    on it; it is replaced by zeros for the computation and the previous projection kept.
    """
    g = grad.to(torch.float32)
    finite = torch.isfinite(g).all()
    g = torch.where(finite, g, torch.zeros_like(g))
    a = g.T if tall else g
    if method == "svd":
        u, _, _ = torch.linalg.svd(a, full_matrices=False)
        new = u[:, :rank]
    elif method == "randomized":
        basis = _orthonormal(a @ sketch)
        for _ in range(power_iterations):
            basis = _orthonormal(a @ _orthonormal(a.T @ basis))
        new = _rayleigh_ritz(a, basis, rank)
    elif method == "subspace":
        basis = previous
        for _ in range(max(1, power_iterations)):
            basis = _orthonormal(a @ (a.T @ basis))
        new = _rayleigh_ritz(a, basis, rank)
    else:
        raise ValueError(f"unknown projection method {method!r}; choose from {METHODS}")
    return torch.where(finite, new, previous), finite


def _projection_fake(grad, previous, sketch, *, rank, tall, method, power_iterations):
    return torch.empty_like(previous), torch.empty((), dtype=torch.bool, device=grad.device)


low_rank_projection = define_aux_op(
    "low_rank_projection",
    "(Tensor grad, Tensor previous, Tensor sketch, *, int rank, bool tall, str method, int power_iterations)"
    " -> (Tensor, Tensor)",
    projection_math,
    _projection_fake,
)


ON_REFRESH = ("keep", "reproject", "reset")


def carry_math(moment: Tensor, previous: Tensor, new: Tensor, *, tall: bool, squared: bool, mode: str) -> Tensor:
    """A moment's coordinates after the projection changes from `previous` to `new`.

    reproject: first moments map by C = new^T previous; second moments by C*C elementwise
    (the diagonal of C diag(v) C^T, which keeps them non-negative). reset: zeros.
    """
    if mode == "reset":
        return torch.zeros_like(moment)
    change = new.T @ previous
    if squared:
        change = change * change
    m = moment.to(change.dtype)
    return (m @ change.T if tall else change @ m).to(moment.dtype)


low_rank_carry = define_aux_op(
    "low_rank_carry",
    "(Tensor moment, Tensor previous, Tensor new, *, bool tall, bool squared, str mode) -> Tensor",
    carry_math,
    lambda moment, previous, new, **kwargs: torch.empty_like(moment),
)
