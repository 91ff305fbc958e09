"""Low-rank optimizer updates (GaLore) and the projections they use.

ALGORITHMS.md section 1. The projection side follows the smaller dimension of `W (m x n)`:

    tall (m >= n): P is n x r (right singular vectors), R = G P (m x r),  dW = a N P^T
    wide (m <  n): P is m x r (left singular vectors),  R = P^T G (r x n), dW = a P N

Both come from one `torch.linalg.svd(G)`: P = Vh[:r]^T (tall) or U[:, :r] (wide), the
call and orientation of galore-torch's projector, so the signs of the singular vectors
are galore-torch's too (they matter when the moments are kept across a refresh).

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


# "torch": torch.optim.Adam(W)'s update; "galore_torch": galore-torch's AdamW, which adds eps
# to sqrt(v) before the bias correction and folds that correction into the step size.
NUMERICS = ("torch", "galore_torch")


def _adam_direction(r, exp_avg, exp_avg_sq, step, beta1, beta2, eps, numerics):
    step = step + 1
    exp_avg = exp_avg + (1 - beta1) * (r - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * r * r
    count = step.to(torch.float64)
    bias_correction1 = 1 - beta1**count
    bias_correction2_sqrt = (1 - beta2**count).sqrt()
    if numerics == "galore_torch":
        direction = exp_avg / (exp_avg_sq.sqrt() + eps) * (bias_correction2_sqrt / bias_correction1)
    else:
        direction = (exp_avg / bias_correction1) / (exp_avg_sq.sqrt() / bias_correction2_sqrt + eps)
    return direction, exp_avg, exp_avg_sq, step


def _galore_adam(param, grad, exp_avg, exp_avg_sq, step, projection, lr, beta1, beta2, eps, weight_decay,
                 *, scale, tall, numerics, maximize, decoupled):
    """`decoupled` (AdamW): `grad` comes projected, and the decay follows the step; else (Adam)
    the L2 decay enters the full gradient, which is projected here."""
    grad = -grad if maximize else grad
    if decoupled:
        r = grad.to(exp_avg.dtype)
    else:
        r = project(grad + weight_decay * param, projection, tall).to(exp_avg.dtype)
    direction, exp_avg, exp_avg_sq, step = _adam_direction(r, exp_avg, exp_avg_sq, step, beta1, beta2, eps,
                                                           numerics)
    update = project_back(direction.to(projection.dtype), projection, tall).to(param.dtype)
    param = param + (-lr * scale) * update
    if decoupled:
        # GaLore (ALGORITHMS.md section 1) and galore-torch decay after the projected step.
        param = param * (1 - lr * weight_decay)
    return param, exp_avg, exp_avg_sq, step


_ADAM = dict(
    state=("exp_avg", "exp_avg_sq", "step"),
    buffers=("projection",),
    hyperparameters=("lr", "beta1", "beta2", "eps", "weight_decay"),
    attributes={"scale": "float", "tall": "bool", "numerics": "str", "maximize": "bool"},
)


@define_op("galore_adam", **_ADAM, doc="Adam (L2 decay in the gradient) with projected moments")
def galore_adam(param, grad, exp_avg, exp_avg_sq, step, projection, lr, beta1, beta2, eps, weight_decay,
                *, scale, tall, numerics, maximize):
    return _galore_adam(param, grad, exp_avg, exp_avg_sq, step, projection, lr, beta1, beta2, eps,
                        weight_decay, scale=scale, tall=tall, numerics=numerics, maximize=maximize, decoupled=False)


@define_op("galore_adamw_projected", **_ADAM, projected_gradient=True,
           doc="AdamW whose moments live on the projected gradient it reads (averaged, under low-rank DDP)")
def galore_adamw_projected(param, projected_grad, exp_avg, exp_avg_sq, step, projection, lr, beta1, beta2, eps,
                           weight_decay, *, scale, tall, numerics, maximize):
    return _galore_adam(param, projected_grad, exp_avg, exp_avg_sq, step, projection, lr, beta1, beta2, eps,
                        weight_decay, scale=scale, tall=tall, numerics=numerics, maximize=maximize, decoupled=True)


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


def _leading(g: Tensor, rank: int, tall: bool) -> Tensor:
    """The r leading right (tall) or left (wide) singular vectors of `g`, as columns, with the
    signs LAPACK gives for `g` in this orientation (galore-torch's projector)."""
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    return vh[:rank].T if tall else u[:, :rank]


def _rayleigh_ritz(g: Tensor, basis: Tensor, rank: int, tall: bool) -> Tensor:
    """The leading singular vectors of `g` within span(basis), via a small SVD oriented as `g`."""
    return basis @ _leading(g @ basis if tall else basis.T @ g, rank, tall)


def projection_math(grad: Tensor, previous: Tensor, sketch: Tensor, *, rank: int, tall: bool, method: str,
                    power_iterations: int) -> tuple[Tensor, Tensor]:
    """A new projection from `grad` and whether it was computed (False: `previous` kept).

    `grad` is oriented as the weight (m x n; `tall` when m >= n): the projection spans its
    right singular vectors when tall, its left ones when wide.

    A gradient with a non-finite entry gives no usable subspace, and LAPACK would raise
    on it; it is replaced by zeros for the computation and the previous projection kept.
    """
    g = grad.to(torch.float32)
    finite = torch.isfinite(g).all()
    g = torch.where(finite, g, torch.zeros_like(g))
    a = g.T if tall else g
    if method == "svd":
        new = _leading(g, rank, tall)
    elif method == "randomized":
        basis = _orthonormal(a @ sketch)
        for _ in range(power_iterations):
            basis = _orthonormal(a @ _orthonormal(a.T @ basis))
        new = _rayleigh_ritz(g, basis, rank, tall)
    elif method == "subspace":
        basis = previous
        for _ in range(max(1, power_iterations)):
            basis = _orthonormal(a @ (a.T @ basis))
        new = _rayleigh_ritz(g, basis, rank, tall)
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
