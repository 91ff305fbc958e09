"""EMA-Nesterov's two small ops (ALGORITHMS.md section 6): the scheduled lookahead step
size beta_t, and the EMA of parameter updates d. The lookahead point itself,
theta + beta_t d, is `aten.addcmul` in the graph: the forward reads it, so it must be
differentiable, and aten's is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import define_aux_op


def ema_nesterov_beta_math(step: Tensor, *, beta: float, warmup_steps: int, decay_start: int) -> Tensor:
    """beta_t at 0-based step t: `beta` for warmup_steps <= t < decay_start (decay_start -1:
    no end), else 0 (float32, 0-d)."""
    on = step >= warmup_steps
    if decay_start >= 0:
        on = on & (step < decay_start)
    return torch.where(on, beta, 0.0).to(torch.float32)


ema_nesterov_beta = define_aux_op(
    "ema_nesterov_beta",
    "(Tensor step, *, float beta, int warmup_steps, int decay_start) -> Tensor",
    ema_nesterov_beta_math,
    lambda step, **kwargs: torch.empty((), dtype=torch.float32, device=step.device),
)


def ema_nesterov_direction_math(direction: Tensor, new_param: Tensor, param: Tensor, *, gamma: float) -> Tensor:
    """d <- gamma d + (1 - gamma) (theta+ - theta)."""
    return gamma * direction + (1 - gamma) * (new_param - param)


ema_nesterov_direction = define_aux_op(
    "ema_nesterov_direction",
    "(Tensor direction, Tensor new_param, Tensor param, *, float gamma) -> Tensor",
    ema_nesterov_direction_math,
    lambda direction, *args, **kwargs: torch.empty_like(direction),
)
