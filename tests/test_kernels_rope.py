"""The RoPE kernel (q and k in one launch) against the decoder's rotate-half RoPE: forward and both gradients are
bitwise equal in fp32, bf16 and fp16 (every product and sum rounded once to the output dtype, as PyTorch's separate
kernels), for GQA head counts that are not powers of two, a head dim whose half is not one, q/k views into a fused
qkv output, and cos/sin of shape (B, T, hd), (1, T, hd) or the decoder's (B, 1, T, hd)."""
import pytest
import torch
from kernel_helpers import DEV, needs_triton

from slimtune.kernels.rope import apply_rope, rope_reference


def _qk_views(B, T, Hq, Hk, hd, dtype):
    """q (B, Hq, T, hd) and k (B, Hk, T, hd) as transposed views of one fused (B, T, (Hq + 2 Hk) hd) output."""
    qkv = torch.randn(B, T, (Hq + 2 * Hk) * hd, device=DEV, dtype=dtype)
    q = qkv[..., :Hq * hd].view(B, T, Hq, hd).transpose(1, 2)
    k = qkv[..., Hq * hd:(Hq + Hk) * hd].view(B, T, Hk, hd).transpose(1, 2)
    return q, k


def _cos_sin(B, T, hd, dtype):
    ang = torch.randn(B, T, hd // 2, device=DEV) * 3
    emb = torch.cat([ang, ang], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    """(x1, x2) -> (-x2, x1), written here independently of the library (transformers' rotate_half)."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def test_reference_is_the_decoders_rope():
    q, k = _qk_views(2, 5, 4, 2, 8, torch.bfloat16)
    cos, sin = _cos_sin(2, 5, 8, torch.bfloat16)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    rq, rk = rope_reference(q, k, cos, sin)
    assert torch.equal(rq, q * c + rotate_half(q) * s) and torch.equal(rk, k * c + rotate_half(k) * s)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,Hq,Hk,hd,cos_form", [(2, 5, 4, 2, 8, "btd"), (1, 7, 3, 1, 12, "1td"),
                                                   (2, 3, 6, 6, 24, "b1td")])
def test_kernel_equals_reference(dtype, B, T, Hq, Hk, hd, cos_form):
    torch.manual_seed(B * T + hd)
    q, k = _qk_views(B, T, Hq, Hk, hd, dtype)
    cos, sin = _cos_sin(B if cos_form != "1td" else 1, T, hd, dtype)
    if cos_form == "b1td":
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    outs, grads = [], []
    for kernels in (True, False):
        qq, kk = q.detach().requires_grad_(), k.detach().requires_grad_()
        oq, ok = apply_rope(qq, kk, cos, sin, kernels=kernels)
        g = torch.Generator(device=DEV).manual_seed(1)
        dq = torch.randn(oq.shape, generator=g, device=DEV, dtype=dtype)
        dk = torch.randn(ok.shape, generator=g, device=DEV, dtype=dtype)
        torch.autograd.backward([oq, ok], [dq, dk])
        outs.append((oq, ok))
        grads.append((qq.grad, kk.grad))
    for a, b in zip(outs[0] + grads[0], outs[1] + grads[1]):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()


def test_odd_head_dim_raises():
    with pytest.raises(ValueError, match="hd even"):
        apply_rope(torch.randn(1, 2, 3, 5), torch.randn(1, 1, 3, 5), torch.randn(1, 3, 5), torch.randn(1, 3, 5))
