"""BitNet b1.58 linear layers: ternary weights {-1, 0, +1} times one absmean scale, 8-bit absmax activations.

Quantizers from Ma et al. 2024 ("The Era of 1-bit LLMs", and its training-tips FAQ): weight scale
gamma = mean|W| (clamped to 1e-5), W_t = clamp(round(W / gamma), -1, 1), W ~ gamma * W_t; activations per token,
s = 127 / max|x|, x ~ clamp(round(x * s), -128, 127) / s. Training keeps latent fp weights and passes gradients
straight through both roundings (STE: y = x + (q(x) - x).detach()). Export packs 4 ternary values per byte as codes
t + 1 in {0, 1, 2}, element 4j in the two highest bits.

API: `BitLinear(in_features, out_features, bias=False)`, `BitLinear.from_linear(linear)`, `BitLinear.to_quant_linear()
-> QuantLinear` (fmt "ternary"), `prepare_bitnet(model, skip=("lm_head",)) -> list[str]`, `export_bitnet(model) ->
list[str]`, `ternary_quant(w) -> (t int8, gamma)`, `act_quant_int8(x) -> Tensor`, `pack_ternary(t)`,
`unpack_ternary(p)`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.errors import ConfigError


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


class BitLinear(nn.Module):
    """A linear layer trained as BitNet b1.58: y = act_quant(x) @ (gamma * W_t)^T + b, with STE gradients.

    `weight` is the latent fp weight the optimizer updates; the forward only ever sees its ternary image.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BitLinear:
        """A BitLinear starting from `linear`'s weight and bias (shared storage, not copied)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight, m.bias = linear.weight, linear.bias
        return m

    def forward(self, x: Tensor) -> Tensor:
        xq = x + (act_quant_int8(x) - x).detach()
        t, gamma = ternary_quant(self.weight)
        w = self.weight
        wq = w + ((t.float() * gamma).to(w.dtype) - w).detach()
        return F.linear(xq, wq.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_quant_linear(self):
        """The exported layer: a `QuantLinear` of format "ternary" (2-bit packed weight + gamma), same outputs."""
        from slimtune.quant.linear import QuantLinear

        return QuantLinear.from_linear(self, "ternary")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def prepare_bitnet(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Replace every nn.Linear of `model` (but those whose name or last name part is in `skip`) by a BitLinear
    sharing its weight. Returns the replaced names.

    Raises:
        ConfigError: no linear layer left to replace.
    """
    from slimtune.quant.linear import linear_names

    names = linear_names(model, skip)
    if not names:
        raise ConfigError("bitnet: the model has no linear layers outside the skipped ones " + ", ".join(skip))
    for n in names:
        model.set_submodule(n, BitLinear.from_linear(model.get_submodule(n)))
    return names


def export_bitnet(model: nn.Module) -> list[str]:
    """Replace every BitLinear of `model` by its packed `QuantLinear` ("ternary"), in place. Returns the names."""
    from slimtune.quant.linear import convert_layers

    return convert_layers(model, BitLinear)
