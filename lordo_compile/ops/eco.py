"""ECO: weights kept on a quantization grid, the rounding error fed back into the momentum.

ALGORITHMS.md section 5. `quantize` maps a tensor to its grid values (a float tensor whose
every element is `code * scale`), along the last dimension:

    fp8_e4m3  scale = max|x| / 448 per row or per tensor; codes are float8_e4m3fn values
    int8      scale = max|x| / 127 per row or per tensor; codes in [-127, 127] (int8)
    int4      scale = max|x| / 7 per group of `group_size`; codes in [-7, 7], stored + 8 as
              nibbles, two per uint8 along the last dimension

The update ops return the new weight's codes and scales (what the runtime keeps between
steps) next to its values; `eco_decode` turns codes back into the float weight exactly.

`rounding="nearest"` rounds half to even; "stochastic" takes the grid point above (toward
+inf) when u < (y - below) / spacing, for u uniform in [0, 1) from a counter hash of (seed,
step, element index): unbiased, and the same run gives the same bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import define_aux_op, define_op

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


def _requantize(w: Tensor, counter: Tensor, salt: int, format, scale, group_size, rounding, seed
                ) -> tuple[Tensor, Tensor, Tensor]:
    """(grid values, codes, scales) of the tentative weight w."""
    noise = uniform_noise(w, counter, seed * 1_000_003 + salt) if rounding == "stochastic" else None
    levels, step = _levels(w, format, scale, group_size, rounding, noise)
    return (levels * step).reshape(w.shape), _encode(levels, w.shape, format), step


_QUANT_ATTRIBUTES = {"format": "str", "scale": "str", "group_size": "int", "rounding": "str", "mode": "str",
                     "seed": "int", "salt": "int"}


@define_op(
    "eco_sgd_momentum",
    state=("momentum_buffer", "codes", "scales"),
    buffers=("counter",),
    hyperparameters=("lr", "momentum", "dampening", "weight_decay"),
    attributes={"maximize": "bool", **_QUANT_ATTRIBUTES},
    doc="SGD with momentum on a quantized weight; the rounding error goes into the buffer (ECO)",
)
def eco_sgd_momentum(param, grad, momentum_buffer, codes, scales, counter, lr, momentum, dampening, weight_decay, *,
                     maximize, format, scale, group_size, rounding, mode, seed, salt):
    grad = -grad if maximize else grad
    grad = grad + weight_decay * param
    buf = momentum_buffer * momentum + (1 - dampening) * grad
    tentative = param + (-lr) * buf
    quantized, codes, scales = _requantize(tentative, counter, salt, format, scale, group_size, rounding, seed)
    if mode == "eco":
        error = tentative - quantized
        # Summed over the later steps, m's geometric decay applies exactly +error to W.
        buf = buf + torch.where(lr > 0, (1 - 1 / momentum) / lr, 0.0) * error
    return quantized, buf, codes, scales


@define_op(
    "eco_adamw",
    state=("exp_avg", "exp_avg_sq", "step", "codes", "scales"),
    buffers=("counter",),
    hyperparameters=("lr", "beta1", "beta2", "eps", "weight_decay"),
    attributes={"maximize": "bool", **_QUANT_ATTRIBUTES},
    doc="AdamW on a quantized weight; the rounding error goes into the first moment (ECO)",
)
def eco_adamw(param, grad, exp_avg, exp_avg_sq, step, codes, scales, counter, lr, beta1, beta2, eps, weight_decay, *,
              maximize, format, scale, group_size, rounding, mode, seed, salt):
    grad = -grad if maximize else grad
    step = step + 1
    param = param * (1 - lr * weight_decay)
    exp_avg = exp_avg + (1 - beta1) * (grad - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    count = step.to(torch.float64)
    bias_correction1 = 1 - beta1**count
    denom = exp_avg_sq.sqrt() / (1 - beta2**count).sqrt() + eps
    tentative = param + (-lr / bias_correction1) * exp_avg / denom
    quantized, codes, scales = _requantize(tentative, counter, salt, format, scale, group_size, rounding, seed)
    if mode == "eco":
        error = tentative - quantized
        gain = torch.where(lr > 0, bias_correction1 / lr * (1 - 1 / beta1), 0.0)
        exp_avg = exp_avg + gain * denom * error
    return quantized, exp_avg, exp_avg_sq, step, codes, scales


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
