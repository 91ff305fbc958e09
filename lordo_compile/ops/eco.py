"""ECO: weights kept on a quantization grid, the rounding error fed back into the momentum.

ALGORITHMS.md section 5. `quantize` maps a tensor to its grid values (a float tensor whose
every element is `code * scale`), along the last dimension:

    fp8_e4m3  scale = max|x| / 448 per row or per tensor; codes are float8_e4m3fn values
    int8      scale = max|x| / 127 per row or per tensor; codes in [-127, 127] (int8)
    int4      scale = max|x| / 7 per group of `group_size`; codes in [-7, 7], stored + 8 as
              nibbles, two per uint8 along the last dimension

`eco_requantize` gives a tentative weight's grid values, codes and scales (what the runtime
keeps between steps); `eco_decode` turns codes back into the float weight exactly. The
`eco_inject_*` ops feed the rounding error e = W~ - q(W~) into the momentum of the update
that made W~, one op per update rule (ALGORITHMS.md sections 5 and 7).

`rounding="nearest"` rounds half to even; "stochastic" takes the grid point above (toward
+inf) when u < (y - below) / spacing, for u uniform in [0, 1) from a counter hash of (seed,
step, element index): unbiased, and the same run gives the same bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import define_aux_op

FORMATS = ("fp8_e4m3", "int8", "int4")
SCALES = ("per_row", "per_tensor")
ROUNDINGS = ("nearest", "stochastic")
MODES = ("eco", "naive", "master")  # master: the forward reads Q(W), the update is the base one
FP8_MAX = 448.0
_LEVELS = {"int8": 127, "int4": 7}
_TINY = torch.finfo(torch.float32).smallest_normal


def uniform_noise(like: Tensor, step: Tensor, seed: int) -> Tensor:
    """U[0, 1) per element from a 64-bit mix of (seed, step, flat index): no generator state."""
    index = torch.arange(like.numel(), dtype=torch.int64, device=like.device).reshape(like.shape)
    h = index * 0x9E3779B1 + (step.to(torch.int64) + 1) * 0x85EBCA77 + seed * 0xC2B2AE3D
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        h = (h ^ (h >> shift)) * multiplier
        h = h & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return (h & 0xFFFFFF).to(torch.float32) / float(1 << 24)


def _round(y: Tensor, rounding: str, noise: Tensor | None) -> Tensor:
    if rounding == "nearest":
        return torch.round(y)
    lower = torch.floor(y)
    return lower + (noise < y - lower).to(y.dtype)


def _fp8_grid(y: Tensor, rounding: str, noise: Tensor | None) -> Tensor:
    """y (already within +-448) on the e4m3 grid: 3 mantissa bits, smallest spacing 2^-9."""
    if rounding == "nearest":
        return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(y.dtype)
    magnitude = y.abs()
    spacing = torch.exp2(torch.floor(torch.log2(magnitude.clamp_min(2.0**-6))) - 3)
    below = torch.floor(magnitude / spacing) * spacing
    lower = torch.where(y >= 0, below, -below - spacing)
    chosen = torch.where(noise < (y - lower) / spacing, lower + spacing, lower)
    return chosen.clamp(-FP8_MAX, FP8_MAX)


def _levels(x: Tensor, format: str, scale: str, group_size: int, rounding: str, noise: Tensor | None
            ) -> tuple[Tensor, Tensor]:
    """(grid levels as floats, grouped as (..., groups, group) for int4; the scale they multiply)."""
    if format == "int4":
        x = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
        noise = noise.reshape(x.shape) if noise is not None else None
    if format != "int4" and scale == "per_tensor":
        amax = x.abs().amax().reshape([1] * x.dim())
    else:
        amax = x.abs().amax(-1, keepdim=True)
    if format == "fp8_e4m3":
        step = (amax / FP8_MAX).clamp_min(_TINY)
        return _fp8_grid(x / step, rounding, noise), step
    top = _LEVELS[format]
    step = (amax / top).clamp_min(_TINY)
    return torch.clamp(_round(x / step, rounding, noise), -top, top), step


def quantize(x: Tensor, *, format: str, scale: str, group_size: int, rounding: str,
             noise: Tensor | None = None) -> Tensor:
    """x's grid values (see the module doc); `noise` is U[0, 1) shaped like x for stochastic rounding."""
    levels, step = _levels(x, format, scale, group_size, rounding, noise)
    return (levels * step).reshape(x.shape)


