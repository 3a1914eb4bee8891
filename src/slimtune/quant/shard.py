"""`QuantLinear` under FSDP2: its packed weight and scales as frozen uint8 parameters (FSDP2 shards parameters, not
buffers), and the bytes of one rank's shard of a 4-bit layer, quantized from only the rows that rank reads.

Why uint8 parameters rather than a tensor subclass (torchao's NF4Tensor): FSDP2 shards any parameter along dim 0 and
all-gathers a group of mixed dtypes as uint8; its `MixedPrecisionPolicy` casts only floating-point parameters, so bytes
are never rounded to bf16 (it would cast fp32 scales such as `absmax` or `nested_offset`), and 0-dim tensors (which
cannot be sharded) become 4 bytes. A subclass would have to implement the aten ops FSDP2 applies to shards (split,
view, copy_, new_zeros, ...) for no gain here. `QuantLinear.typed(name)` views the gathered bytes back as the codec's
tensors (a view, no copy), so `FourBitCodec.dequantize` - and any kernel behind it - reads exactly the single-GPU
tensors. Only the FSDP path converts: a single-GPU layer keeps its buffers and bitsandbytes' state-dict keys.
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


def to_byte_params(model: nn.Module) -> list[str]:
    """Turn every QuantLinear's buffers into frozen 1-D uint8 parameters of the same names (their bytes, row-major),
    recording each one's dtype and shape in `layer.byte_layout` for `QuantLinear.typed`. Works on the meta device.

    Returns:
        the converted layers' names.
    Raises:
        ConfigError: a layer of a format that cannot be quantized shard by shard (only nf4 / fp4 can).
    """
    names = []
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        if m.fmt not in FORMATS_4BIT:
            raise ConfigError(f"layer {name}: format {m.fmt} cannot be sharded over several processes; fix: "
                              f"quant={' or '.join(FORMATS_4BIT)}")
        layout = {}
        for k, b in list(m._buffers.items()):
            if b is None:
                continue
            layout[k] = (b.dtype, tuple(b.shape))
            del m._buffers[k]
            m.register_parameter(k, nn.Parameter(b.reshape(-1).view(torch.uint8), requires_grad=False))
        m.byte_layout = layout
        names.append(name)
    return names


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
    """This rank's bytes of each parameter of a 4-bit `m` (after `to_byte_params`), bitwise equal to the same
    slices of the whole weight quantized at once, while reading only about 1/world of the weight.

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

    def values(r: int) -> tuple[int, int, int, int]:
        p0, p1 = chunk_range((n + 1) // 2, r, world)  # packed bytes of rank r
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
    out = {"weight": packed}
    for k, t in _full_scales(m, absmax).items():
        raw = t.reshape(-1).view(torch.uint8)
        s, e = chunk_range(raw.numel(), rank, world)
        out[k] = raw[s:e]
    return out
