"""`QuantLinear`: a frozen linear layer holding only its packed weight and scales, dequantized on the fly.

The format's details (buffers, quantize, dequantize, byte size, state-dict layout, an own matmul) live in its codec
(`slimtune.quant.codecs`); this layer only dispatches to it. The forward runs through an autograd function that
re-dequantizes in the backward instead of saving the 16-bit weight, so gradients reach the input (LoRA on top) while
memory stays at the packed size.

API: `QuantLinear(in_features, out_features, fmt, bias=False, group_size=None, double_quant=False,
compute_dtype=torch.bfloat16, device=None)`, `QuantLinear.from_weight(weight, bias, fmt, group_size=None,
double_quant=False, name="weight")`, `QuantLinear.from_linear(linear, fmt, ...)`, `.dequantize(dtype=None)`,
`.nbytes()`, `quantize_model(model, fmt, group_size=None, double_quant=None, skip=("lm_head",), device=None,
measure_error=False) -> QuantReport`, `prepare_quantized(model, fmt, ...) -> list[str]` (empty layers to load a
quantized checkpoint into), `linear_names(model, skip)`, `convert_layers(model, cls)`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from slimtune.errors import CheckpointError, ConfigError, PrecisionError
from slimtune.precision.guard import outlier_message, scan_weight
from slimtune.quant.codecs import QUANT_FORMATS, get_codec  # noqa: F401  (QUANT_FORMATS: re-exported)
from slimtune.quant.codecs.fourbit import FORMATS_4BIT


class _QuantMatmul(torch.autograd.Function):
    """y = layer(x) without saving the dequantized weight: the backward dequantizes again (weights are frozen).

    dL/dx = dL/dy @ W (activation quantization, where present, is passed straight through); dL/db = sum dL/dy.
    """

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, layer: QuantLinear) -> Tensor:
        ctx.layer = layer
        return layer.codec.forward(layer, x, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, gy: Tensor):
        gx = gy @ ctx.layer.dequantize(gy.dtype) if ctx.needs_input_grad[0] else None
        gb = gy.reshape(-1, gy.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return gx, gb, None


class QuantLinear(nn.Module):
    """A frozen, quantized nn.Linear: buffers hold the packed weight; `forward` dequantizes to the input's dtype."""

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = False,
                 group_size: int | None = None, double_quant: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16, device=None, name: str = "weight") -> None:
        super().__init__()
        self.codec = get_codec(fmt)
        self.group_size = self.codec.check(in_features, group_size, name)
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.double_quant = bool(double_quant) and fmt in FORMATS_4BIT
        self.compute_dtype = compute_dtype  # the dtype the weight came in; LoRA adapters should use this
        for k, v in self.codec.buffers(out_features, in_features, self.group_size, self.double_quant, device).items():
            self.register_buffer(k, v)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    # ---- construction -----------------------------------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None, fmt: str, group_size: int | None = None,
                    double_quant: bool = False, name: str = "weight") -> QuantLinear:
        """Quantize a (out, in) weight (and keep `bias` as is) on the weight's device.

        Raises:
            ConfigError: unknown format, bad group size for this width.
            PrecisionError: the weight holds NaN or inf (names `name`).
        """
        out_f, in_f = weight.shape
        m = cls(in_f, out_f, fmt, bias is not None, group_size, double_quant, weight.dtype, "meta", name)
        bufs = m.codec.quantize(weight.detach(), m.group_size, m.double_quant, name)
        scale = next((bufs[k] for k in m.codec.scale_keys if bufs[k].is_floating_point()), None)
        if scale is not None and not torch.isfinite(scale).all():  # NaN/inf in a row poisons its scale
            where = ""
            if scale.numel() > 1:
                bad = (~torch.isfinite(scale.reshape(scale.shape[0], -1))).any(-1).nonzero()[0, 0]
                where = f" (first in row {int(bad)})"
            raise PrecisionError(f"tensor {name} holds NaN or inf{where}; quantizing it to {fmt} would spread them "
                                 "over their rows; the checkpoint is damaged, re-download or re-save it")
        for k, v in bufs.items():
            setattr(m, k, v)  # assigning to a registered buffer name replaces the buffer
        if bias is not None:
            m.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: str, group_size: int | None = None, double_quant: bool = False,
                    name: str = "weight", device: str | torch.device | None = None) -> QuantLinear:
        """Quantize `linear` (anything with `.weight` (out, in) and `.bias`), optionally moving it to `device` first."""
        w, b = linear.weight, linear.bias
        if device is not None:
            w, b = w.to(device), None if b is None else b.to(device)
        return cls.from_weight(w, b, fmt, group_size, double_quant, name)

    # ---- numerics ---------------------------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out, in) weight this layer computes with, in `dtype` (default: `compute_dtype`)."""
        return self.codec.dequantize(self, dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        return _QuantMatmul.apply(x, self.bias, self)

    def typed(self, name: str) -> Tensor:
        """Buffer `name` in the codec's dtype and shape (under FSDP2, `quant.shard.StoredQuantLinear` views its
        stored bytes back instead)."""
        return getattr(self, name)

    def _apply(self, fn, recurse=True):
        # packed weights and scales keep their dtypes: `.to(torch.bfloat16)` / `.half()` on the model must not round
        # the fp32 scales or re-encode fp8 codes; they still follow device moves, through a byte view
        kept = {}
        for k, b in self._buffers.items():
            if b is not None and b.is_floating_point():
                kept[k] = (b.dtype, b.shape)
                self._buffers[k] = b.reshape(-1).view(torch.uint8)
        try:
            return super()._apply(fn, recurse)
        finally:
            for k, (dt, shape) in kept.items():
                self._buffers[k] = self._buffers[k].view(dt).reshape(shape)

    def nbytes(self) -> int:
        """Bytes held: the packed weight and its scales (and the bias). This is the layer's memory."""
        n = sum(b.numel() * b.element_size() for b in self.buffers())
        return n + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        dq = ", double_quant=True" if self.double_quant else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}{g}{dq}"

    # ---- state dict -------------------------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        own = self.codec.save_state(self, prefix)
        if own is None:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(own)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        assign = local_metadata.get("assign_to_params_buffers", False)
        extra = self.codec.load_state(self, state_dict, prefix, assign)
        if extra is None:
            for k in ("weight",) + self.codec.scale_keys:
                if prefix + k not in state_dict:
                    raise CheckpointError(f"quantized checkpoint lacks {prefix}{k} (format {self.fmt}); re-quantize "
                                          "the model or re-download the checkpoint")
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        if self.bias is not None:
            if prefix + "bias" not in state_dict:
                missing_keys.append(prefix + "bias")
            elif assign or self.bias.is_meta:
                self.bias = nn.Parameter(state_dict[prefix + "bias"], requires_grad=False)
            else:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
        unexpected_keys.extend(extra)


