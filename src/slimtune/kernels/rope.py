"""Rotary position embedding (rotate-half convention, as Llama / transformers) on q and k in one Triton launch:
out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1), x1 / x2 the two halves of the head dim.

With h = hd / 2: out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2, a linear map of x, so the backward is its transpose:
    dx1 = d1 c1 + d2 s2,   dx2 = d2 c2 - d1 s1      (cos, sin are constants: no gradient)
Each product and the sum are rounded to the output dtype as PyTorch's separate mul / add kernels do, so bf16
results equal the reference. Memory: the reference materializes rotate_half(x), x * cos, rotate_half(x) * sin and
their sum (4 tensors the size of q, and of k) per call; the kernel writes only the outputs and saves nothing but
cos and sin.
"""
from __future__ import annotations

import torch
from torch import Tensor

from slimtune.kernels import cast, enabled, interpreting, jit, next_pow2

tl = None  # triton.language, bound when a kernel is first launched (slimtune.kernels.jit)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """The decoder's RoPE: q (B, Hq, T, hd), k (B, Hk, T, hd), cos / sin (B, T, hd) broadcast over heads."""
    cos, sin = _heads(cos), _heads(sin)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _heads(c: Tensor) -> Tensor:
    """cos / sin as (B or 1, 1, T, hd): accepts (T, hd), (B, T, hd) or already (B, 1, T, hd)."""
    return c.unsqueeze(1) if c.dim() == 3 else c[None, None] if c.dim() == 2 else c


@jit
def _rotate(src, s_h, dst, d_h, n_heads, c1, c2, s1, s2, HALF: tl.constexpr, H_P: tl.constexpr,
            HALF_P: tl.constexpr, BACKWARD: tl.constexpr, EMULATE_RNE: tl.constexpr):
    # all heads of one token: (H_P, HALF_P) tiles of the two halves
    h = tl.arange(0, H_P)[:, None]
    d = tl.arange(0, HALF_P)[None, :]
    m = (h < n_heads) & (d < HALF)
    x1 = tl.load(src + h * s_h + d, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + h * s_h + HALF + d, mask=m, other=0.0).to(tl.float32)
    dt = dst.dtype.element_ty
    a1 = cast(x1 * c1, dt, EMULATE_RNE).to(tl.float32)  # each product rounded, as a separate PyTorch kernel
    a2 = cast(x2 * c2, dt, EMULATE_RNE).to(tl.float32)
    if BACKWARD:
        o1 = a1 + cast(x2 * s2, dt, EMULATE_RNE).to(tl.float32)
        o2 = a2 - cast(x1 * s1, dt, EMULATE_RNE).to(tl.float32)
    else:
        o1 = a1 - cast(x2 * s1, dt, EMULATE_RNE).to(tl.float32)
        o2 = a2 + cast(x1 * s2, dt, EMULATE_RNE).to(tl.float32)
    tl.store(dst + h * d_h + d, cast(o1, dt, EMULATE_RNE), mask=m)
    tl.store(dst + h * d_h + HALF + d, cast(o2, dt, EMULATE_RNE), mask=m)


@jit
def _rope_kernel(Q, K, C, S, QO, KO, T, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, so_b, so_h, so_t, sko_b, sko_h, sko_t,
                 sc_b, sc_t, n_qh, n_kh, HALF: tl.constexpr, HALF_P: tl.constexpr, QH_P: tl.constexpr,
                 KH_P: tl.constexpr, BACKWARD: tl.constexpr, EMULATE_RNE: tl.constexpr):
    # one program per token (b, t): cos / sin read once for all q and k heads
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    d = tl.arange(0, HALF_P)
    dm = d < HALF
    c = C + b * sc_b + t * sc_t
    s = S + b * sc_b + t * sc_t
    c1 = tl.load(c + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(c + HALF + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(s + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(s + HALF + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    _rotate(Q + b * sq_b + t * sq_t, sq_h, QO + b * so_b + t * so_t, so_h, n_qh, c1, c2, s1, s2, HALF, QH_P, HALF_P,
            BACKWARD, EMULATE_RNE)
    _rotate(K + b * sk_b + t * sk_t, sk_h, KO + b * sko_b + t * sko_t, sko_h, n_kh, c1, c2, s1, s2, HALF, KH_P,
            HALF_P, BACKWARD, EMULATE_RNE)


def _launch(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> tuple[Tensor, Tensor]:
    """Rotate q and k (B, H, T, hd), any strides with unit stride on hd; returns new contiguous tensors."""
    B, Hq, T, hd = q.shape
    Hk = k.shape[1]
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    c = _heads(cos).expand(B, 1, T, hd)[:, 0]  # (B, T, hd), stride 0 where broadcast
    s = _heads(sin).expand(B, 1, T, hd)[:, 0]
    if c.stride() != s.stride() or c.stride(-1) != 1:
        c, s = c.contiguous(), s.contiguous()
    dt = torch.promote_types(q.dtype, cos.dtype)
    qo = torch.empty(q.shape, dtype=dt, device=q.device)
    ko = torch.empty(k.shape, dtype=torch.promote_types(k.dtype, cos.dtype), device=k.device)
    if B * T:
        half = hd // 2
        _rope_kernel[(B * T,)](q, k, c, s, qo, ko, T, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                               k.stride(2), qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1),
                               ko.stride(2), c.stride(0), c.stride(1), Hq, Hk, HALF=half, HALF_P=next_pow2(half),
                               QH_P=next_pow2(Hq), KH_P=next_pow2(Hk), BACKWARD=backward, EMULATE_RNE=interpreting(),
                               num_warps=4, enable_fp_fusion=False)  # no fma: keep the reference's roundings
    return qo, ko


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = q.dtype, k.dtype
        return _launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq: Tensor, dk: Tensor):
        cos, sin = ctx.saved_tensors
        gq, gk = _launch(dq, dk, cos, sin, backward=True)
        return gq.to(ctx.dtypes[0]), gk.to(ctx.dtypes[1]), None, None


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
               kernels: bool | str | None = None) -> tuple[Tensor, Tensor]:
    """RoPE on queries and keys: the Triton kernel where enabled, else `rope_reference`.

    Args:
        q: (B, Hq, T, hd); k: (B, Hk, T, hd) (any strides, e.g. transposed views of (B, T, H, hd)); hd even.
        cos, sin: (B, T, hd), (1, T, hd), (T, hd) or (B, 1, T, hd); no gradient flows to them.
        kernels: False / "off" forces the reference.
    Returns:
        (q', k') of q's and k's shapes (contiguous (B, H, T, hd) from the kernel).
    Raises:
        ValueError: an odd head dim or shapes that disagree.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] % 2 or k.shape[-1] != q.shape[-1] or \
            (q.shape[0], q.shape[2]) != (k.shape[0], k.shape[2]):
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, H, T, hd), hd even")
    if not enabled(q.device, kernels):
        return rope_reference(q, k, cos, sin)
    return _RopeFunction.apply(q, k, cos, sin)
