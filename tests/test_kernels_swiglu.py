"""The SwiGLU kernel against silu(gate) * up: forward and both gradients on odd widths, row-strided views and a
packed (gate | up) input whose gradient comes back as one tensor. Tolerances: fp32 1e-6 of the reference (exp and
division differ in the last bit) and 1e-5 of the float64 truth; bf16 / fp16 within 1e-2 of the reference (the same
roundings: almost every value is bitwise equal)."""
import pytest
import torch
from kernel_helpers import DEV, needs_triton, rel

from slimtune.kernels.swiglu import swiglu, swiglu_packed, swiglu_reference


def _grads(fn, inputs):
    """[output, input gradients] for an output gradient drawn in fp32 (the same values for every dtype)."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    h = fn(*inputs)
    g = torch.Generator(device=h.device).manual_seed(3)
    h.backward(torch.randn(h.shape, generator=g, device=h.device).to(h.dtype))
    return [h] + [t.grad for t in inputs]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7, 37), (2, 1500), (1, 1, 5)])
def test_kernel_against_reference(dtype, shape):
    torch.manual_seed(shape[-1])
    g = torch.randn(shape, device=DEV, dtype=dtype) * 4
    u = torch.randn(shape, device=DEV, dtype=dtype)
    got = _grads(lambda a, b: swiglu(a, b, kernels=True), [g, u])
    ref = _grads(swiglu_reference, [g, u])
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel(a, b) < (1e-6 if dtype == torch.float32 else 1e-2)
    if dtype == torch.float32:
        truth = _grads(swiglu_reference, [g.double(), u.double()])
        assert all(rel(a, t) < 1e-5 for a, t in zip(got, truth))
    else:
        assert (got[0] != ref[0]).float().mean() < 0.01  # same roundings: almost all values identical


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_and_strided(dtype):
    """gate | up side by side in one (..., 2f) tensor, as a fused gate/up projection writes them."""
    torch.manual_seed(5)
    gu = torch.randn(4, 3, 2 * 45, device=DEV, dtype=dtype) * 3
    got = _grads(lambda t: swiglu_packed(t, kernels=True), [gu])
    ref = _grads(lambda t: swiglu_reference(*t.chunk(2, -1)), [gu])
    assert got[1].shape == gu.shape
    for a, b in zip(got, ref):
        assert rel(a, b) < (1e-6 if dtype == torch.float32 else 1e-2)
    g, u = gu.chunk(2, -1)  # the same views through the two-input op (row stride 90, width 45)
    got2 = _grads(lambda a, b: swiglu(a, b, kernels=True), [g, u])
    assert torch.equal(got2[0], got[0]) and torch.equal(torch.cat(got2[1:], -1), got[1])


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="differ"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="odd"):
        swiglu_packed(torch.randn(2, 5))
