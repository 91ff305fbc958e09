"""Quantizers for quantization-aware training (CAGE, plain STE) and their export form.

ALGORITHMS.md section 4. Every quantizer works along the last dimension (a weight's
input dimension, an activation's features), so "per row" means per output channel for a
weight and per token for an activation:

    rms_gaussian  per row, symmetric b-bit, no zero level:
                  step = 2 c_b RMS(row) / (2^b - 1),  k = clamp(round(x/step + 1/2), 1 - 2^(b-1), 2^(b-1)),
                  Q(x) = (k - 1/2) step; codes k + 2^(b-1) - 1 in [0, 2^b - 1] (uint8)
    absmax        per group of `group_size` (None: the whole row), symmetric int-b, torchao's convention:
                  scale = max|x| / ((2^b - 1)/2) (at least the float32 smallest normal),
                  k = clamp(round(x * (1/scale)), -2^(b-1), 2^(b-1) - 1),  Q(x) = k scale; codes k (int8)

With `hadamard`, each row is rotated in blocks of 128 (or the whole row when shorter,
a power of two) by the orthonormal Sylvester-Hadamard matrix H before quantizing, and
rotated back after: the effective weight is Q(W H) H^T, so `x W^T = (x H)(W H)^T` holds
for the quantized pair when activations are rotated the same way.

The straight-through estimator passes the gradient through Q as the identity, or, with
`ste="masked"`, only where the value lies inside the quantizer's clipping range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .low_rank import project
from .registry import define_aux_op

QUANTIZERS = ("rms_gaussian", "absmax")
BITS = (2, 3, 4, 8)
STE = ("identity", "masked")
HADAMARD_BLOCK = 128
# c_b minimises E[(x - Q(x))^2] for x ~ N(0, 1) on the uniform grid without a zero level.
GAUSSIAN_CLIP = {2: 1.4935, 3: 2.0511, 4: 2.5139, 8: 3.9222}


def hadamard_block(features: int) -> int:
    """The rotation block for rows of `features` values; raises when there is none."""
    block = min(HADAMARD_BLOCK, features)
    if block & (block - 1) or features % block:
        raise ValueError(
            f"a Hadamard rotation needs rows whose length is a multiple of {HADAMARD_BLOCK} or a power of two "
            f"below it; got {features}. Set hadamard=False or exclude this tensor with params=..."
        )
    return block


def hadamard_matrix(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order `size` (a power of two); symmetric."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / size**0.5


def rotate(x: Tensor, block: int) -> Tensor:
    """x with every run of `block` values along the last dimension multiplied by H (= H^T)."""
    h = hadamard_matrix(block, x.dtype, x.device)
    return (x.reshape(*x.shape[:-1], x.shape[-1] // block, block) @ h).reshape(x.shape)


def _groups(x: Tensor, group_size: int | None) -> Tensor:
    size = x.shape[-1] if group_size is None else group_size
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def quantize(x: Tensor, *, bits: int, quantizer: str, group_size: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """(integer levels k as floats, the scale they multiply, inside-the-clip-range mask), grouped.

    The levels and mask have shape (..., groups, group), the scale (..., groups, 1).
    """
    g = _groups(x, group_size if quantizer == "absmax" else None)
    if quantizer == "rms_gaussian":
        rms = g.pow(2).mean(-1, keepdim=True).sqrt()
        clip = GAUSSIAN_CLIP[bits] * rms
        step = (2 * clip / (2**bits - 1)).clamp_min(torch.finfo(torch.float32).smallest_normal)
        levels = torch.clamp(torch.round(g / step + 0.5), 1 - 2 ** (bits - 1), 2 ** (bits - 1))
        return levels, step, g.abs() <= clip
    amax = g.abs().amax(-1, keepdim=True)
    scale = (amax / ((2**bits - 1) / 2)).clamp_min(torch.finfo(torch.float32).smallest_normal)
    levels = torch.clamp(torch.round(g * (1.0 / scale)), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return levels, scale, torch.ones_like(g, dtype=torch.bool)


def grid_values(levels: Tensor, scale: Tensor, quantizer: str) -> Tensor:
    """The real values of quantized levels (grouped shapes, as `quantize` returns them)."""
    return (levels - 0.5) * scale if quantizer == "rms_gaussian" else levels * scale


def fake_quantize_math(x: Tensor, *, bits: int, quantizer: str, group_size: int, hadamard: bool,
                       ste: str) -> Tensor:
    """Q(x) in the forward, a straight-through gradient in the backward (see the module doc).

    `group_size` 0 means the whole row (schemas have no optional ints).
    """
    block = hadamard_block(x.shape[-1]) if hadamard else 0
    y = straight_through(rotate(x, block) if block else x, bits=bits, quantizer=quantizer, group_size=group_size,
                         ste=ste)
    return rotate(y, block) if block else y


def straight_through(y: Tensor, *, bits: int, quantizer: str, group_size: int, ste: str) -> Tensor:
    """Q(y) in the forward; the gradient passes as the identity, or masked to the clipping range."""
    levels, scale, inside = quantize(y.detach(), bits=bits, quantizer=quantizer, group_size=group_size or None)
    values = grid_values(levels, scale, quantizer).reshape(y.shape)
    through = y - y.detach()
    if ste == "masked":
        through = through * inside.reshape(y.shape)
    return values + through


def _fake_quantize_fake(x: Tensor, **kwargs) -> Tensor:
    return torch.empty_like(x)


fake_quantize = define_aux_op(
    "fake_quantize",
    "(Tensor x, *, int bits, str quantizer, int group_size, bool hadamard, str ste) -> Tensor",
    fake_quantize_math,
    _fake_quantize_fake,
    differentiable=True,
)


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight as integer codes and scales, and the exact values a forward computes from them.

    `codes` has the weight's shape (uint8 for rms_gaussian, offset by 2^(b-1) - 1; int8 for
    absmax); `scales` one value per row or group, shaped (rows..., groups, 1). `dequantize()`
    returns the effective weight, rotated back when `hadamard`.
    """

    codes: Tensor
    scales: Tensor
    bits: int
    quantizer: str
    group_size: int | None
    hadamard: bool

    def dequantize(self) -> Tensor:
        levels = self.codes.to(self.scales.dtype)
        if self.quantizer == "rms_gaussian":
            levels = levels - (2 ** (self.bits - 1) - 1)
        grouped = _groups(levels, self.group_size if self.quantizer == "absmax" else None)
        y = grid_values(grouped, self.scales, self.quantizer).reshape(self.codes.shape)
        return rotate(y, hadamard_block(y.shape[-1])) if self.hadamard else y


