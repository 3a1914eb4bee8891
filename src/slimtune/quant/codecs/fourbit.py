"""Block-wise 4-bit weights (NF4, FP4) with optional double quantization, in the bitsandbytes byte layout.

Layout (bitsandbytes `quantize_4bit`): the tensor is flattened row-major and cut into blocks of `block_size` (64)
values; each block keeps its fp32 absmax; a value becomes the index of the nearest entry of the 16-entry code table
to `x * (1 / absmax)`; element 2j goes to the high nibble and 2j+1 to the low nibble of byte j (packed: uint8
((n + 1) // 2, 1)). Double quantization (QLoRA): `offset = mean(absmax)`, then `absmax - offset` is quantized 8-bit
block-wise in blocks of 256 with bitsandbytes' signed dynamic code (`dynamic_map()`): uint8 codes + one fp32 absmax
per 256 ("nested_absmax"). Dequantization: `absmax = code8[q] * nested_absmax[i // 256] + offset`.

API: `quantize_4bit(w, fmt="nf4", block_size=64, double_quant=False, name="weight") -> Quant4bit`,
`dequantize_4bit(q, dtype=None) -> Tensor`, `Quant4bit.absmax_fp32()`, `Quant4bit.nbits()`,
`to_bnb_state_dict(q, prefix) -> dict[str, Tensor]`, `from_bnb_state_dict(sd, prefix) -> Quant4bit`,
`quantize_blockwise_8bit(x, block_size=256)`, `dequantize_blockwise_8bit(codes, absmax, block_size=256)`,
`code_table(fmt)`, `dynamic_map()`; `FourBitCodec` (the `QuantLinear` codec of "nf4" / "fp4"; its state dict is
bitsandbytes' `Linear4bit` keys).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.errors import CheckpointError, ConfigError, PrecisionError
from slimtune.precision.formats import DTYPES, NF4_CODE
from slimtune.quant.codecs.base import GroupedCodec

FORMATS_4BIT = ("nf4", "fp4")
# bitsandbytes "fp4": sign bit 8, magnitudes (code & 7) -> {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12 (an e2m1 with bias 3
# and a subnormal 0.0625, normalised to max 1). Not the OCP e2m1 grid; kept for checkpoint exchange.
_FP4_MAG = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4_CODE = tuple(m / 12 for m in _FP4_MAG) + tuple(-m / 12 for m in _FP4_MAG)  # -0.0 at index 8
CHUNK = 1 << 22  # elements per step: bounds the fp32/int32 temporaries to ~32 MB


@cache
def _tables(fmt: str, device: str) -> tuple[Tensor, Tensor, Tensor]:
    """(code (16,) fp32, decision boundaries fp32, code index of each bucket int32) on `device`.

    Boundaries are the fp32 midpoints (a + b) / 2 of neighbouring fp32 code values, as bitsandbytes' reference
    backend computes them; a value exactly on one goes to the lower code. NF4: index = number of midpoints below x.
    FP4: the magnitude is bucketed over the 8 sorted magnitudes and the sign bit set for x < 0 (as bitsandbytes'
    CUDA kernel: +0 is code 0, -0 code 8).
    """
    if fmt == "nf4":
        code = torch.tensor(NF4_CODE, dtype=torch.float32)
        mids = (code[1:] + code[:-1]) / 2
        idx = torch.arange(16)
    else:
        code = torch.tensor(FP4_CODE, dtype=torch.float32)
        mags = code[:8]
        order = torch.argsort(mags)
        s = mags[order]
        mids = (s[1:] + s[:-1]) / 2
        idx = order
    return code.to(device), mids.to(device), idx.to(torch.int32).to(device)


def code_table(fmt: str, device: str | torch.device = "cpu") -> Tensor:
    """The 16 fp32 values of `fmt` ("nf4" or "fp4") indexed by 4-bit code, as bitsandbytes' `quant_map`."""
    _check_fmt(fmt)
    return _tables(fmt, str(torch.device(device)))[0]


