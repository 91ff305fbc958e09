"""LoRDO's inner update, its refresh of the moments and its compressed sync payloads (ALGORITHMS.md section 3).

Per worker, per inner step (wide case; tall is the transpose), with the global Q:

    G^ = clip(G, rho)                                  norm clipping, optional
    g  = Q^T (G^ + E) ;  E <- G^ + E - Q g             error feedback keeps what Q drops
    u  <- b1 u + (1-b1) g ;  v <- b2 v + (1-b2) g^2    low-rank moments
    W  <- W (1 - lr wd)                                decoupled decay, as AdamW ("before")
    W  <- W - lr [ omega Q (u^ / (sqrt(v^) + eps)) + (1 - omega) F / (mu D) ]
    W  <- W (1 - lr wd)                                or here, after the step ("after")

F, the full-rank term's input, is G^ ("gradient") or the error-fed G^ + E before it is
projected ("error_fed", as the authors' code). D, its normalizer, is an open choice:
"column" broadcasts v's mean over the r directions along the projected side
(Adafactor-like), "rms" is the RMS of G^ (normalized SGD), "full" keeps a full-size
second moment of G^ (a baseline: it costs the memory low rank saves), "scalar" is the mean
over all entries of the low-rank denominator sqrt(v^) + eps, plus eps (the authors' code).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .low_rank import project, project_back
from .registry import define_aux_op, define_op

NORMALIZERS = ("column", "rms", "full", "scalar")
FULL_RANK_INPUTS = ("gradient", "error_fed")
WEIGHT_DECAY_AT = ("before", "after")


def clip_by_norm(grad: Tensor, clip: float) -> Tensor:
    if clip <= 0:
        return grad
    norm = torch.linalg.vector_norm(grad)
    return grad * torch.clamp(clip / (norm + 1e-12), max=1.0)


def _lordo(param, grad, u, v, error, second_moment, step, projection, lr, beta1, beta2, eps, weight_decay,
           *, omega, mu, normalizer, full_rank_input, clip, weight_decay_at, tall, maximize):
    grad = -grad if maximize else grad
    g_hat = clip_by_norm(grad, clip)
    step = step + 1
    if weight_decay_at == "before":
        param = param * (1 - lr * weight_decay)
    x = g_hat + error
    r = project(x, projection, tall).to(u.dtype)
    error = x - project_back(r.to(projection.dtype), projection, tall).to(x.dtype)
    u = u + (1 - beta1) * (r - u)
    v = v * beta2 + (1 - beta2) * r * r
    count = step.to(torch.float64)
    bias_correction1 = 1 - beta1**count
    bias_correction2 = 1 - beta2**count
    denominator = v.sqrt() / bias_correction2.sqrt() + eps
    low = (u / bias_correction1) / denominator
    full_rank = x if full_rank_input == "error_fed" else g_hat
    if normalizer == "column":
        # Mean over the r projected directions, broadcast along the projected side.
        d = (v.mean(dim=1, keepdim=True) if tall else v.mean(dim=0, keepdim=True)) / bias_correction2
        d = d.sqrt() + eps
    elif normalizer == "rms":
        d = g_hat.pow(2).mean().sqrt() + eps
    elif normalizer == "scalar":
        d = denominator.mean() + eps
    else:
        second_moment = second_moment * beta2 + (1 - beta2) * g_hat * g_hat
        d = (second_moment / bias_correction2).sqrt() + eps
    low_rank_term = project_back(low.to(projection.dtype), projection, tall).to(param.dtype)
    update = omega * low_rank_term + (1 - omega) * full_rank / (mu * d)
    param = param + (-lr) * update
    if weight_decay_at == "after":
        param = param * (1 - lr * weight_decay)
    return param, u, v, error, second_moment, step


_ARGS = dict(
    buffers=("projection",),
    hyperparameters=("lr", "beta1", "beta2", "eps", "weight_decay"),
    attributes={"omega": "float", "mu": "float", "normalizer": "str", "full_rank_input": "str", "clip": "float",
                "weight_decay_at": "str", "tall": "bool", "maximize": "bool"},
)


@define_op("lordo_adamw", state=("u", "v", "error", "step"), **_ARGS,
           doc="LoRDO inner step: projected Adam with error feedback plus an omega-mixed full-rank term")
def lordo_adamw(param, grad, u, v, error, step, projection, lr, beta1, beta2, eps, weight_decay, **attributes):
    if attributes["normalizer"] == "full":
        raise ValueError("normalizer 'full' needs the lordo_adamw_full op (a full-size second moment)")
    param, u, v, error, _, step = _lordo(param, grad, u, v, error, None, step, projection, lr, beta1, beta2, eps,
                                         weight_decay, **attributes)
    return param, u, v, error, step


@define_op("lordo_adamw_full", state=("u", "v", "error", "second_moment", "step"), **_ARGS,
           doc="LoRDO inner step whose full-rank term is normalized by a full-size second moment")
def lordo_adamw_full(param, grad, u, v, error, second_moment, step, projection, lr, beta1, beta2, eps,
                     weight_decay, **attributes):
    return _lordo(param, grad, u, v, error, second_moment, step, projection, lr, beta1, beta2, eps,
                  weight_decay, **attributes)


def _rotate(moment: Tensor, change: Tensor, tall: bool) -> Tensor:
    m = moment.to(change.dtype)
    return (m @ change.T if tall else change @ m).to(moment.dtype)


def ldadam_carry_math(u: Tensor, v: Tensor, step: Tensor, previous: Tensor, new: Tensor, beta1: Tensor,
                      beta2: Tensor, *, tall: bool) -> tuple[Tensor, Tensor]:
    """u, v after Q changes from `previous` to `new`, LDAdam-style (ALGORITHMS.md sections 1, 3).

    With C = new^T previous and the bias-corrected m^ = u / b1, v^ = v / b2 (b_i = 1 - beta_i^step):

        u <- C u
        v <- b2 [ (C*C) max(v^ - m^^2, 0) + (C m^)^2 ]

    The second moment is carried as a variance about the mean plus the rotated mean's
    square: rotating v itself by C*C would lose the cross terms of the mean (a direction
    that is the sum of two old ones with a steady gradient gets the square of the sum, not
    the sum of the squares). Clamped variance and C*C >= 0 keep v non-negative.
    """
    change = new.T @ previous
    count = step.to(torch.float64)
    bias_correction1 = 1 - beta1**count
    bias_correction2 = 1 - beta2**count
    mean = u / bias_correction1
    variance = torch.clamp(v / bias_correction2 - mean * mean, min=0)
    rotated_mean = _rotate(mean, change, tall)
    v = (_rotate(variance, change * change, tall) + rotated_mean * rotated_mean) * bias_correction2
    return _rotate(u, change, tall), v


ldadam_carry = define_aux_op(
    "ldadam_carry",
    "(Tensor u, Tensor v, Tensor step, Tensor previous, Tensor new, Tensor beta1, Tensor beta2, *, bool tall)"
    " -> (Tensor, Tensor)",
    ldadam_carry_math,
    lambda u, v, *args, **kwargs: (torch.empty_like(u), torch.empty_like(v)),
)


def int8_rows_math(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes per row (absmax scale) of a 2-D tensor, and the row scales."""
    scale = x.abs().amax(dim=1, keepdim=True).to(torch.float32) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(x.to(torch.float32) / safe), -127, 127).to(torch.int8)
    return codes, scale


int8_rows = define_aux_op(
    "int8_rows",
    "(Tensor x) -> (Tensor, Tensor)",
    int8_rows_math,
    lambda x: (torch.empty_like(x, dtype=torch.int8),
               torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)),
)
