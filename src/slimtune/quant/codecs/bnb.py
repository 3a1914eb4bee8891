"""The `QuantLinear` codec of the 4-bit formats (NF4 / FP4, numerics in `fourbit.py`) and bitsandbytes' `Linear4bit`
state-dict layout, which is how such a layer is saved and read: `weight` (packed codes), `weight.absmax`,
`weight.quant_map`, (`weight.nested_absmax`, `weight.nested_quant_map`), `weight.quant_state.bitsandbytes__<fmt>`.
"""
from __future__ import annotations

import json

import torch
from torch import Tensor, nn

from slimtune.errors import CheckpointError
from slimtune.precision.formats import float_named
from slimtune.quant.codecs.base import GroupedCodec
from slimtune.quant.codecs.fourbit import (FORMATS_4BIT, Quant4bit, check_block, code_table, dequantize_4bit,
                                           dequantize_4bit_into, dynamic_map, quantize_4bit)


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


def quant_state_meta(t: Tensor, key: str = "quant_state") -> dict:
    """The JSON object (quant_type, blocksize, dtype, shape, nested fields) that a `weight.quant_state.bitsandbytes__*`
    tensor holds as uint8 bytes.

    Raises:
        CheckpointError: anything else (names `key`).
    """
    try:
        meta = json.loads(bytes(t.reshape(-1).cpu().tolist()).decode("utf-8"))
        if meta["quant_type"] not in FORMATS_4BIT:
            raise ValueError(f"quant_type {meta['quant_type']!r}")
        int(meta["blocksize"]), torch.Size(meta["shape"])
        if float_named(meta["dtype"]) is None:  # (a name from a file: looked up in slimtune's table only)
            raise ValueError(f"dtype {meta['dtype']!r} is not a float type")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{key}: not a bitsandbytes 4-bit quant state ({e}); the checkpoint is damaged") \
            from None
    return meta


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
    meta = quant_state_meta(sd[key], key)
    fmt = meta["quant_type"]
    q = Quant4bit(sd[f"{prefix}weight"].view(torch.uint8).reshape(-1, 1), sd[f"{prefix}weight.absmax"],
                  torch.Size(meta["shape"]), float_named(meta["dtype"]), fmt,
                  int(meta["blocksize"]))
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
        nested, t = m.double_quant, m.typed  # typed: FSDP2 holds them as bytes (quant/shard.py)
        return Quant4bit(t("weight"), t("absmax"), torch.Size((m.out_features, m.in_features)), m.compute_dtype,
                         m.fmt, m.group_size, t("nested_absmax") if nested else None,
                         t("nested_offset") if nested else None, code=getattr(m, "_code", None),
                         nested_code=getattr(m, "_nested_code", None))

    def dequantize(self, m: nn.Module, dtype: torch.dtype) -> Tensor:
        return dequantize_4bit(self.state(m), dtype)

    def dequantize_group_into(self, out: Tensor, layers: list[nn.Module]) -> Tensor:
        """The weights of several 4-bit layers stacked by rows into the flat buffer `out` (one launch per three)."""
        return dequantize_4bit_into(out, [self.state(m) for m in layers])

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
