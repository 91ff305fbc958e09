"""Adaptive rotation for quantization-aware training (RoSTE, ALGORITHMS.md section 6).

Each quantized layer quantizes its weight, and its input with activation quantization,
either as is or rotated in blocks by the orthonormal Hadamard matrix H, as a 0-d bool
tensor `rotated` says:

    rotated:      Q_eff(x) = Q(x H) H^T
    not rotated:  Q_eff(x) = Q(x)

H H^T = I, so (x H)(W H)^T = x W^T: before quantization the layer computes the same
product either way, and the choice changes only the quantization error. `choose_rotation`
picks the smaller relative error, weight plus input:

    e(y) = ||Q(y) - y||^2 / ||y||^2,    rotate  iff  e(W H) + e(x H) < e(W) + e(x)

Relative errors weigh the weight's and the input's terms alike whatever their scale and
size (to first order their sum is the relative error of the layer's output).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .quant import grid_values, hadamard_block, quantize, rotate, straight_through
from .registry import define_aux_op


def fake_quantize_rotated_math(x: Tensor, rotated: Tensor, *, bits: int, quantizer: str, group_size: int,
                               ste: str) -> Tensor:
    """Q_eff(x) in the forward, rotated where `rotated` holds; a straight-through gradient."""
    block = hadamard_block(x.shape[-1])
    y = straight_through(torch.where(rotated, rotate(x, block), x), bits=bits, quantizer=quantizer,
                         group_size=group_size, ste=ste)
    return torch.where(rotated, rotate(y, block), y)


fake_quantize_rotated = define_aux_op(
    "fake_quantize_rotated",
    "(Tensor x, Tensor rotated, *, int bits, str quantizer, int group_size, str ste) -> Tensor",
    fake_quantize_rotated_math,
    lambda x, rotated, **kwargs: torch.empty_like(x),
    differentiable=True,
)


def relative_error(y: Tensor, *, bits: int, quantizer: str, group_size: int) -> Tensor:
    """||Q(y) - y||^2 / ||y||^2 (float32, 0-d; 0 for an all-zero y)."""
    levels, scale, _ = quantize(y, bits=bits, quantizer=quantizer, group_size=group_size or None)
    error = (grid_values(levels, scale, quantizer).reshape(y.shape) - y).float().pow(2).sum()
    return error / y.float().pow(2).sum().clamp_min(torch.finfo(torch.float32).smallest_normal)


def choose_rotation_math(weight: Tensor, input: Tensor | None, *, bits: int, input_bits: int, quantizer: str,
                         group_size: int) -> Tensor:
    """True where quantizing in the Hadamard basis has the smaller relative error (0-d bool).

    `input` is the layer's input (None: weights only, and `input_bits` is unused); it is
    quantized per token with `input_bits`, the weight with `bits` and `group_size`.
    """
    block = hadamard_block(weight.shape[-1])
    w = weight.detach()
    plain = relative_error(w, bits=bits, quantizer=quantizer, group_size=group_size)
    rotated = relative_error(rotate(w, block), bits=bits, quantizer=quantizer, group_size=group_size)
    if input is not None:
        x = input.detach()
        plain = plain + relative_error(x, bits=input_bits, quantizer=quantizer, group_size=0)
        rotated = rotated + relative_error(rotate(x, block), bits=input_bits, quantizer=quantizer, group_size=0)
    return rotated < plain


choose_rotation = define_aux_op(
    "choose_rotation",
    "(Tensor weight, Tensor? input, *, int bits, int input_bits, str quantizer, int group_size) -> Tensor",
    choose_rotation_math,
    lambda weight, input, **kwargs: torch.empty((), dtype=torch.bool, device=weight.device),
)
