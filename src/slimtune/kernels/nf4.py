"""Block-wise 4-bit (NF4/FP4) dequantization in one Triton pass: packed codes + absmax -> a 16/32-bit weight.

The format (code tables, layout, the PyTorch reference path) belongs to `slimtune.quant.codecs.fourbit`, which calls
these kernels on CUDA: element 2j in the high nibble of byte j, value = code[c] * absmax[e // block] computed in fp32
and rounded once; with double quantization absmax = nested_code[q] * nested_absmax[block // nested_block] + offset
(fp32, two roundings, no fused multiply-add). Bitwise equal to the reference. The unfused chain (gather, fp32
multiply, cast) writes an fp32 copy of the weight and reads it back; this writes only the output (n/2 + 2n bytes for
bf16).
"""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor

from slimtune.kernels import cast, cdiv, interpreting, jit

tl = None  # triton.language, bound when a kernel is first launched (slimtune.kernels.jit)

ELEMS_PER_PROGRAM = 4096  # 2 KiB of codes per program: 16 bytes in and 32 bf16 values out per thread at 4 warps


@jit
def _blocks(out_ptr, packed_ptr, absmax_ptr, nabs_ptr, noff_ptr, code_ptr, ncode_ptr, n, pid, BLOCK: tl.constexpr,
            ROWS: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr):
    # program `pid` of one weight of n values: ROWS quantization blocks of BLOCK values (BLOCK // 2 bytes each)
    HALF: tl.constexpr = BLOCK // 2
    blk = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,) block index, int64: n may pass 2^31
    ok = blk * BLOCK < n
    byte = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (ROWS, HALF); byte j exists when 2j < n + 1
    bits = tl.load(packed_ptr + byte, mask=byte * 2 <= n, other=0).to(tl.int32)
    if NESTED:  # absmax = nested_code[q] * nested_absmax[block // NESTED_BLOCK] + offset, each step rounded in fp32
        q = tl.load(absmax_ptr + blk, mask=ok, other=0).to(tl.int32)
        scale = tl.load(nabs_ptr + blk // NESTED_BLOCK, mask=ok, other=0.0)
        a = tl.load(ncode_ptr + q) * scale + tl.load(noff_ptr)
    else:
        a = tl.load(absmax_ptr + blk, mask=ok, other=0.0)
    hi = tl.load(code_ptr + (bits >> 4)) * a[:, None]  # element 2j
    lo = tl.load(code_ptr + (bits & 15)) * a[:, None]  # element 2j + 1
    vals = tl.interleave(hi, lo)  # (ROWS, BLOCK) in element order
    elem = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(out_ptr + elem, cast(vals, out_ptr.dtype.element_ty, EMULATE_RNE), mask=elem < n)


@jit
def _dequant4_kernel(out_ptr, p0, a0, s0, o0, c0, d0, n0, p1, a1, s1, o1, c1, d1, n1, p2, a2, s2, o2, c2, d2, n2,
                     start1, start2, NUM: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                     NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr):
    # up to three weights (packed p, absmax a, nested absmax s, offset o, code table c, nested table d, n values)
    # written one after the other into out; programs [0, start1) decode weight 0, [start1, start2) weight 1, the
    # rest weight 2
    pid = tl.program_id(0)
    w = 0
    if NUM > 1:
        w = (pid >= start1).to(tl.int32)
        if NUM > 2:
            w += (pid >= start2).to(tl.int32)
    if w == 0:
        _blocks(out_ptr, p0, a0, s0, o0, c0, d0, n0, pid, BLOCK, ROWS, NESTED, NESTED_BLOCK, EMULATE_RNE)
    elif w == 1:
        _blocks(out_ptr + n0, p1, a1, s1, o1, c1, d1, n1, pid - start1, BLOCK, ROWS, NESTED, NESTED_BLOCK,
                EMULATE_RNE)
    else:
        _blocks(out_ptr + n0 + n1, p2, a2, s2, o2, c2, d2, n2, pid - start2, BLOCK, ROWS, NESTED, NESTED_BLOCK,
                EMULATE_RNE)


def _launch(out: Tensor, qs: Sequence) -> None:
    """One launch writing 1 to 3 compatible weights (same block sizes and nesting) one after the other."""
    q0 = qs[0]
    rows = max(1, ELEMS_PER_PROGRAM // q0.block_size)
    args, starts, total = [], [], 0
    for q in list(qs) + [q0] * (3 - len(qs)):  # unused slots repeat weight 0 (never reached)
        n = math.prod(q.shape)
        nested = (q.nested_absmax, q.nested_offset) if q0.nested else (q.absmax, q.absmax)
        args += [q.packed, q.absmax, *nested, q.code, q.nested_code, n]
        starts.append(total)
        total += cdiv(cdiv(n, q0.block_size), rows)
    # enable_fp_fusion=False: no fused multiply-add, the reference rounds after the nested multiply
    _dequant4_kernel[(starts[len(qs)] if len(qs) < 3 else total,)](
        out, *args, starts[1], starts[2], NUM=len(qs), BLOCK=q0.block_size, ROWS=rows,
        NESTED=q0.nested, NESTED_BLOCK=q0.nested_block_size, EMULATE_RNE=interpreting(), num_warps=4,
        enable_fp_fusion=False)


def dequantize_4bit_into(out: Tensor, qs: Sequence) -> Tensor:
    """Write 4-bit weights one after the other into the flat buffer `out` (one weight, or e.g. q, k, v stacked by
    rows): one launch per run of up to three weights of the same block sizes and nesting.

    Args:
        out: contiguous 1-D bf16 / fp16 / fp32 tensor of the weights' total number of values, on CUDA (or on the CPU
            under Triton's interpreter).
        qs: `slimtune.quant.codecs.fourbit.Quant4bit`s (anything with their fields) whose `code` and `nested_code`
            tables are set.
    Returns:
        `out`.
    Raises:
        ValueError: `out` is not a contiguous float vector of the weights' total size, or a table is missing.
    """
    sizes = [math.prod(q.shape) for q in qs]
    if out.dim() != 1 or not out.is_contiguous() or out.numel() != sum(sizes) or not out.is_floating_point():
        raise ValueError(f"dequantize_4bit_into: out must be a contiguous float vector of {sum(sizes)} values, got "
                         f"{tuple(out.shape)} {out.dtype}")
    if any(q.code is None or q.nested_code is None for q in qs):
        raise ValueError("dequantize_4bit_into: give every weight its code and nested_code tables")
    i, o = 0, 0
    while i < len(qs):
        j = i + 1
        while j < len(qs) and j - i < 3 and _compatible(qs[i], qs[j]):
            j += 1
        if sum(sizes[i:j]):
            _launch(out[o:o + sum(sizes[i:j])], qs[i:j])
        o, i = o + sum(sizes[i:j]), j
    return out


def _compatible(a, b) -> bool:
    """Whether two weights can share a launch: the same block sizes and nesting (compile-time constants)."""
    return (a.block_size, a.nested, a.nested_block_size) == (b.block_size, b.nested, b.nested_block_size)
