"""Integer and fp8 weight-only formats for a linear weight W (out, in): INT8, INT2/3/4 group-wise, FP8 e4m3.

INT8: per output channel, symmetric: SCB[r] = max|W[r]| (bitsandbytes' name), q = round(W * 127 / SCB) in int8,
W ~ q * SCB / 127. INT4: per row and per group of G input columns, asymmetric: scale = (max - min) / 15,
zero = round(-min / scale) in 0..15, q = clamp(round(W / scale) + zero, 0, 15), W ~ (q - zero) * scale; two codes per
byte, column 2j in the high nibble (as NF4); INT2 / INT3 likewise with 2^k - 1 levels, packed most significant code
first (4 codes per byte; 8 codes per 3 bytes). FP8: per output channel, scale = max|W[r]| / 448, q = W / scale cast to
float8_e4m3fn (round to nearest even), W ~ q * scale.

API: `quantize_int8(w, name) -> (q, SCB)`, `dequantize_int8(q, SCB, dtype)`, `quantize_int4(w, group_size, name) ->
(packed, scales, zeros)`, `dequantize_int4(packed, scales, zeros, dtype)`, `quantize_fp8(w, name) -> (q, scale)`,
`dequantize_fp8(q, scale, dtype)`, `quantize_intk(w, bits, group_size, name)` / `dequantize_intk(packed, scales,
zeros, bits, dtype)` (bits 2, 3 or 4), `check_group(name, width, group_size)`, `pack_nibbles(c)`, `unpack_nibbles(p)`,
`pack_bits(c, bits)`, `unpack_bits(p, bits)`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from slimtune.errors import ConfigError

FP8_MAX = 448.0  # largest finite float8_e4m3fn (formats.FORMATS["fp8_e4m3"].max)


def _check_2d(name: str, w: Tensor) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ConfigError(f"tensor {name}: expected a 2-D floating-point linear weight, got {tuple(w.shape)} "
                          f"{w.dtype}")


def check_group(name: str, width: int, group_size: int) -> None:
    """Raise a one-line ConfigError unless `group_size` is even, >= 2 and divides `width` (the input features)."""
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2 or width % group_size:
        divisors = [g for g in (32, 64, 128, 256) if width % g == 0]
        hint = f"choose one of {', '.join(map(str, divisors))}" if divisors else f"choose an even divisor of {width}"
        raise ConfigError(f"layer {name}: group size {group_size} does not divide its width {width} into even "
                          f"groups; {hint}")


def pack_nibbles(c: Tensor) -> Tensor:
    """uint8 codes 0..15, last dim even -> uint8 with half the last dim: element 2j high nibble, 2j+1 low."""
    return (c[..., 0::2] << 4) | c[..., 1::2]


def unpack_nibbles(p: Tensor) -> Tensor:
    """Inverse of `pack_nibbles` (uint8 codes, last dim doubled)."""
    return torch.stack([p >> 4, p & 15], -1).flatten(-2)


def _row_absmax(w: Tensor) -> Tensor:
    return w.detach().abs().amax(1).float()  # (out,)


def quantize_int8(w: Tensor, name: str = "weight") -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8: returns q int8 (out, in) and SCB fp32 (out,) = max|W[r]|.

    Raises:
        ConfigError: `w` is not a 2-D float tensor.
    """
    _check_2d(name, w)
    scb = _row_absmax(w)
    inv = torch.where(scb > 0, 127.0 / scb, torch.zeros_like(scb))
    q = torch.round(w.detach().float() * inv[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scb


def dequantize_int8(q: Tensor, scb: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """W ~ q * SCB / 127, computed in fp32 and rounded once to `dtype`."""
    return (q.float() * (scb / 127.0)[:, None]).to(dtype)


def pack_bits(c: Tensor, bits: int) -> Tensor:
    """uint8 codes < 2^bits along the last dim -> packed uint8, most significant code first.

    Every 8 / gcd(8, bits) codes fill bits / gcd(8, bits) whole bytes (int3: 8 codes -> 3 bytes); for bits 4 this is
    the nibble layout of `pack_nibbles`. The last dim must be a multiple of 8 / gcd(8, bits).
    """
    per = 8 // math.gcd(8, bits)
    nbytes = per * bits // 8
    *lead, n = c.shape
    shifts = torch.arange(per - 1, -1, -1, device=c.device) * bits
    word = (c.reshape(*lead, n // per, per).to(torch.int64) << shifts).sum(-1)  # (..., n / per) words
    bshift = torch.arange(nbytes - 1, -1, -1, device=c.device) * 8
    return ((word[..., None] >> bshift) & 255).to(torch.uint8).reshape(*lead, n // per * nbytes)


def unpack_bits(p: Tensor, bits: int) -> Tensor:
    """Inverse of `pack_bits`: uint8 codes, last dim = packed bytes * 8 / bits."""
    per = 8 // math.gcd(8, bits)
    nbytes = per * bits // 8
    *lead, m = p.shape
    bshift = torch.arange(nbytes - 1, -1, -1, device=p.device) * 8
    word = (p.reshape(*lead, m // nbytes, nbytes).to(torch.int64) << bshift).sum(-1)
    shifts = torch.arange(per - 1, -1, -1, device=p.device) * bits
    return ((word[..., None] >> shifts) & (2 ** bits - 1)).to(torch.uint8).reshape(*lead, m // nbytes * per)


def quantize_intk(w: Tensor, bits: int = 4, group_size: int = 64, name: str = "weight") -> tuple[Tensor, Tensor,
                                                                                                   Tensor]:
    """Group-wise asymmetric k-bit integers (k = 2, 3, 4) with a zero point; L = 2^k - 1 levels above 0.

    scale = (max - min) / L over each group of `group_size` input columns (the range widened to hold 0),
    zero = round(-min / scale), q = clamp(round(W / scale) + zero, 0, L).

    Returns:
        packed uint8 (out, in * k / 8), scales fp32 (out, in // G), zeros uint8 (out, in // G).

    Raises:
        ConfigError: `w` is not 2-D float, `group_size` does not divide the width, or the width does not pack.
    """
    _check_2d(name, w)
    out_f, in_f = w.shape
    check_group(name, in_f, group_size)
    per = 8 // math.gcd(8, bits)
    if in_f % per:
        raise ConfigError(f"layer {name}: width {in_f} is not a multiple of {per}, needed to pack int{bits} codes")
    levels = 2 ** bits - 1
    g = w.detach().float().view(out_f, in_f // group_size, group_size)  # (out, groups, G)
    lo = g.amin(-1).clamp(max=0.0)  # the range always holds 0, so zero is exact
    hi = g.amax(-1).clamp(min=0.0)
    scale = (hi - lo) / levels
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    zero = torch.round(-lo * inv).clamp_(0, levels)
    q = torch.round(g * inv[..., None]).add_(zero[..., None]).clamp_(0, levels).to(torch.uint8).view(out_f, in_f)
    packed = pack_nibbles(q) if bits == 4 else pack_bits(q, bits)
    return packed, scale, zero.to(torch.uint8)


def dequantize_intk(packed: Tensor, scales: Tensor, zeros: Tensor, bits: int = 4,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """W ~ (q - zero) * scale per group (group size = in // scales.shape[1]), rounded once to `dtype`."""
    out_f, groups = scales.shape
    q = unpack_nibbles(packed) if bits == 4 else unpack_bits(packed, bits)
    q = q.view(out_f, groups, -1).float()
    return ((q - zeros.float()[..., None]) * scales[..., None]).view(out_f, -1).to(dtype)


def quantize_int4(w: Tensor, group_size: int = 64, name: str = "weight") -> tuple[Tensor, Tensor, Tensor]:
    """`quantize_intk(w, 4, group_size, name)`: packed uint8 (out, in // 2), scales, zeros."""
    return quantize_intk(w, 4, group_size, name)


def dequantize_int4(packed: Tensor, scales: Tensor, zeros: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """`dequantize_intk(..., bits=4)`."""
    return dequantize_intk(packed, scales, zeros, 4, dtype)


def quantize_fp8(w: Tensor, name: str = "weight") -> tuple[Tensor, Tensor]:
    """Per-output-channel scaled float8_e4m3fn: returns q (out, in) fp8 and scale fp32 (out, 1)."""
    _check_2d(name, w)
    scale = (_row_absmax(w) / FP8_MAX)[:, None]
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = (w.detach().float() * inv).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """W ~ q * scale, computed in fp32 and rounded once to `dtype`."""
    return (q.float() * scale).to(dtype)
