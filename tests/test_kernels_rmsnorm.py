"""The RMSNorm kernel against the decoder's RMSNorm: forward and both gradients on random shapes (odd widths, 1 to
many rows, strided input) and dtypes. Tolerances: fp32 1e-6 (forward) / 1e-5 (gradients, a different summation
order); bf16 / fp16 within 1e-2 of the reference and no farther from the float64 truth than the reference is (plus
one rounding), the kernel keeping its intermediates in fp32 where autograd rounds them."""
import pytest
import torch
from kernel_helpers import DEV, needs_triton, rel

from slimtune.kernels.rmsnorm import rms_norm, rms_norm_reference
from slimtune.models.layers import RMSNorm

SHAPES = [(3, 5, 37), (64, 128), (1, 1, 130), (2, 300)]


def test_reference_is_the_decoders_rmsnorm():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        norm = RMSNorm(48, 1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(3, 7, 48, dtype=dtype)
        assert torch.equal(rms_norm(x, norm.weight, 1e-5, kernels="off"), norm(x))


def _run(x, w, eps, kernels, dy):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = rms_norm(x, w, eps, kernels=kernels) if kernels else rms_norm_reference(x, w, eps)
    y.backward(dy.to(y.dtype))
    return y, x.grad, w.grad


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_kernel_against_reference(shape, dtype, wdtype):
    torch.manual_seed(sum(shape))
    x = torch.randn(shape, device=DEV, dtype=dtype) * 3
    w = torch.rand(shape[-1], device=DEV, dtype=wdtype) + 0.5
    dy = torch.randn(shape, device=DEV).to(torch.promote_types(dtype, wdtype))
    got = _run(x, w, 1e-6, True, dy)
    ref = _run(x, w, 1e-6, False, dy)
    truth = _run(x.double(), w.double(), 1e-6, False, dy)
    assert got[0].dtype == ref[0].dtype and got[1].dtype == dtype and got[2].dtype == wdtype
    if dtype == torch.float32:
        assert rel(got[0], ref[0]) < 1e-6
        assert rel(got[1], ref[1]) < 1e-5 and rel(got[2], ref[2]) < 1e-5
        return
    for a, b, t in zip(got, ref, truth):
        assert rel(a, b) < 1e-2
        assert rel(a, t) <= rel(b, t) + 2 ** -8  # no worse than the reference beyond one rounding of bf16


@needs_triton
def test_strided_input_and_fp32_against_float64():
    """A column slice of a wider tensor (row stride != width); fp32 kernel within 1e-5 of the float64 gradients."""
    torch.manual_seed(3)
    wide = torch.randn(6, 4, 90, device=DEV)
    x = wide[..., 10:74]  # (6, 4, 64), row stride 90
    w = torch.rand(64, device=DEV) + 0.5
    dy = torch.randn(x.shape, device=DEV)
    got = _run(x, w, 1e-5, True, dy)
    truth = _run(x.double(), w.double(), 1e-5, False, dy)
    for a, t in zip(got, truth):
        assert rel(a, t) < 1e-5
