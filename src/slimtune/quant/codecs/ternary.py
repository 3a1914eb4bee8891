"""BitNet b1.58 ternary weights {-1, 0, +1} times one absmean scale, and the 8-bit absmax activations they run with.

Quantizers from Ma et al. 2024 ("The Era of 1-bit LLMs", and its training-tips FAQ): gamma = mean|W| (clamped to
1e-5), W_t = clamp(round(W / gamma), -1, 1), W ~ gamma * W_t; activations per token, s = 127 / max|x|,
x ~ clamp(round(x * s), -128, 127) / s. Packed 4 values per byte as codes t + 1 in {0, 1, 2}, element 4j highest.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.errors import ConfigError
from slimtune.quant.codecs.base import Codec


def ternary_quant(w: Tensor) -> tuple[Tensor, Tensor]:
    """Absmean ternary quantization: t int8 in {-1, 0, 1} (same shape) and gamma fp32 (1,) with W ~ gamma * t."""
    gamma = w.detach().float().abs().mean().clamp(min=1e-5).reshape(1)
    t = torch.round(w.detach().float() / gamma).clamp_(-1, 1).to(torch.int8)
    return t, gamma


def act_quant_int8(x: Tensor) -> Tensor:
    """Per-token (last dim) absmax 8-bit fake quantization of activations, returned in x's dtype (no gradient)."""
    xf = x.detach().float()
    s = 127.0 / xf.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    return (torch.round(xf * s).clamp_(-128, 127) / s).to(x.dtype)


def pack_ternary(t: Tensor) -> Tensor:
    """int8 {-1, 0, 1} with last dim divisible by 4 -> uint8 with a quarter of it (code t + 1, element 4j highest)."""
    c = (t + 1).to(torch.uint8)
    return (c[..., 0::4] << 6) | (c[..., 1::4] << 4) | (c[..., 2::4] << 2) | c[..., 3::4]


def unpack_ternary(p: Tensor) -> Tensor:
    """Inverse of `pack_ternary`: int8 {-1, 0, 1}, last dim times 4."""
    c = torch.stack([p >> 6, (p >> 4) & 3, (p >> 2) & 3, p & 3], -1).flatten(-2)
    return c.to(torch.int8) - 1


class TernaryCodec(Codec):
    """The exported BitNet layer: buffers `weight` uint8 (out, in / 4) and `weight_scale` fp32 (1,); the input is
    quantized to 8 bits per token before the matmul, as in training."""

    name = "ternary"
    code_bits = 2
    scale_keys = ("weight_scale",)

    def check(self, in_f: int, group: int | None, name: str) -> int | None:
        super().check(in_f, group, name)
        if in_f % 4:
            raise ConfigError(f"layer {name}: width {in_f} is not a multiple of 4, needed to pack ternary weights")
        return None

    def buffers(self, out_f: int, in_f: int, group: int | None, dq: bool, device) -> dict[str, Tensor]:
        return {"weight": torch.empty(out_f, in_f // 4, dtype=torch.uint8, device=device),
                "weight_scale": torch.empty(1, dtype=torch.float32, device=device)}

    def quantize(self, w: Tensor, group: int | None, dq: bool, name: str) -> dict[str, Tensor]:
        t, gamma = ternary_quant(w)
        return {"weight": pack_ternary(t), "weight_scale": gamma}

    def dequantize(self, m: nn.Module, dtype: torch.dtype) -> Tensor:
        return (unpack_ternary(m.weight).float() * m.weight_scale).to(dtype)

    def nbytes(self, out_f: int, in_f: int, group: int | None = None, dq: bool = False) -> int:
        return out_f * in_f // 4 + 4

    def forward(self, m: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(act_quant_int8(x), self.dequantize(m, x.dtype), bias)