@dataclass(frozen=True)
class QuantizedModel:
    """What `CompiledStep.export_quantized()` returns: a `QuantizedTensor` per weight name."""

    tensors: dict[str, QuantizedTensor]

    def __getitem__(self, name: str) -> QuantizedTensor:
        return self.tensors[name]

    def dequantize(self) -> dict[str, Tensor]:
        """Each weight's effective value; `model.load_state_dict(..., strict=False)` takes it."""
        return {name: q.dequantize() for name, q in self.tensors.items()}

    @property
    def nbytes(self) -> int:
        """Bytes of codes (one byte per code, unpacked) and scales."""
        return sum(q.codes.numel() * q.codes.element_size() + q.scales.numel() * q.scales.element_size()
                   for q in self.tensors.values())


def export(x: Tensor, *, bits: int, quantizer: str, group_size: int | None, hadamard: bool) -> QuantizedTensor:
    """`x` quantized as the fake-quant node in the forward quantizes it."""
    with torch.no_grad():
        y = rotate(x, hadamard_block(x.shape[-1])) if hadamard else x
        levels, scale, _ = quantize(y, bits=bits, quantizer=quantizer, group_size=group_size)
        if quantizer == "rms_gaussian":
            codes = (levels + (2 ** (bits - 1) - 1)).to(torch.uint8)
        else:
            codes = levels.to(torch.int8)
    return QuantizedTensor(codes.reshape(x.shape), scale, bits, quantizer, group_size, hadamard)


def cage_lambda_math(step: Tensor, *, lam: float, silence_steps: int, ramp_steps: int, constant: bool) -> Tensor:
    """lambda_t at 0-based step t: 0 before `silence_steps`, then `lam`, or a linear ramp
    reaching it after `ramp_steps` steps (float64, 0-d)."""
    t = step.to(torch.float64)
    if constant:
        return torch.where(t >= silence_steps, lam, 0.0).to(torch.float64)
    return lam * torch.clamp((t - silence_steps + 1) / ramp_steps, 0.0, 1.0)


cage_lambda = define_aux_op(
    "cage_lambda",
    "(Tensor step, *, float lam, int silence_steps, int ramp_steps, bool constant) -> Tensor",
    cage_lambda_math,
    lambda step, **kwargs: torch.empty((), dtype=torch.float64, device=step.device),
)


def cage_coupled_math(grad: Tensor, weight: Tensor, quantized: Tensor, lam: Tensor) -> Tensor:
    """The gradient the base optimizer sees: g + lambda_t (W - Q(W))."""
    return grad + (lam * (weight - quantized)).to(grad.dtype)


cage_coupled = define_aux_op(
    "cage_coupled",
    "(Tensor grad, Tensor weight, Tensor quantized, Tensor lam) -> Tensor",
    cage_coupled_math,
    lambda grad, *args: torch.empty_like(grad),
)


def cage_coupled_projected_math(grad: Tensor, weight: Tensor, quantized: Tensor, lam: Tensor, projection: Tensor, *,
                                tall: bool) -> Tensor:
    """The same for an update that reads its gradient projected (low-rank DDP): the correction
    projected as the gradient was, g_r + proj(lambda_t (W - Q(W)))."""
    return grad + project(lam * (weight - quantized), projection, tall).to(grad.dtype)


cage_coupled_projected = define_aux_op(
    "cage_coupled_projected",
    "(Tensor grad, Tensor weight, Tensor quantized, Tensor lam, Tensor projection, *, bool tall) -> Tensor",
    cage_coupled_projected_math,
    lambda grad, *args, **kwargs: torch.empty_like(grad),
)


def cage_decoupled_math(param: Tensor, weight: Tensor, quantized: Tensor, lam: Tensor, lr: Tensor) -> Tensor:
    """The base optimizer's new weight, minus lr lambda_t (W - Q(W)) of the weight before it."""
    return param - (lr * lam * (weight - quantized)).to(param.dtype)


cage_decoupled = define_aux_op(
    "cage_decoupled",
    "(Tensor param, Tensor weight, Tensor quantized, Tensor lam, Tensor lr) -> Tensor",
    cage_decoupled_math,
    lambda param, *args: torch.empty_like(param),
)
