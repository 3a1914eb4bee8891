"""Quantization-aware training: fake quantization with a straight-through estimator, then conversion to QuantLinear.

`FakeQuantLinear` wraps an nn.Linear (`base_layer`, trainable) and computes with Q(W), where Q is exactly the
round trip of the real format (quantize then dequantize with the same functions `QuantLinear` uses), so converting
after training changes no output. Gradients pass straight through the rounding (Bengio et al. 2013):
W_q = W + (Q(W) - W).detach(), so dL/dW = dL/dW_q. Optional int8 activations: dynamic per-token absmax, also STE.
A LoRA wrapper can wrap a FakeQuantLinear as its base layer (it has `weight`, `bias`, `in/out_features`).

API: `QATConfig(fmt="int4", group_size=None, act_bits=None)`, `fake_quantize(w, fmt, group_size=None) -> Tensor`,
`FakeQuantLinear(base_layer, cfg)`, `.to_quant_linear() -> QuantLinear`, `prepare_qat(model, cfg,
skip=("lm_head",)) -> list[str]`, `convert_qat(model) -> list[str]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.errors import ConfigError
from slimtune.quant.linear import QuantLinear, convert_layers, linear_names

QAT_FORMATS = ("int8", "int4", "nf4")


@dataclass
class QATConfig:
    """fmt: the weight format trained for; group_size: int4 group / nf4 block (default 64); act_bits: 8 for int8
    activations (with fmt int8 this converts to W8A8), None for weight-only."""

    fmt: str = "int4"
    group_size: int | None = None
    act_bits: int | None = None

    def __post_init__(self) -> None:
        if self.fmt not in QAT_FORMATS:
            raise ConfigError(f"qat: unknown weight format {self.fmt!r}; choose one of {', '.join(QAT_FORMATS)}")
        if self.act_bits not in (None, 8):
            raise ConfigError(f"qat: act_bits {self.act_bits!r} is not supported; use 8 or leave it unset")

    @property
    def target(self) -> str:
        """The QuantLinear format the trained layer converts to."""
        return "w8a8" if self.fmt == "int8" and self.act_bits == 8 else self.fmt


def fake_quantize(w: Tensor, fmt: str, group_size: int | None = None, double_quant: bool = False) -> Tensor:
    """Q(w): the weight `QuantLinear` of `fmt` would compute with, in w's dtype (no gradient)."""
    q = QuantLinear.from_weight(w.detach(), None, fmt, group_size, double_quant, "qat weight")
    return q.dequantize(w.dtype)


def _fake_act_int8(x: Tensor) -> Tensor:
    """Per-token symmetric int8 round trip (-127..127), as the W8A8 layer quantizes its input."""
    xf = x.detach().float()
    s = xf.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127.0
    return (torch.round(xf / s).clamp_(-127, 127) * s).to(x.dtype)


class FakeQuantLinear(nn.Module):
    """y = A(x) @ Q(W)^T + b with straight-through gradients to W and x; W stays a trainable fp parameter."""

    def __init__(self, base_layer: nn.Linear, cfg: QATConfig) -> None:
        super().__init__()
        self.base_layer, self.cfg = base_layer, cfg
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        QuantLinear(self.in_features, self.out_features, cfg.fmt, group_size=cfg.group_size, device="meta",
                    name="qat layer")  # validates the group size against this width now, not mid-training

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def forward(self, x: Tensor) -> Tensor:
        w = self.base_layer.weight
        wq = w + (fake_quantize(w, self.cfg.fmt, self.cfg.group_size) - w).detach()
        if self.cfg.act_bits == 8:
            x = x + (_fake_act_int8(x) - x).detach()
        return F.linear(x, wq.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_quant_linear(self) -> QuantLinear:
        """The real quantized layer (same numbers as this layer's forward; int4 + int8 activations converts to
        weight-only int4, there being no W4A8 layer yet)."""
        return QuantLinear.from_linear(self.base_layer, self.cfg.target, self.cfg.group_size)


def prepare_qat(model: nn.Module, cfg: QATConfig, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Wrap every nn.Linear of `model` (but `skip`) in a FakeQuantLinear, in place. Returns the wrapped names.

    Raises:
        ConfigError: no linear layer to wrap, or a group size that does not divide a layer's width.
    """
    names = linear_names(model, skip)
    if not names:
        raise ConfigError(f"qat: the model has no nn.Linear layers outside the skipped ones ({', '.join(skip)})")
    for n in names:
        lin = model.get_submodule(n)
        QuantLinear(lin.in_features, lin.out_features, cfg.fmt, group_size=cfg.group_size, device="meta", name=n)
        model.set_submodule(n, FakeQuantLinear(lin, cfg))
    return names


def convert_qat(model: nn.Module) -> list[str]:
    """Replace every FakeQuantLinear of `model` by its real QuantLinear, in place. Returns the converted names."""
    return convert_layers(model, FakeQuantLinear)