def code_dtype(format: str) -> torch.dtype:
    return {"fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8, "int4": torch.uint8}[format]


def code_shape(shape: tuple[int, ...], format: str) -> tuple[int, ...]:
    """int4 codes are packed two per byte along the last dimension."""
    return (*shape[:-1], (shape[-1] + 1) // 2) if format == "int4" else tuple(shape)


def scale_shape(shape: tuple[int, ...], format: str, scale: str, group_size: int) -> tuple[int, ...]:
    if format == "int4":
        return (*shape[:-1], shape[-1] // group_size, 1)
    return (1,) * len(shape) if scale == "per_tensor" else (*shape[:-1], 1)


def _encode(levels: Tensor, shape: tuple[int, ...], format: str) -> Tensor:
    if format == "fp8_e4m3":
        return levels.to(torch.float8_e4m3fn)
    if format == "int8":
        return levels.to(torch.int8)
    nibbles = (levels.reshape(shape) + 8).to(torch.uint8)  # [-7, 7] -> [1, 15]
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def decode_math(codes: Tensor, scales: Tensor, *, format: str, group_size: int) -> Tensor:
    """The float32 weight that codes and scales stand for (exactly the grid values)."""
    if format == "int4":
        nibbles = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(*codes.shape[:-1], codes.shape[-1] * 2)
        levels = nibbles.to(torch.float32) - 8
        grouped = levels.reshape(*levels.shape[:-1], levels.shape[-1] // group_size, group_size)
        return (grouped * scales).reshape(levels.shape)
    return codes.to(torch.float32) * scales


eco_decode = define_aux_op(
    "eco_decode",
    "(Tensor codes, Tensor scales, *, str format, int group_size) -> Tensor",
    decode_math,
    lambda codes, scales, *, format, group_size: torch.empty(
        (*codes.shape[:-1], codes.shape[-1] * 2) if format == "int4" else codes.shape, device=codes.device),
)


def requantize_math(w: Tensor, counter: Tensor, *, format: str, scale: str, group_size: int, rounding: str,
                    seed: int, salt: int) -> tuple[Tensor, Tensor, Tensor]:
    """(grid values, codes, scales) of the tentative weight w; stochastic rounding draws from
    (seed, counter, salt, element)."""
    noise = uniform_noise(w, counter, seed * 1_000_003 + salt) if rounding == "stochastic" else None
    levels, step = _levels(w, format, scale, group_size, rounding, noise)
    return (levels * step).reshape(w.shape), _encode(levels, w.shape, format), step


eco_requantize = define_aux_op(
    "eco_requantize",
    "(Tensor w, Tensor counter, *, str format, str scale, int group_size, str rounding, int seed, int salt)"
    " -> (Tensor, Tensor, Tensor)",
    requantize_math,
    lambda w, counter, *, format, scale, group_size, **kwargs: (
        torch.empty_like(w), torch.empty(code_shape(tuple(w.shape), format), dtype=code_dtype(format), device=w.device),
        torch.empty(scale_shape(tuple(w.shape), format, scale, group_size), dtype=torch.float32, device=w.device)),
)


def inject_sgd_momentum_math(momentum_buffer, error, lr, momentum):
    """Heavy ball: (1/lr)(1 - 1/momentum) e, summed over the later steps, moves W by +e."""
    return momentum_buffer + torch.where(lr > 0, (1 - 1 / momentum) / lr, 0.0) * error


def _adam_denominator(exp_avg_sq, step, beta2, eps):
    count = step.to(torch.float64)
    return exp_avg_sq.sqrt() / (1 - beta2**count).sqrt() + eps, count


def inject_adamw_math(exp_avg, exp_avg_sq, step, error, lr, beta1, beta2, eps):
    """AdamW: ((1 - beta1^t)/lr)(1 - 1/beta1) D e with D = sqrt(v / (1 - beta2^t)) + eps."""
    denom, count = _adam_denominator(exp_avg_sq, step, beta2, eps)
    gain = torch.where(lr > 0, (1 - beta1**count) / lr * (1 - 1 / beta1), 0.0)
    return exp_avg + gain * denom * error


def _project(error: Tensor, projection: Tensor, tall: bool) -> Tensor:
    e = error.to(projection.dtype)
    return e @ projection if tall else projection.T @ e


def inject_projected_adam_math(exp_avg, exp_avg_sq, step, error, projection, lr, beta1, beta2, eps, *, scale: float,
                               tall: bool):
    """GaLore's AdamW (and LoRDO's low-rank term, `scale` = omega): the later steps apply
    lr * scale * P(m / (b1 D)), so the projected error proj(e) goes in as AdamW's, over
    `scale`, with D the projected moments' denominator. What P drops of e is lost."""
    denom, count = _adam_denominator(exp_avg_sq, step, beta2, eps)
    rate = lr * scale
    gain = torch.where(rate > 0, (1 - beta1**count) / rate * (1 - 1 / beta1), 0.0)
    return exp_avg + gain * denom * _project(error, projection, tall).to(exp_avg.dtype)


def inject_projected_sgd_momentum_math(momentum_buffer, error, projection, lr, momentum, *, scale: float, tall: bool):
    """GaLore's SGD with momentum: the heavy-ball injection of proj(e), over `scale`."""
    rate = lr * scale
    gain = torch.where(rate > 0, (1 - 1 / momentum) / rate, 0.0)
    return momentum_buffer + gain * _project(error, projection, tall).to(momentum_buffer.dtype)


def lost_fraction_math(error: Tensor, projection: Tensor, *, tall: bool) -> Tensor:
    """|e - P proj(e)| / |e|: the share of the rounding error a projected momentum cannot hold."""
    e = error.to(projection.dtype)
    kept = (e @ projection) @ projection.T if tall else projection @ (projection.T @ e)
    norm = torch.linalg.vector_norm(e)
    return torch.where(norm > 0, torch.linalg.vector_norm(e - kept) / norm.clamp_min(1e-30), 0.0).to(torch.float32)


def _like_first(first, *args, **kwargs):
    return torch.empty_like(first)


eco_inject_sgd_momentum = define_aux_op(
    "eco_inject_sgd_momentum", "(Tensor momentum_buffer, Tensor error, Tensor lr, Tensor momentum) -> Tensor",
    inject_sgd_momentum_math, _like_first)
eco_inject_adamw = define_aux_op(
    "eco_inject_adamw",
    "(Tensor exp_avg, Tensor exp_avg_sq, Tensor step, Tensor error, Tensor lr, Tensor beta1, Tensor beta2, "
    "Tensor eps) -> Tensor",
    inject_adamw_math, _like_first)
eco_inject_projected_adam = define_aux_op(
    "eco_inject_projected_adam",
    "(Tensor exp_avg, Tensor exp_avg_sq, Tensor step, Tensor error, Tensor projection, Tensor lr, Tensor beta1, "
    "Tensor beta2, Tensor eps, *, float scale, bool tall) -> Tensor",
    inject_projected_adam_math, _like_first)
eco_inject_projected_sgd_momentum = define_aux_op(
    "eco_inject_projected_sgd_momentum",
    "(Tensor momentum_buffer, Tensor error, Tensor projection, Tensor lr, Tensor momentum, *, float scale, "
    "bool tall) -> Tensor",
    inject_projected_sgd_momentum_math, _like_first)
eco_lost_fraction = define_aux_op(
    "eco_lost_fraction", "(Tensor error, Tensor projection, *, bool tall) -> Tensor", lost_fraction_math,
    lambda error, projection, **kwargs: torch.empty((), dtype=torch.float32, device=error.device))


def forward_quantize_math(x: Tensor, *, format: str, scale: str, group_size: int) -> Tensor:
    """The master-weights baseline's forward copy: Q(W) by nearest rounding, identity gradient."""
    q = quantize(x.detach(), format=format, scale=scale, group_size=group_size, rounding="nearest")
    return q + (x - x.detach())


forward_quantize = define_aux_op(
    "eco_forward_quantize",
    "(Tensor x, *, str format, str scale, int group_size) -> Tensor",
    forward_quantize_math,
    lambda x, **kwargs: torch.empty_like(x),
    differentiable=True,
)
