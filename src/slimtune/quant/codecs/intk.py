"""Group-wise asymmetric k-bit integer weights (k = 4, 3, 2: `int4`, `int3`, `int2`) with a zero point per group.

Per row and per group of G input columns: scale = (max - min) / L (L = 2^k - 1 levels above 0; the range widened to
hold 0), zero = round(-min / scale) in 0..L, q = clamp(round(W / scale) + zero, 0, L), W ~ (q - zero) * scale. int4
packs two codes per byte, column 2j in the high nibble (as NF4); int2 / int3 pack most significant code first (4 codes
per byte; 8 codes per 3 bytes).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from slimtune.errors import ConfigError
from slimtune.quant.codecs.base import GroupedCodec
from slimtune.quant.codecs.rows import check_2d


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
    check_2d(name, w)
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


class IntKCodec(GroupedCodec):
    """k-bit group-wise: buffers `weight` uint8 (out, in * k / 8), `scales` fp32 and `zeros` uint8 (out, in // G)."""

    scale_keys = ("scales", "zeros")

    def __init__(self, bits: int) -> None:
        self.bits = self.code_bits = bits
        self.name = f"int{bits}"

    def check(self, in_f: int, group: int | None, name: str) -> int | None:
        group = self.default_group if group is None else group
        check_group(name, in_f, group)
        per = 8 // math.gcd(8, self.bits)
        if in_f % per:
            raise ConfigError(f"layer {name}: width {in_f} is not a multiple of {per}, needed to pack {self.name} codes")
        return group

    def buffers(self, out_f: int, in_f: int, group: int | None, dq: bool, device) -> dict[str, Tensor]:
        return {"weight": torch.empty(out_f, in_f * self.bits // 8, dtype=torch.uint8, device=device),
                "scales": torch.empty(out_f, in_f // group, dtype=torch.float32, device=device),
                "zeros": torch.empty(out_f, in_f // group, dtype=torch.uint8, device=device)}

    def quantize(self, w: Tensor, group: int | None, dq: bool, name: str) -> dict[str, Tensor]:
        return dict(zip(("weight", "scales", "zeros"), quantize_intk(w, self.bits, group, name)))

    def dequantize(self, m: nn.Module, dtype: torch.dtype) -> Tensor:
        return dequantize_intk(m.weight, m.scales, m.zeros, self.bits, dtype)

    def nbytes(self, out_f: int, in_f: int, group: int | None = None, dq: bool = False) -> int:
        g = group or self.default_group
        return out_f * in_f * self.bits // 8 + out_f * (in_f // g) * 5  # codes + fp32 scale and uint8 zero per group
