"""The decoder's linear projections that share one input (q, k, v; gate, up; or one alone), computed in one fused
LoRA call where the layers allow it: one (de)quantized stacked base weight, one base matmul, one x @ [A_1; A_2 ...]^T,
the B's written into their columns, and a hand-written backward (`slimtune.kernels.lora`).

Layers are recognised by what they hold, not by class, so that models stay below the method packages: a LoRA wrapper
has `base_layer`, `lora_A`, `lora_B`, `scaling`, `active`; a quantized base has `fmt` and `dequantize`. Anything the
fused path does not cover (DoRA, merged or disabled adapters, different dropouts, a trainable base, activation-
quantized formats, lora_bias, kernels switched off) runs the layers one by one, as before. A layer with a
`group_forward(x, layers)` method (the server's multi-adapter layers, `slimtune.serve.lora`) computes the whole call.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from slimtune import kernels
from slimtune.kernels.lora import Adapter, lora_linear
from slimtune.quant.codecs import CODECS


def _plain_linear(m: nn.Module) -> bool:
    """A frozen nn.Linear, or a quantized linear whose forward is F.linear(x, dequantize(x.dtype), b) (not w8a8 /
    ternary, which quantize activations too)."""
    if hasattr(m, "base_layer"):
        return False
    if isinstance(m, nn.Linear):
        return not m.weight.requires_grad  # a trainable weight keeps autograd's own linear
    return hasattr(m, "dequantize") and getattr(m, "fmt", None) not in ("w8a8", "ternary")


def _fusable(m: nn.Module) -> bool:
    """A plain linear, or a LoRA wrapper over one with only unmerged, non-DoRA, bias-free adapters."""
    if not hasattr(m, "lora_A"):
        return _plain_linear(m)
    return (_plain_linear(m.base_layer) and not m.disabled and not m.merged
            and not any(n in m.lora_magnitude_vector or m.lora_B[n].bias is not None
                        for n in m.active if n in m.lora_A))


def stacked_weight(layers: Sequence[nn.Module]) -> Callable[[torch.dtype], Tensor]:
    """A callable dtype -> (sum out_features, in_features): the layers' weights stacked by rows in one new buffer,
    each dequantized straight into its slice (4-bit layers of one format: one launch for up to three)."""
    outs = [m.out_features for m in layers]
    fmts = {getattr(m, "fmt", None) for m in layers}
    codec = CODECS[fmts.pop()] if len(fmts) == 1 and None not in fmts else None
    grouped = codec is not None and hasattr(codec, "dequantize_group_into")

    def load(dtype: torch.dtype) -> Tensor:
        dev = next(iter(layers[0].buffers()), None)
        dev = dev.device if dev is not None else layers[0].weight.device
        buf = torch.empty(sum(outs), layers[0].in_features, dtype=dtype, device=dev)
        if grouped:  # q,k,v or gate,up in one launch
            return codec.dequantize_group_into(buf.view(-1), list(layers)).view(buf.shape)
        o = 0
        for m, w in zip(layers, outs):
            buf[o:o + w].copy_(m.dequantize(dtype) if hasattr(m, "dequantize") else m.weight)
            o += w
        return buf

    return load


def project(x: Tensor, layers: Sequence[nn.Module], base_last: bool = False) -> list[Tensor]:
    """The outputs of `layers` (LoRA-wrapped or plain linears sharing the input x), fused where possible;
    `base_last`: the fused path computes the frozen base product after the adapters (`kernels.lora`).

    Returns:
        one (..., out_features) tensor per layer.
    """
    lead = next((m for m in layers if hasattr(m, "group_forward")), None)
    if lead is not None:  # served multi-adapter layers: one LoRA matmul for the group (they call back for the bases)
        return lead.group_forward(x, layers)
    if not (kernels.fused(x.device) and all(_fusable(m) for m in layers)):
        return [m(x) for m in layers]
    bases = [getattr(m, "base_layer", m) for m in layers]
    adapters: list[Adapter] = []
    drops: set[float] = set()
    for p, m in enumerate(layers):
        for n in getattr(m, "active", []):
            if n in m.lora_A:
                adapters.append((m.lora_A[n].weight, m.lora_B[n].weight, m.scaling[n], p))
                drops.add(getattr(m.lora_dropout[n], "p", 0.0))
    if len(drops) > 1:
        return [m(x) for m in layers]
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.dtype != torch.get_autocast_dtype(dev):
        x = x.to(torch.get_autocast_dtype(dev))  # what autocast does to a linear's input
    dense = not any(hasattr(b, "dequantize") for b in bases)  # nn.Linear bases: their weights as they are
    weight = [b.weight for b in bases] if dense else stacked_weight(bases)
    biases = [getattr(b, "bias", None) for b in bases]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else x.new_zeros(m.out_features) for b, m in zip(biases, bases)])
    parts = [m.out_features for m in bases]
    training = any(m.training for m in layers)
    y = lora_linear(x, weight, bias, adapters, parts, drops.pop() if drops else 0.0, training, base_last and training)
    return list(y.split(parts, -1))
