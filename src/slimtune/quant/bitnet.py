"""BitNet b1.58 training: linear layers that see only ternary weights and 8-bit activations (the quantizers of
`slimtune.quant.codecs.ternary`), keeping latent fp weights and passing gradients straight through both roundings
(STE: y = x + (q(x) - x).detach()); export turns them into packed "ternary" `QuantLinear`s.

API: `BitLinear(in_features, out_features, bias=False)`, `BitLinear.from_linear(linear)`, `BitLinear.to_quant_linear()
-> QuantLinear`, `prepare_bitnet(model, skip=("lm_head",)) -> list[str]`, `export_bitnet(model) -> list[str]`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.errors import ConfigError
from slimtune.quant.codecs.ternary import act_quant_int8, ternary_quant
from slimtune.quant.linear import QuantLinear, convert_layers, linear_names


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
        return QuantLinear.from_linear(self, "ternary")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def prepare_bitnet(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Replace every nn.Linear of `model` (but those whose name or last name part is in `skip`) by a BitLinear
    sharing its weight. Returns the replaced names.

    Raises:
        ConfigError: no linear layer left to replace.
    """
    names = linear_names(model, skip)
    if not names:
        raise ConfigError("bitnet: the model has no linear layers outside the skipped ones " + ", ".join(skip))
    for n in names:
        model.set_submodule(n, BitLinear.from_linear(model.get_submodule(n)))
    return names


def export_bitnet(model: nn.Module) -> list[str]:
    """Replace every BitLinear of `model` by its packed `QuantLinear` ("ternary"), in place. Returns the names."""
    return convert_layers(model, BitLinear)