# ---- whole models ---------------------------------------------------------------------------------------------------
def linear_names(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Names of the nn.Linear modules of `model`, minus those equal to or ending in '.' + an entry of `skip`."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and not any(n == s or n.endswith("." + s) for s in skip)]


def convert_layers(model: nn.Module, cls: type) -> list[str]:
    """Replace every `cls` module of `model` by its `.to_quant_linear()`, in place (QAT and BitNet export).
    Returns the replaced names."""
    names = [n for n, m in model.named_modules() if isinstance(m, cls)]
    for n in names:
        model.set_submodule(n, model.get_submodule(n).to_quant_linear())
    return names


def prepare_quantized(model: nn.Module, fmt: str, group_size: int | None = None, double_quant: bool | None = None,
                      skip: tuple[str, ...] = ("lm_head",), device: str | torch.device = "meta") -> list[str]:
    """Replace every nn.Linear of `model` (but `skip`) by an empty QuantLinear on `device`, in place, so that a
    quantized checkpoint loads into it with `model.load_state_dict(sd, assign=True)`. Returns the replaced names.

    Raises:
        ConfigError: unknown format, a group size that does not divide a layer's width.
    """
    dq = fmt in FORMATS_4BIT if double_quant is None else double_quant
    names = linear_names(model, skip)
    for n in names:
        lin = model.get_submodule(n)
        model.set_submodule(n, QuantLinear(lin.in_features, lin.out_features, fmt, lin.bias is not None, group_size,
                                           dq, lin.weight.dtype, device, f"{n}.weight"))
    return names


@dataclass
class QuantReport:
    """What `quantize_model` did: the layers, bytes before/after, outlier reports, optional relative errors."""

    fmt: str
    layers: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    outliers: list[str] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)  # name -> ||W - Q(W)||_F / ||W||_F (measure_error)


def quantize_model(model: nn.Module, fmt: str, group_size: int | None = None, double_quant: bool | None = None,
                   skip: tuple[str, ...] = ("lm_head",), device: str | torch.device | None = None,
                   measure_error: bool = False) -> QuantReport:
    """Replace every nn.Linear of `model` (but `skip`) by a QuantLinear, in place, one layer at a time.

    Each 16-bit weight is dropped as soon as its layer is quantized (with `device`, each weight is moved there
    first, so a CPU model becomes a quantized GPU model without a full 16-bit copy on the GPU). `double_quant`
    defaults to True for nf4/fp4 (QLoRA). Names with extreme outliers are listed in `report.outliers`.

    Raises:
        ConfigError: unknown format, a group size that does not divide a layer's width, no layer to quantize.
        PrecisionError: a weight holds NaN or inf (names the tensor).
    """
    t0 = time.perf_counter()
    names = linear_names(model, skip)
    if not names:
        raise ConfigError(f"quantize: the model has no nn.Linear layers outside the skipped ones ({', '.join(skip)})")
    dq = fmt in FORMATS_4BIT if double_quant is None else double_quant
    rep = QuantReport(fmt)
    for n in names:
        lin = model.get_submodule(n)
        w = lin.weight.detach() if device is None else lin.weight.detach().to(device)
        msg = outlier_message(f"{n}.weight", scan_weight(f"{n}.weight", w, fmt))
        if msg:
            rep.outliers.append(msg)
        bias = lin.bias if device is None or lin.bias is None else lin.bias.to(device)
        q = QuantLinear.from_weight(w, bias, fmt, group_size, dq, f"{n}.weight")
        if measure_error:
            wf = w.float()
            rep.errors[n] = ((q.dequantize(torch.float32) - wf).norm() / wf.norm().clamp(min=1e-30)).item()
        rep.bytes_before += w.numel() * w.element_size() + (0 if bias is None else bias.numel() * bias.element_size())
        rep.bytes_after += q.nbytes()
        model.set_submodule(n, q)
        rep.layers.append(n)
        del lin, w, bias, q  # the 16-bit weight goes with its module
    rep.seconds = time.perf_counter() - t0
    return rep
