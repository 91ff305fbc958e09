"""Optimizer moments held in 8 or 4 bits: block-wise absmax scales and a quantization map.

ALGORITHMS.md section 8. A moment of n entries (n a multiple of the block size B) is held
as n codes and n / B fp32 scales. Each block of B entries, in the flattened tensor, is
divided by its largest magnitude (at least 1e-12), and each value is stored as the index
of the nearest entry of a sorted map of 2^bits values in [-1, 1] (ties go to the larger
entry); the value read back is map[code] * scale. The map is an input of the ops (the
runtime holds it as state), not a constant they build: a compiled graph cannot make a
tensor from a Python list.

The maps are those of bitsandbytes and torchao (8-bit optimizers, Dettmers et al. 2022):
the dynamic map ("dynamic tree" quantization: a decimal exponent, then a linear fraction
whose resolution grows as the exponent does), signed for moments that take both signs
(Adam's first moment, a momentum buffer) and unsigned for those that do not (Adam's
second moment); at 4 bits the unsigned map is linear, 1/16 to 1 (no zero), as torchao's.
4-bit codes are packed two per byte, the first of each pair in the high half.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .registry import define_aux_op

BITS = (8, 4)
SMALLEST_SCALE = 1e-12


@functools.cache
def dynamic_map(signed: bool, bits: int = 8) -> tuple[float, ...]:
    """The dynamic map of 2^bits values, sorted: for exponents e = 0..E-1 (E = bits - 1), the
    midpoints of 2^e (signed) or 2^(e+1) (unsigned) equal steps of [0.1, 1], times
    10^(e - E + 1), with their negatives when signed; then 0 and 1."""
    exponents = bits - 1
    values: list[float] = []
    for e in range(exponents):
        steps = 2**e if signed else 2 ** (e + 1)
        # float32 arithmetic, as the references build it: the map is part of what is matched.
        edges = torch.linspace(0.1, 1, steps + 1)
        magnitudes = (10 ** (e - exponents + 1) * ((edges[:-1] + edges[1:]) / 2)).tolist()
        values += magnitudes + ([-m for m in magnitudes] if signed else [])
    values += [0.0, 1.0]
    return tuple(sorted(values))


@functools.cache
def quantization_map(signed: bool, bits: int) -> tuple[float, ...]:
    """The map a moment of this sign is held with at `bits`."""
    if bits not in BITS:
        raise ValueError(f"moments are held in {BITS} bits, got {bits}")
    if bits == 4 and not signed:
        return tuple(torch.linspace(0, 1, 17)[1:].tolist())
    return dynamic_map(signed, bits)


def quantize_math(x: Tensor, levels: Tensor, *, bits: int, block_size: int) -> tuple[Tensor, Tensor]:
    """(codes, scales) of `x` (any shape, numel a multiple of `block_size`) on the map `levels`."""
    blocks = x.float().reshape(-1, block_size)
    scales = blocks.abs().amax(-1).clamp_min(SMALLEST_SCALE)
    scaled = (blocks / scales[:, None]).reshape(-1)
    # The last entry <= each value, by a branchless binary search over the map (entry 0 for
    # none): pointwise lookups that Inductor fuses, where bucketize is a library call on CPU.
    below = torch.zeros_like(scaled, dtype=torch.int64)
    half = levels.numel() // 2
    while half:
        below = below + torch.where(scaled >= levels[below + half], half, 0)
        half //= 2
    above = (below + 1).clamp_max(levels.numel() - 1)
    low, high = levels[below], levels[above]
    codes = torch.where(scaled - low >= (high - low) * 0.5, above, below).to(torch.uint8)
    if bits == 4:
        codes = (codes[0::2] << 4) | codes[1::2]
    return codes, scales


def dequantize_math(codes: Tensor, scales: Tensor, levels: Tensor, *, bits: int) -> Tensor:
    """The values `codes` and `scales` hold on the map `levels`, flattened (fp32)."""
    if bits == 4:
        codes = torch.stack([codes >> 4, codes & 0b1111], dim=-1).reshape(-1)
    values = levels[codes.long()]
    return (values.reshape(scales.shape[0], -1) * scales[:, None]).reshape(-1)


def code_count(numel: int, bits: int) -> int:
    """Bytes of codes for `numel` entries."""
    return numel // 2 if bits == 4 else numel


quantize_moment = define_aux_op(
    "quantize_moment",
    "(Tensor x, Tensor levels, *, int bits, int block_size) -> (Tensor, Tensor)",
    quantize_math,
    lambda x, levels, *, bits, block_size: (
        torch.empty(code_count(x.numel(), bits), dtype=torch.uint8, device=x.device),
        torch.empty(x.numel() // block_size, dtype=torch.float32, device=x.device)),
)
dequantize_moment = define_aux_op(
    "dequantize_moment",
    "(Tensor codes, Tensor scales, Tensor levels, *, int bits) -> Tensor",
    dequantize_math,
    lambda codes, scales, levels, *, bits: torch.empty(
        codes.numel() * (2 if bits == 4 else 1), dtype=torch.float32, device=codes.device),
)
