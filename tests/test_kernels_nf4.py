"""The one-pass 4-bit dequantize kernel against `slimtune.quant.codecs.fourbit.dequantize_4bit`: bitwise equal in fp32,
bf16 and fp16 (the reference rounds once from fp32, as the kernel), for odd sizes, partial blocks, block sizes 16 to
4096, double quantization over several nested blocks and a checkpoint's own code table; written into slices of one
buffer; and int64 offsets past 2^31 values on the GPU."""
import pytest
import torch
from kernel_helpers import DEV, needs_cuda, needs_triton
from torch import nn

from slimtune import kernels
from slimtune.kernels import nf4
from slimtune.kernels.nf4 import dequantize_4bit_into
from slimtune.models.projections import stacked_weight
from slimtune.quant.codecs.bnb import FourBitCodec
from slimtune.quant.codecs.fourbit import Quant4bit, dequantize_4bit, quantize_4bit, with_tables
from slimtune.quant.linear import QuantLinear


def dequantize_4bit_fast(q, dtype, kernels=True):
    """The codec's dequantize with the kernel forced on (the interpreter on the CPU)."""
    with kernels_mode("on"):
        return dequantize_4bit(q, dtype)


def reference(q, dtype):
    with kernels_mode("off"):
        return dequantize_4bit(q, dtype)


kernels_mode = kernels.use

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@needs_triton
@pytest.mark.parametrize("n,block,nested,fmt", [
    (1001, 64, True, "nf4"),  # odd: the last byte's low nibble is padding; a partial last block
    (64 * 300 + 5, 64, True, "nf4"),  # 301 blocks: two nested blocks of 256
    (777, 16, False, "fp4"),
    (4096 + 3, 4096, False, "nf4"),  # one program per block; a 3-value last block
    (2 * 128, 128, True, "fp4"),
])
def test_kernel_equals_reference_bitwise(n, block, nested, fmt):
    torch.manual_seed(n)
    w = torch.randn(n, device=DEV) * torch.rand(n, device=DEV).pow(3)  # uneven scales across blocks
    q = quantize_4bit(w, fmt, block, nested)
    for dtype in DTYPES:
        got, want = dequantize_4bit_fast(q, dtype), reference(q, dtype)
        assert got.dtype == dtype and got.shape == q.shape
        assert torch.equal(got, want), (dtype, (got.float() - want.float()).abs().max())


@needs_triton
def test_checkpoint_tables_and_2d_shape():
    """A checkpoint's own 16- and 256-entry tables (here: permuted) are used, and the weight keeps its shape."""
    torch.manual_seed(1)
    q = quantize_4bit(torch.randn(48, 80, device=DEV), "nf4", 64, True)
    q.code = torch.randn(16, device=DEV)
    q.nested_code = torch.randn(256, device=DEV).sort().values
    got = dequantize_4bit_fast(q, torch.bfloat16)
    assert got.shape == (48, 80) and torch.equal(got, reference(q, torch.bfloat16))


@needs_triton
def test_into_slices_of_one_buffer():
    """q, k, v (different widths) dequantized into row slices of one stacked buffer equal their references."""
    torch.manual_seed(2)
    layers = [QuantLinear.from_weight(torch.randn(o, 96, device=DEV), None, "nf4", double_quant=dq)
              for o, dq in ((64, True), (32, False), (32, True))]
    buf = torch.full((128, 96), float("nan"), dtype=torch.bfloat16, device=DEV)
    o = 0
    for m in layers:
        dequantize_4bit_into(buf[o:o + m.out_features].view(-1), [with_tables(FourBitCodec.state(m))])
        o += m.out_features
    with kernels_mode("off"):
        want = torch.cat([m.dequantize(torch.bfloat16) for m in layers])
    assert torch.equal(buf, want)


@needs_triton
def test_group_one_launch_per_three_compatible_weights(monkeypatch):
    """Runs of up to three weights with the same layout share a launch, each with its own code tables; odd sizes;
    a differently nested one breaks the run."""
    torch.manual_seed(8)
    shapes_dq = [((7, 33), True), ((64, 5), True), ((3, 100), True), ((9, 9), True), ((16, 16), False)]
    qs = [quantize_4bit(torch.randn(s, device=DEV), "nf4", 64, dq) for s, dq in shapes_dq]
    qs[1].code = torch.randn(16, device=DEV)  # a checkpoint's own table, in the middle of a shared launch
    launches = []
    real = nf4._launch
    monkeypatch.setattr(nf4, "_launch", lambda out, group: launches.append(len(group)) or real(out, group))
    out = torch.full((sum(q.shape.numel() for q in qs),), float("nan"), device=DEV)
    nf4.dequantize_4bit_into(out, [with_tables(q) for q in qs])
    assert launches == [3, 1, 1]
    assert torch.equal(out, torch.cat([reference(q, torch.float32).view(-1) for q in qs]))
    with pytest.raises(ValueError, match="contiguous float vector"):
        nf4.dequantize_4bit_into(out[:-1], [with_tables(q) for q in qs])


def test_stacked_weight_mixes_formats():
    """`stacked_weight` over a 4-bit, an int8 and a dense layer equals their weights stacked (reference path)."""
    torch.manual_seed(3)
    dense = nn.Linear(40, 24, bias=False).to(torch.bfloat16)
    layers = [QuantLinear.from_weight(torch.randn(16, 40), None, "nf4", double_quant=True),
              QuantLinear.from_weight(torch.randn(8, 40), None, "int8"), dense]
    want = torch.cat([layers[0].dequantize(torch.bfloat16), layers[1].dequantize(torch.bfloat16), dense.weight])
    assert torch.equal(stacked_weight(layers)(torch.bfloat16), want)


def test_bad_buffers_raise():
    q = quantize_4bit(torch.randn(100), "nf4", 64)
    with pytest.raises(ValueError, match="contiguous float vector of 100 values"):
        dequantize_4bit_into(torch.empty(99), [with_tables(q)])
    with pytest.raises(ValueError, match="contiguous float vector"):
        dequantize_4bit_into(torch.empty(10, 10), [with_tables(q)])
    with pytest.raises(ValueError, match="code and nested_code"):
        dequantize_4bit_into(torch.empty(100), [q])


@needs_cuda
def test_offsets_past_int32():
    """2^31 + 1000 values: the last blocks (flat index > 2^31) decode as the reference does on the same bytes."""
    n = 2 ** 31 + 1000
    g = torch.Generator(device="cuda").manual_seed(0)
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, device="cuda", generator=g)
    absmax = torch.rand(-(-n // 64), device="cuda", generator=g)
    out = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dequantize_4bit_into(out, [with_tables(Quant4bit(packed.reshape(-1, 1), absmax, torch.Size((n,)), torch.bfloat16))])
    tail = 64 * 100  # the last 100 blocks on their own (blocks are independent)
    start = (n - 1000) // 64 * 64 - tail
    q = Quant4bit(packed[start // 2:].reshape(-1, 1), absmax[start // 64:], torch.Size((n - start,)), torch.bfloat16)
    assert torch.equal(out[start:], reference(q, torch.bfloat16))
