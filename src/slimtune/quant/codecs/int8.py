"""Per-output-channel int8 weights (`int8`), and W8A8 (`w8a8`): the same int8 weights with dynamic per-token int8
activations and an integer matmul.

INT8: SCB[r] = max|W[r]| (bitsandbytes' name), q = round(W * 127 / SCB) in int8, W ~ q * SCB / 127.
W8A8: x ~ xq * sx per token (sx = max|x| / 127), so y = (xq @ wq^T) * sx * SCB / 127 (int32 accumulation).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from slimtune.quant.codecs.base import Codec
from slimtune.quant.codecs.rows import check_2d, row_absmax


def quantize_int8(w: Tensor, name: str = "weight") -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8: returns q int8 (out, in) and SCB fp32 (out,) = max|W[r]|.

    Raises:
        ConfigError: `w` is not a 2-D float tensor.
    """
    check_2d(name, w)
    scb = row_absmax(w)
    inv = torch.where(scb > 0, 127.0 / scb, torch.zeros_like(scb))
    q = torch.round(w.detach().float() * inv[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scb


def dequantize_int8(q: Tensor, scb: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """W ~ q * SCB / 127, computed in fp32 and rounded once to `dtype`."""
    return (q.float() * (scb / 127.0)[:, None]).to(dtype)


def int8_matmul(xq: Tensor, wq: Tensor) -> Tensor:
    """int8 (M, K) x int8 (N, K)^T -> int32 (M, N): torch._int_mm where its shape rules allow, else exact in fp64."""
    M, K = xq.shape
    if xq.device.type == "cpu" or (M > 16 and K % 8 == 0 and wq.shape[0] % 8 == 0):
        return torch._int_mm(xq, wq.t())
    return (xq.double() @ wq.double().t()).to(torch.int32)


class Int8Codec(Codec):
    """int8 per channel: buffers `weight` int8 (out, in) and `SCB` fp32 (out,)."""

    name = "int8"
    scale_keys = ("SCB",)

    def buffers(self, out_f: int, in_f: int, group: int | None, dq: bool, device) -> dict[str, Tensor]:
        return {"weight": torch.empty(out_f, in_f, dtype=torch.int8, device=device),
                "SCB": torch.empty(out_f, dtype=torch.float32, device=device)}

    def quantize(self, w: Tensor, group: int | None, dq: bool, name: str) -> dict[str, Tensor]:
        return dict(zip(("weight", "SCB"), quantize_int8(w, name)))

    def dequantize(self, m: nn.Module, dtype: torch.dtype) -> Tensor:
        return dequantize_int8(m.weight, m.SCB, dtype)

    def nbytes(self, out_f: int, in_f: int, group: int | None = None, dq: bool = False) -> int:
        return out_f * in_f + 4 * out_f


class W8A8Codec(Int8Codec):
    """int8 weights and dynamic per-token int8 activations, multiplied in integers."""

    name = "w8a8"

    def forward(self, m: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, m.in_features).float()
        sx = x2.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127.0  # (tokens, 1)
        xq = torch.round(x2 / sx).clamp_(-127, 127).to(torch.int8)
        y = int8_matmul(xq, m.weight).float() * sx * (m.SCB / 127.0)
        y = y.to(x.dtype).view(*x.shape[:-1], m.out_features)
        return y if bias is None else y + bias
