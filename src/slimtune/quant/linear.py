"""`QuantLinear`: a frozen linear layer holding only its packed weight and scales, dequantized on the fly.

Formats: nf4 / fp4 (block-wise, optional double quantization; state dict = bitsandbytes `Linear4bit` keys), int8
(per channel; `weight` int8 + `SCB`), int4 / int3 / int2 (group-wise; `weight` uint8 (out, in * k / 8) + `scales` +
`zeros`), fp8 (e4m3 per channel; `weight` + `weight_scale` (out, 1)), w8a8 (int8 weights and dynamic per-token int8
activations, integer matmul) and ternary (BitNet b1.58 export; `weight` uint8 (out, in/4) + `weight_scale`). The
forward runs
through an autograd function that re-dequantizes in the backward instead of saving the 16-bit weight, so gradients
reach the input (LoRA on top) while memory stays at the packed size.

API: `QuantLinear(in_features, out_features, fmt, bias=False, group_size=None, double_quant=False,
compute_dtype=torch.bfloat16, device=None)`, `QuantLinear.from_weight(weight, bias, fmt, group_size=None,
double_quant=False, name="weight")`, `QuantLinear.from_linear(linear, fmt, ...)`, `.dequantize(dtype=None)`,
`.nbytes()`, `quantize_model(model, fmt, group_size=None, double_quant=None, skip=("lm_head",), device=None,
measure_error=False) -> QuantReport`, `prepare_quantized(model, fmt, group_size=None, double_quant=None,
skip=("lm_head",), device="meta") -> list[str]` (empty layers to load a quantized checkpoint into),
`linear_names(model, skip)`, `QUANT_FORMATS`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.errors import CheckpointError, ConfigError, PrecisionError
from slimtune.quant.bitnet import act_quant_int8, pack_ternary, ternary_quant, unpack_ternary
from slimtune.quant.blockwise import (
    FORMATS_4BIT,
    Quant4bit,
    check_block,
    dequantize_4bit,
    from_bnb_state_dict,
    quantize_4bit,
    to_bnb_state_dict,
)
from slimtune.quant.guard import outlier_message, scan_weight
from slimtune.quant.intq import (
    check_group,
    dequantize_fp8,
    dequantize_int8,
    dequantize_intk,
    quantize_fp8,
    quantize_int8,
    quantize_intk,
)

QUANT_FORMATS = ("nf4", "fp4", "int8", "int4", "int3", "int2", "fp8", "w8a8", "ternary")
INT_BITS = {"int4": 4, "int3": 3, "int2": 2}  # group-wise asymmetric formats
DEFAULT_GROUP = {"nf4": 64, "fp4": 64, "int4": 64, "int3": 64, "int2": 64}
_SCALE_KEYS = {"int8": ("SCB",), "w8a8": ("SCB",), "fp8": ("weight_scale",), "ternary": ("weight_scale",),
               **{f: ("scales", "zeros") for f in INT_BITS}}


def _buffers(fmt: str, out_f: int, in_f: int, group: int | None, dq: bool, device) -> dict[str, Tensor]:
    """Empty buffers of the right shapes and dtypes (works on the meta device, for loading with assign=True)."""
    u8, f32, kw = torch.uint8, torch.float32, {"device": device}
    if fmt in FORMATS_4BIT:
        nb = -(-out_f * in_f // group)
        b = {"weight": torch.empty(((out_f * in_f + 1) // 2, 1), dtype=u8, **kw),
             "absmax": torch.empty(nb, dtype=u8 if dq else f32, **kw)}
        if dq:
            b["nested_absmax"] = torch.empty(-(-nb // 256), dtype=f32, **kw)
            b["nested_offset"] = torch.empty((), dtype=f32, **kw)
        return b
    if fmt in ("int8", "w8a8"):
        return {"weight": torch.empty(out_f, in_f, dtype=torch.int8, **kw), "SCB": torch.empty(out_f, dtype=f32, **kw)}
    if fmt in INT_BITS:
        return {"weight": torch.empty(out_f, in_f * INT_BITS[fmt] // 8, dtype=u8, **kw),
                "scales": torch.empty(out_f, in_f // group, dtype=f32, **kw),
                "zeros": torch.empty(out_f, in_f // group, dtype=u8, **kw)}
    if fmt == "fp8":
        return {"weight": torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn, **kw),
                "weight_scale": torch.empty(out_f, 1, dtype=f32, **kw)}
    return {"weight": torch.empty(out_f, in_f // 4, dtype=u8, **kw), "weight_scale": torch.empty(1, dtype=f32, **kw)}


def _check_args(fmt: str, in_f: int, group: int | None, name: str) -> int | None:
    """Validate the format and group size for a layer of width `in_f`; returns the group size to use."""
    if fmt not in QUANT_FORMATS:
        raise ConfigError(f"unknown quantization format {fmt!r}; choose one of {', '.join(QUANT_FORMATS)}")
    if fmt not in DEFAULT_GROUP:
        if group is not None:
            raise ConfigError(f"format {fmt} is per-channel (no groups); drop the group size {group}")
        if fmt == "ternary" and in_f % 4:
            raise ConfigError(f"layer {name}: width {in_f} is not a multiple of 4, needed to pack ternary weights")
        return None
    group = DEFAULT_GROUP[fmt] if group is None else group
    if fmt in INT_BITS:
        check_group(name, in_f, group)
        per = 8 // math.gcd(8, INT_BITS[fmt])
        if in_f % per:
            raise ConfigError(f"layer {name}: width {in_f} is not a multiple of {per}, needed to pack {fmt} codes")
    else:
        check_block(group, f"layer {name}: block size")
    return group


class _QuantMatmul(torch.autograd.Function):
    """y = layer(x) without saving the dequantized weight: the backward dequantizes again (weights are frozen).

    dL/dx = dL/dy @ W (activation quantization, where present, is passed straight through); dL/db = sum dL/dy.
    """

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, layer: QuantLinear) -> Tensor:
        ctx.layer = layer
        return layer._forward_impl(x, bias)

    @staticmethod
    def backward(ctx, gy: Tensor):
        gx = gy @ ctx.layer.dequantize(gy.dtype) if ctx.needs_input_grad[0] else None
        gb = gy.reshape(-1, gy.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return gx, gb, None


def _int8_matmul(xq: Tensor, wq: Tensor) -> Tensor:
    """int8 (M, K) x int8 (N, K)^T -> int32 (M, N): torch._int_mm where its shape rules allow, else exact in fp64."""
    M, K = xq.shape
    if xq.device.type == "cpu" or (M > 16 and K % 8 == 0 and wq.shape[0] % 8 == 0):
        return torch._int_mm(xq, wq.t())
    return (xq.double() @ wq.double().t()).to(torch.int32)


class QuantLinear(nn.Module):
    """A frozen, quantized nn.Linear: buffers hold the packed weight; `forward` dequantizes to the input's dtype."""

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = False,
                 group_size: int | None = None, double_quant: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16, device=None, name: str = "weight") -> None:
        super().__init__()
        self.group_size = _check_args(fmt, in_features, group_size, name)
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.double_quant = bool(double_quant) and fmt in FORMATS_4BIT
        self.compute_dtype = compute_dtype  # the dtype the weight came in; LoRA adapters should use this
        for k, v in _buffers(fmt, out_features, in_features, self.group_size, self.double_quant, device).items():
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
        w = weight.detach()
        if fmt in FORMATS_4BIT:
            q = quantize_4bit(w, fmt, m.group_size, m.double_quant, name)
            bufs = {"weight": q.packed, "absmax": q.absmax}
            if q.nested:
                bufs.update(nested_absmax=q.nested_absmax, nested_offset=q.nested_offset)
        elif fmt in ("int8", "w8a8"):
            bufs = dict(zip(("weight", "SCB"), quantize_int8(w, name)))
        elif fmt in INT_BITS:
            bufs = dict(zip(("weight", "scales", "zeros"), quantize_intk(w, INT_BITS[fmt], m.group_size, name)))
        elif fmt == "fp8":
            bufs = dict(zip(("weight", "weight_scale"), quantize_fp8(w, name)))
        else:
            t, gamma = ternary_quant(w)
            bufs = {"weight": pack_ternary(t), "weight_scale": gamma}
        scale = bufs.get("SCB", bufs.get("scales", bufs.get("weight_scale")))
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
    def _q4(self) -> Quant4bit:
        nested = self.double_quant
        return Quant4bit(self.weight, self.absmax, torch.Size((self.out_features, self.in_features)),
                         self.compute_dtype, self.fmt, self.group_size,
                         self.nested_absmax if nested else None, self.nested_offset if nested else None,
                         code=getattr(self, "_code", None), nested_code=getattr(self, "_nested_code", None))

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out, in) weight this layer computes with, in `dtype` (default: `compute_dtype`)."""
        dtype = dtype or self.compute_dtype
        if self.fmt in FORMATS_4BIT:
            return dequantize_4bit(self._q4(), dtype)
        if self.fmt in ("int8", "w8a8"):
            return dequantize_int8(self.weight, self.SCB, dtype)
        if self.fmt in INT_BITS:
            return dequantize_intk(self.weight, self.scales, self.zeros, INT_BITS[self.fmt], dtype)
        if self.fmt == "fp8":
            return dequantize_fp8(self.weight, self.weight_scale, dtype)
        return (unpack_ternary(self.weight).float() * self.weight_scale).to(dtype)

    def _forward_impl(self, x: Tensor, bias: Tensor | None) -> Tensor:
        b = None if bias is None else bias.to(x.dtype)
        if self.fmt == "w8a8":
            # dynamic per-token int8: x ~ xq * sx, W ~ wq * SCB / 127, so y = (xq @ wq^T) * sx * SCB / 127
            x2 = x.reshape(-1, self.in_features).float()
            sx = x2.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127.0
            xq = torch.round(x2 / sx).clamp_(-127, 127).to(torch.int8)
            y = _int8_matmul(xq, self.weight).float() * sx * (self.SCB / 127.0)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
            return y if b is None else y + b
        if self.fmt == "ternary":
            x = act_quant_int8(x)
        return F.linear(x, self.dequantize(x.dtype), b)

    def forward(self, x: Tensor) -> Tensor:
        return _QuantMatmul.apply(x, self.bias, self)

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
        if self.fmt not in FORMATS_4BIT:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(to_bnb_state_dict(self._q4(), prefix))
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self.fmt not in FORMATS_4BIT:
            for k in ("weight",) + _SCALE_KEYS[self.fmt]:
                if prefix + k not in state_dict:
                    raise CheckpointError(f"quantized checkpoint lacks {prefix}{k} (format {self.fmt}); re-quantize "
                                          "the model or re-download the checkpoint")
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        own = {k: v for k, v in state_dict.items() if k.startswith(prefix) and "." not in k[len(prefix):]
               or k.startswith(prefix + "weight.")}
        q = from_bnb_state_dict(own, prefix)
        if (q.fmt, q.block_size, q.nested, tuple(q.shape)) != (self.fmt, self.group_size, self.double_quant,
                                                               (self.out_features, self.in_features)):
            raise CheckpointError(f"{prefix}weight: checkpoint holds {q.fmt} block {q.block_size} nested={q.nested} "
                                  f"shape {tuple(q.shape)}, the model expects {self.fmt} block {self.group_size} "
                                  f"nested={self.double_quant} shape {(self.out_features, self.in_features)}")
        bufs = {"weight": q.packed, "absmax": q.absmax}
        if q.nested:
            bufs.update(nested_absmax=q.nested_absmax, nested_offset=q.nested_offset.float())
        assign = local_metadata.get("assign_to_params_buffers", False)
        for k, v in bufs.items():
            cur = getattr(self, k)
            if assign or cur.is_meta:
                setattr(self, k, v)
            elif cur.shape != v.shape:
                raise CheckpointError(f"{prefix}{k}: checkpoint shape {tuple(v.shape)}, model {tuple(cur.shape)}")
            else:
                cur.copy_(v)
        self._code, self._nested_code = q.code, q.nested_code
        self.compute_dtype = q.dtype
        if self.bias is not None:
            if prefix + "bias" not in state_dict:
                missing_keys.append(prefix + "bias")
            elif assign or self.bias.is_meta:
                self.bias = nn.Parameter(state_dict[prefix + "bias"], requires_grad=False)
            else:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
        known = set(to_bnb_state_dict(q, prefix)) | {prefix + "weight.nested_quant_map", prefix + "bias"}
        unexpected_keys.extend(k for k in own if k not in known)


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
