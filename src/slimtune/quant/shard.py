"""`QuantLinear` under FSDP2: its packed weight and scales as frozen 1-D parameters of a floating "storage dtype"
holding their bytes (FSDP2 shards parameters, not buffers), and the bytes of one rank's shard of a 4-bit layer,
quantized from only the rows that rank reads.

Why bytes in a float dtype (bitsandbytes' `quant_storage`): FSDP2 shards any parameter along dim 0, but torch 2.11's
creates each shard as a trainable `nn.Parameter` (refused for integer tensors). Why fp32: bytes must never pass
through a conversion. FSDP2's `MixedPrecisionPolicy` casts every parameter whose dtype differs from `param_dtype`
(so a model with these layers is gathered with `param_dtype=None`: `train.distributed.gather_dtype`), and CUDA's
foreach copy, which fills the all-gather buffer, computes a 16-bit tensor in fp32 and rounds back: a byte pair that
reads as a bf16 NaN comes out as the canonical NaN (bf16 storage shifted the 8B-shape loss by 4.6e-2 on two GPUs).
fp32 copies move the bits unchanged, and a group of mixed dtypes is gathered as raw uint8. Each tensor's bytes are
zero-padded to whole storage elements (at most itemsize - 1 bytes); 0-dim tensors become 1-D. A tensor subclass
(torchao's NF4Tensor) would have to implement the aten ops FSDP2 applies to shards for no gain here.
`StoredQuantLinear.typed(name)` views the gathered storage back as the codec's tensor (uint8 view, the padding cut,
then the codec's dtype and shape: no copy), so `FourBitCodec.dequantize` - and any kernel behind it - reads exactly
the single-GPU tensors. Only the FSDP path converts: a single-GPU layer keeps its buffers and bitsandbytes' keys.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from slimtune.errors import ConfigError, SlimtuneError
from slimtune.quant.codecs.fourbit import FORMATS_4BIT, quantize_4bit, quantize_blockwise_8bit
from slimtune.quant.linear import QuantLinear

# rows (r0, r1) of the layer's (out, in) weight, in the dtype it is quantized from, on the device
RowReader = Callable[[int, int], Tensor]
# all-gather of 1-D pieces: (this rank's piece, every rank's length) -> the pieces concatenated in rank order
Gather = Callable[[Tensor, list[int]], Tensor]


def chunk_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's part of n rows as FSDP2 shards dim 0 (`torch.chunk`: ceil(n / world) rows each, the
    last ranks shorter or empty)."""
    c = -(-n // world)
    start = min(rank * c, n)
    return start, min(start + c, n)


class StoredQuantLinear(QuantLinear):
    """A `QuantLinear` whose packed weight and scales are 1-D float parameters of raw bytes (`to_byte_params`);
    `byte_layout[name]` = (codec dtype, codec shape, byte count)."""

    def typed(self, name: str) -> Tensor:
        """Parameter `name` as the codec's tensor: its bytes without the padding, in the codec's dtype and shape (views
        of the same storage: the gathered storage starts at offset 0 of its own allocation, so fp32 stays aligned)."""
        dtype, shape, nbytes = self.byte_layout[name]
        return getattr(self, name).view(torch.uint8)[:nbytes].view(dtype).view(shape)

    def _apply(self, fn, recurse=True):
        # a cast of the model (`.half()`, `.to(torch.float32)`) must not convert stored bytes as numbers: they go
        # through it as uint8 views (device moves still apply). FSDP2's sharded DTensor parameters are left to FSDP2.
        plain = {k: p for k in self.byte_layout if type(p := self._parameters[k]) is nn.Parameter}
        for k, p in plain.items():
            self._parameters[k] = nn.Parameter(p.view(torch.uint8), requires_grad=False)
        try:
            return super()._apply(fn, recurse)
        finally:
            for k, p in plain.items():
                self._parameters[k] = nn.Parameter(self._parameters[k].view(p.dtype), requires_grad=False)


def to_byte_params(model: nn.Module, storage: torch.dtype = torch.float32) -> list[str]:
    """Turn every QuantLinear's buffers into frozen 1-D parameters of the float dtype `storage` holding their bytes
    (row-major, zero-padded to whole elements), in place; each layer becomes a `StoredQuantLinear` recording every
    tensor's dtype, shape and byte count in `byte_layout`. Works on the meta device.

    Args:
        storage: the float dtype holding the bytes (fp32: see the module docstring; others for tests).
    Returns:
        the converted layers' names.
    Raises:
        ConfigError: a layer of a format that cannot be quantized shard by shard (only nf4 / fp4 can), or a
            non-float `storage`.
    """
    if not storage.is_floating_point:
        raise ConfigError(f"storage dtype {storage} is not a floating-point dtype (FSDP2 needs float parameters)")
    names = []
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear) or isinstance(m, StoredQuantLinear):
            continue
        if m.fmt not in FORMATS_4BIT:
            raise ConfigError(f"layer {name}: format {m.fmt} cannot be sharded over several processes; fix: "
                              f"quant={' or '.join(FORMATS_4BIT)}")
        layout = {}
        for k, b in list(m._buffers.items()):
            if b is None:
                continue
            raw = b.reshape(-1).view(torch.uint8)
            layout[k] = (b.dtype, tuple(b.shape), raw.numel())
            raw = _padded(raw, -(-raw.numel() // storage.itemsize) * storage.itemsize)  # whole storage elements
            del m._buffers[k]
            m.register_parameter(k, nn.Parameter(raw.view(storage), requires_grad=False))
        m.byte_layout = layout
        m.__class__ = StoredQuantLinear  # the same module, its tensors read through `StoredQuantLinear.typed`
        names.append(name)
    return names


def byte_range(nbytes: int, unit: int, rank: int, world: int) -> tuple[int, int, int]:
    """Rank's bytes of a tensor of `nbytes` bytes stored in elements of `unit` bytes (zero-padded to whole ones) as
    FSDP2 shards it: (first byte, end byte, the shard's size in bytes including its share of the padding)."""
    s, e = chunk_range(-(-nbytes // unit), rank, world)  # storage elements
    return min(unit * s, nbytes), min(unit * e, nbytes), unit * (e - s)


def _padded(t: Tensor, size: int) -> Tensor:
    """1-D uint8 `t` followed by zeros up to `size` bytes."""
    return torch.cat([t, t.new_zeros(size - t.numel())]) if size > t.numel() else t


def _full_scales(m: QuantLinear, absmax: Tensor) -> dict[str, Tensor]:
    """The layer's scale tensors from its full fp32 absmax (n_blocks,), as `quantize_4bit` makes them (double
    quantization: the mean subtracted, then 8-bit blocks of 256)."""
    if not m.double_quant:
        return {"absmax": absmax}
    offset = absmax.mean()
    codes, nested = quantize_blockwise_8bit(absmax - offset, 256)
    return {"absmax": codes, "nested_absmax": nested, "nested_offset": offset}


def fourbit_shard(m: QuantLinear, read_rows: RowReader, rank: int, world: int, gather: Gather,
                  name: str = "weight") -> dict[str, Tensor]:
    """This rank's bytes of each parameter of a 4-bit `m` (after `to_byte_params`): 1-D uint8, the size of its
    shard of the storage parameter, bitwise equal to the same slices of the whole weight quantized at once (the
    storage's zero padding included), while reading only about 1/world of the weight.

    The packed weight's shard (bytes [p0, p1), values [2 p0, 2 p1)) is quantized from the rows holding its whole
    blocks of `group_size` values (blocks are contiguous in the flattened weight, so a block-aligned span quantizes
    exactly as inside the whole tensor). The scales depend on every block (double quantization subtracts the mean
    absmax): each rank computes the fp32 absmax of the blocks that start in its span, the ranks all-gather them
    (4 bytes per `group_size` values), and every rank derives the (small) scale tensors whole and keeps its slice.

    Args:
        read_rows: (r0, r1) -> rows [r0, r1) of the (out, in) weight in its load dtype, on the run's device.
        gather: the all-gather of the absmax pieces (identity for one process).
        name: the weight's name, for errors.
    Raises:
        PrecisionError: the rows hold NaN or inf.
    """
    n, B, in_f = m.out_features * m.in_features, m.group_size, m.in_features
    unit = m.weight.dtype.itemsize  # bytes per storage element

    def values(r: int) -> tuple[int, int, int, int]:
        p0, p1, _ = byte_range((n + 1) // 2, unit, r, world)  # packed bytes of rank r
        return p0, p1, min(2 * p0, n), min(2 * p1, n)  # and the values they hold

    own_blocks = [(-(-v0 // B), -(-v1 // B)) for _, _, v0, v1 in map(values, range(world))]  # blocks starting there
    p0, p1, v0, v1 = values(rank)
    own0, own1 = own_blocks[rank]
    dev, err = read_rows(0, 0).device, None
    packed, own = torch.empty(0, dtype=torch.uint8, device=dev), torch.full((own1 - own0,), float("nan"), device=dev)
    if p1 > p0:  # (an empty shard - more ranks than bytes - still takes part in the gather)
        k0, k1 = v0 // B, -(-v1 // B)  # blocks covering the shard (and the own blocks)
        e0, e1 = k0 * B, min(k1 * B, n)
        r0, r1 = e0 // in_f, -(-e1 // in_f)
        try:
            flat = read_rows(r0, r1).reshape(-1)[e0 - r0 * in_f:e1 - r0 * in_f]
            q = quantize_4bit(flat, m.fmt, B, False, name)
            packed = q.packed.reshape(-1)[p0 - e0 // 2:p1 - e0 // 2]
            own = q.absmax[own0 - k0:own1 - k0]
        except SlimtuneError as e:  # gathered as a flag, so that every rank stops here (none waits in a collective)
            err = e
    flag = torch.tensor([float(err is not None)], device=dev)
    pieces = gather(torch.cat([own, flag]), [b - a + 1 for a, b in own_blocks])
    ends = torch.tensor([b - a + 1 for a, b in own_blocks]).cumsum(0)
    if err is not None or pieces[ends - 1].any():
        raise err or SlimtuneError(f"tensor {name}: another process could not read or quantize its rows")
    keep = torch.ones(pieces.numel(), dtype=torch.bool, device=dev)
    keep[ends - 1] = False
    absmax = pieces[keep]  # (n_blocks,) fp32, as quantize_4bit's
    out = {"weight": _padded(packed, byte_range((n + 1) // 2, unit, rank, world)[2])}
    for k, t in _full_scales(m, absmax).items():
        raw = t.reshape(-1).view(torch.uint8)
        s, e, size = byte_range(raw.numel(), unit, rank, world)
        out[k] = _padded(raw[s:e], size)
    return out
