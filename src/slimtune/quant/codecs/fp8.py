"""fp8 e4m3 weights with one fp32 scale per output channel: scale = max|W[r]| / 448, q = W / scale cast to
float8_e4m3fn (round to nearest even), W ~ q * scale."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from slimtune.precision.formats import FORMATS
from slimtune.quant.codecs.base import Codec
from slimtune.quant.codecs.rows import check_2d, row_absmax

FP8_MAX = FORMATS["fp8_e4m3"].max  # 448, the largest finite float8_e4m3fn


def quantize_fp8(w: Tensor, name: str = "weight") -> tuple[Tensor, Tensor]:
    """Per-output-channel scaled float8_e4m3fn: returns q (out, in) fp8 and scale fp32 (out, 1)."""
    check_2d(name, w)
    scale = (row_absmax(w) / FP8_MAX)[:, None]
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = (w.detach().float() * inv).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """W ~ q * scale, computed in fp32 and rounded once to `dtype`."""
    return (q.float() * scale).to(dtype)


class Fp8Codec(Codec):
    """fp8 per channel: buffers `weight` float8_e4m3fn (out, in) and `weight_scale` fp32 (out, 1)."""

    name = "fp8"
    scale_keys = ("weight_scale",)

    def buffers(self, out_f: int, in_f: int, group: int | None, dq: bool, device) -> dict[str, Tensor]:
        return {"weight": torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn, device=device),
                "weight_scale": torch.empty(out_f, 1, dtype=torch.float32, device=device)}

    def quantize(self, w: Tensor, group: int | None, dq: bool, name: str) -> dict[str, Tensor]:
        return dict(zip(("weight", "weight_scale"), quantize_fp8(w, name)))

    def dequantize(self, m: nn.Module, dtype: torch.dtype) -> Tensor:
        return dequantize_fp8(m.weight, m.weight_scale, dtype)

    def nbytes(self, out_f: int, in_f: int, group: int | None = None, dq: bool = False) -> int:
        return out_f * in_f + 4 * out_f