@cache
def _dynamic(device: str) -> tuple[Tensor, Tensor]:
    """bitsandbytes' signed dynamic 8-bit code (Dettmers 2015, `create_dynamic_map(True, 7, 8)`) and its midpoints.

    For exponent i = 0..6 there are 2^i fraction values, the midpoints of linspace(0.1, 1, 2^i + 1), times
    10^(i - 6), both signs: 127 + 127 values, plus 0 and 1.0 = 256, sorted. Computed in fp32 as bitsandbytes does.
    """
    vals: list[float] = []
    for i in range(7):
        b = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        vals += (10 ** (i - 6) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    vals += [0.0, 1.0]
    code = torch.tensor(sorted(vals), dtype=torch.float32)
    mids = (code[1:] + code[:-1]) * 0.5
    return code.to(device), mids.to(device)


def dynamic_map(device: str | torch.device = "cpu") -> Tensor:
    """The 256-entry signed dynamic code used for the nested absmax (bitsandbytes' `nested_quant_map`)."""
    return _dynamic(str(torch.device(device)))[0]


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS_4BIT:
        raise ConfigError(f"unknown 4-bit format {fmt!r}; choose nf4 or fp4")


def check_block(block_size: int, what: str = "block size") -> None:
    """Raise a one-line ConfigError unless `block_size` is a power of two from 16 to 4096."""
    if not (isinstance(block_size, int) and 16 <= block_size <= 4096 and block_size & (block_size - 1) == 0):
        raise ConfigError(f"{what} {block_size!r} is not a power of two from 16 to 4096; use 64 (the QLoRA default)")


@dataclass
class Quant4bit:
    """A 4-bit block-quantized tensor. `absmax` is fp32 (n_blocks,) or, when `nested`, uint8 codes (n_blocks,)."""

    packed: Tensor  # uint8 ((n + 1) // 2, 1)
    absmax: Tensor
    shape: torch.Size
    dtype: torch.dtype  # the dtype it was quantized from (dequantize's default)
    fmt: str = "nf4"
    block_size: int = 64
    nested_absmax: Tensor | None = None  # fp32 (ceil(n_blocks / 256),)
    nested_offset: Tensor | None = None  # fp32 0-dim: the mean subtracted before the 8-bit step
    nested_block_size: int = 256
    code: Tensor | None = None  # a checkpoint's own 16-entry table (default: the built-in one of `fmt`)
    nested_code: Tensor | None = None  # a checkpoint's own 256-entry nested table (default: `dynamic_map()`)

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def absmax_fp32(self) -> Tensor:
        """The per-block absmax in fp32 (decoding the nested 8-bit step when there is one)."""
        if not self.nested:
            return self.absmax
        return dequantize_blockwise_8bit(self.absmax, self.nested_absmax, self.nested_block_size,
                                         self.nested_code) + self.nested_offset

    def nbits(self) -> int:
        """Exact bits stored: codes, absmax (8 or 32 bits each), nested absmax and offset; code tables not counted."""
        bits = self.packed.numel() * 8 + self.absmax.numel() * self.absmax.element_size() * 8
        if self.nested:
            bits += self.nested_absmax.numel() * 32 + 32
        return bits


def _encode(scaled: Tensor, fmt: str) -> Tensor:
    """Codes (uint8, same shape) of values already scaled into [-1, 1]: nearest entry of the code table."""
    _, mids, idx = _tables(fmt, str(scaled.device))
    if fmt == "nf4":
        return torch.bucketize(scaled, mids, out_int32=True).to(torch.uint8)
    c = idx[torch.bucketize(scaled.abs(), mids, out_int32=True)].to(torch.uint8)
    return c | ((scaled < 0).to(torch.uint8) << 3)


def quantize_4bit(w: Tensor, fmt: str = "nf4", block_size: int = 64, double_quant: bool = False,
                  name: str = "weight") -> Quant4bit:
    """Quantize `w` (any shape, fp32/fp16/bf16, CPU or CUDA) to `fmt` with one absmax per `block_size` values.

    Works in chunks of `CHUNK` values so the temporaries stay small; the result lives on `w`'s device. An all-zero
    block gets absmax 0 and the code of 0.

    Raises:
        ConfigError: unknown `fmt` or a bad `block_size`.
        PrecisionError: `w` holds NaN or inf (names `name`).
    """
    _check_fmt(fmt)
    check_block(block_size)
    if not w.is_floating_point():
        raise ConfigError(f"tensor {name} has dtype {w.dtype}; only floating-point weights can be quantized")
    flat = w.detach().reshape(-1)
    n, B = flat.numel(), block_size
    nb = -(-n // B)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(nb, dtype=torch.float32, device=w.device)
    step = max(B, CHUNK // B * B)
    for s in range(0, n, step):
        x = flat[s:s + step].float()
        m = x.numel()
        if m % B:
            x = F.pad(x, (0, B - m % B))  # zeros never change an absmax
        x = x.view(-1, B)  # (blocks, B)
        a = x.abs().amax(1)
        absmax[s // B:s // B + x.shape[0]] = a
        inv = torch.where(a > 0, 1.0 / a, torch.zeros_like(a))  # bitsandbytes multiplies by the reciprocal
        c = _encode((x * inv[:, None]).clamp_(-1, 1), fmt).view(-1)[:m]
        if m % 2:
            c = torch.cat([c, _encode(torch.zeros(1, device=w.device), fmt)])
        packed[s // 2:s // 2 + c.numel() // 2, 0] = (c[0::2] << 4) | c[1::2]
    if not torch.isfinite(absmax).all():
        first = int((~torch.isfinite(absmax)).nonzero()[0, 0]) * B
        raise PrecisionError(f"tensor {name} holds NaN or inf (first near flat index {first}); quantizing it to "
                             f"{fmt} would spread them over their blocks; the checkpoint is damaged")
    q = Quant4bit(packed, absmax, w.shape, w.dtype, fmt, block_size)
    if double_quant:
        offset = absmax.mean()
        q.absmax, q.nested_absmax = quantize_blockwise_8bit(absmax - offset, 256)
        q.nested_offset = offset
    return q


def quantize_blockwise_8bit(x: Tensor, block_size: int = 256) -> tuple[Tensor, Tensor]:
    """bitsandbytes `quantize_blockwise`: codes uint8 (same shape) and fp32 absmax per block (flattened order).

    Each value becomes the index of the nearest entry of `dynamic_map()` to `x * (1 / absmax)` (clamped to [-1, 1]).
    """
    check_block(block_size)
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    xb = F.pad(flat, (0, (-n) % block_size)).view(-1, block_size)
    a = xb.abs().amax(1)
    inv = torch.where(a > 0, 1.0 / a, torch.zeros_like(a))
    _, mids = _dynamic(str(x.device))
    codes = torch.bucketize((xb * inv[:, None]).clamp_(-1, 1), mids, out_int32=True).to(torch.uint8)
    return codes.view(-1)[:n].view(x.shape), a


def dequantize_blockwise_8bit(codes: Tensor, absmax: Tensor, block_size: int = 256,
                              code: Tensor | None = None) -> Tensor:
    """Inverse of `quantize_blockwise_8bit`: fp32 values `code[codes] * absmax[i // block_size]`."""
    table = dynamic_map(codes.device) if code is None else code.to(codes.device, torch.float32)
    v = table[codes.reshape(-1).int()]
    n = v.numel()
    v = F.pad(v, (0, (-n) % block_size)).view(-1, block_size) * absmax[:, None]
    return v.view(-1)[:n].view(codes.shape)


@cache
def _pair_lut(fmt: str, device: str) -> Tensor:
    """(256, 2) fp32: byte b -> (code[b >> 4], code[b & 15]), so one gather decodes two values."""
    code = _tables(fmt, device)[0]
    b = torch.arange(256, device=device)
    return torch.stack([code[b >> 4], code[b & 15]], 1)


def dequantize_4bit(q: Quant4bit, dtype: torch.dtype | None = None) -> Tensor:
    """The tensor `q` encodes, shape `q.shape`, in `dtype` (default: the dtype it was quantized from).

    Values are `code[c] * absmax` computed in fp32 and rounded once to `dtype`, as bitsandbytes does. `code`
    overrides the 16-entry table (a checkpoint's own `quant_map`).
    """
    dtype = dtype or q.dtype
    n, B = math.prod(q.shape), q.block_size
    dev = str(q.packed.device)
    if q.code is None:
        lut = _pair_lut(q.fmt, dev)
    else:
        code = q.code.to(dev, torch.float32)
        b = torch.arange(256, device=dev)
        lut = torch.stack([code[b >> 4], code[b & 15]], 1)
    v = F.embedding(q.packed.view(-1).int(), lut).view(-1)  # (2 * bytes,) fp32
    absmax = q.absmax_fp32()
    if v.numel() != absmax.numel() * B:
        v = F.pad(v[:n], (0, absmax.numel() * B - n))
    v = v.view(-1, B).mul_(absmax[:, None])
    return v.view(-1)[:n].to(dtype).view(q.shape)


# ---- bitsandbytes state-dict layout ---------------------------------------------------------------------------------
def to_bnb_state_dict(q: Quant4bit, prefix: str = "") -> dict[str, Tensor]:
    """The tensors bitsandbytes' `Linear4bit` saves for its weight: `{prefix}weight`, `weight.absmax`,
    `weight.quant_map`, (`weight.nested_absmax`, `weight.nested_quant_map`), `weight.quant_state.bitsandbytes__<fmt>`
    (uint8 bytes of a JSON object with quant_type, blocksize, dtype, shape and the nested fields)."""
    dev = q.packed.device
    sd = {f"{prefix}weight": q.packed, f"{prefix}weight.absmax": q.absmax,
          f"{prefix}weight.quant_map": code_table(q.fmt, dev).clone()}
    meta = {"quant_type": q.fmt, "blocksize": q.block_size, "dtype": str(q.dtype).removeprefix("torch."),
            "shape": list(q.shape)}
    if q.nested:
        sd[f"{prefix}weight.nested_absmax"] = q.nested_absmax
        sd[f"{prefix}weight.nested_quant_map"] = dynamic_map(dev).clone()
        meta.update(nested_blocksize=q.nested_block_size, nested_dtype="float32",
                    nested_offset=float(q.nested_offset))
    raw = json.dumps(meta).encode("utf-8")
    sd[f"{prefix}weight.quant_state.bitsandbytes__{q.fmt}"] = torch.tensor(list(raw), dtype=torch.uint8)
    return sd


def from_bnb_state_dict(sd: dict[str, Tensor], prefix: str = "") -> Quant4bit:
    """Read a 4-bit weight saved by bitsandbytes (or `to_bnb_state_dict`), with the code tables it was saved with.

    Raises:
        CheckpointError: a missing scale or quant-state entry (names the key).
    """
    key = next((k for k in sd if k.startswith(f"{prefix}weight.quant_state.bitsandbytes__")), None)
    for need in (f"{prefix}weight", f"{prefix}weight.absmax", key or f"{prefix}weight.quant_state.bitsandbytes__nf4"):
        if need not in sd:
            raise CheckpointError(f"quantized checkpoint lacks {need} (the 4-bit weight's scales/state); "
                                  "re-quantize the model or re-download the checkpoint")
    try:  # the dtype name comes from a file: looked up in slimtune's table, never as an attribute of the torch module
        meta = json.loads(bytes(sd[key].cpu().tolist()).decode("utf-8"))
        fmt, shape, block = meta["quant_type"], torch.Size(meta["shape"]), int(meta["blocksize"])
        dtype = DTYPES[str(meta["dtype"]).removeprefix("torch.")]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise CheckpointError(f"{key}: malformed bitsandbytes quant state; re-quantize the model or re-download "
                              "the checkpoint") from None
    if not dtype.is_floating_point:
        raise CheckpointError(f"{key}: quant state dtype {meta['dtype']!r} is not a float type; the checkpoint is "
                              "damaged")
    q = Quant4bit(sd[f"{prefix}weight"].view(torch.uint8).reshape(-1, 1), sd[f"{prefix}weight.absmax"],
                  shape, dtype, fmt, block)
    if "nested_offset" in meta:
        nk = f"{prefix}weight.nested_absmax"
        if nk not in sd:
            raise CheckpointError(f"quantized checkpoint lacks {nk} (double-quantized scales); re-quantize it")
        q.nested_absmax = sd[nk].float()
        q.nested_offset = torch.tensor(float(meta["nested_offset"]), device=q.absmax.device)
        q.nested_block_size = int(meta.get("nested_blocksize", 256))
        q.nested_code = sd.get(f"{prefix}weight.nested_quant_map")
    q.code = sd.get(f"{prefix}weight.quant_map")
    return q


# ---- the QuantLinear codec ------------------------------------------------------------------------------------------
class FourBitCodec(GroupedCodec):
    """NF4 / FP4 with one absmax per block of 64 (optionally double-quantized), buffers as bitsandbytes names them:
    `weight` uint8 ((n + 1) // 2, 1), `absmax` (fp32, or uint8 codes with `nested_absmax` fp32 and `nested_offset`)."""

    code_bits = 4

    def __init__(self, fmt: str) -> None:
        self.name = fmt

    def check(self, in_f: int, group: int | None, name: str) -> int | None:
        group = self.default_group if group is None else group
        check_block(group, f"layer {name}: block size")
        return group

    def buffers(self, out_f: int, in_f: int, group: int | None, dq: bool, device) -> dict[str, Tensor]:
        nb = -(-out_f * in_f // group)
        b = {"weight": torch.empty(((out_f * in_f + 1) // 2, 1), dtype=torch.uint8, device=device),
             "absmax": torch.empty(nb, dtype=torch.uint8 if dq else torch.float32, device=device)}
        if dq:
            b["nested_absmax"] = torch.empty(-(-nb // 256), dtype=torch.float32, device=device)
            b["nested_offset"] = torch.empty((), dtype=torch.float32, device=device)
        return b

    def quantize(self, w: Tensor, group: int | None, dq: bool, name: str) -> dict[str, Tensor]:
        q = quantize_4bit(w, self.name, group, dq, name)
        bufs = {"weight": q.packed, "absmax": q.absmax}
        if q.nested:
            bufs.update(nested_absmax=q.nested_absmax, nested_offset=q.nested_offset)
        return bufs

    def nbytes(self, out_f: int, in_f: int, group: int | None = None, dq: bool = False) -> int:
        n = out_f * in_f
        nb = -(-n // (group or self.default_group))  # blocks, each with one absmax
        absmax = nb + 4 * -(-nb // 256) + 4 if dq else 4 * nb
        return (n + 1) // 2 + absmax

    def table_bytes(self, dq: bool) -> int:
        return 16 * 4 + (256 * 4 if dq else 0)  # quant_map (fp32) and, nested, nested_quant_map (fp32)

    @staticmethod
    def state(m: nn.Module) -> Quant4bit:
        """The layer's buffers as a `Quant4bit` (with the code tables a loaded checkpoint brought, if any)."""
        nested = m.double_quant
        return Quant4bit(m.weight, m.absmax, torch.Size((m.out_features, m.in_features)), m.compute_dtype, m.fmt,
                         m.group_size, m.nested_absmax if nested else None, m.nested_offset if nested else None,
                         code=getattr(m, "_code", None), nested_code=getattr(m, "_nested_code", None))

    def dequantize(self, m: nn.Module, dtype: torch.dtype) -> Tensor:
        return dequantize_4bit(self.state(m), dtype)

    def save_state(self, m: nn.Module, prefix: str) -> dict[str, Tensor] | None:
        return to_bnb_state_dict(self.state(m), prefix)

    def load_state(self, m: nn.Module, sd: dict[str, Tensor], prefix: str, assign: bool) -> list[str] | None:
        own = {k: v for k, v in sd.items() if k.startswith(prefix) and "." not in k[len(prefix):]
               or k.startswith(prefix + "weight.")}
        q = from_bnb_state_dict(own, prefix)
        if (q.fmt, q.block_size, q.nested, tuple(q.shape)) != (m.fmt, m.group_size, m.double_quant,
                                                               (m.out_features, m.in_features)):
            raise CheckpointError(f"{prefix}weight: checkpoint holds {q.fmt} block {q.block_size} nested={q.nested} "
                                  f"shape {tuple(q.shape)}, the model expects {m.fmt} block {m.group_size} "
                                  f"nested={m.double_quant} shape {(m.out_features, m.in_features)}")
        bufs = {"weight": q.packed, "absmax": q.absmax}
        if q.nested:
            bufs.update(nested_absmax=q.nested_absmax, nested_offset=q.nested_offset.float())
        for k, v in bufs.items():
            cur = getattr(m, k)
            if assign or cur.is_meta:
                setattr(m, k, v)
            elif cur.shape != v.shape:
                raise CheckpointError(f"{prefix}{k}: checkpoint shape {tuple(v.shape)}, model {tuple(cur.shape)}")
            else:
                cur.copy_(v)
        m._code, m._nested_code = q.code, q.nested_code
        m.compute_dtype = q.dtype
        known = set(to_bnb_state_dict(q, prefix)) | {prefix + "weight.nested_quant_map", prefix + "bias"}
        return [k for k in own if k not in known]
