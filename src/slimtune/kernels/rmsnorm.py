"""RMSNorm as the decoder (and transformers' LlamaRMSNorm) computes it, y = w * (x * rsqrt(mean(x^2) + eps)) with
the statistic in fp32 and the normalized x rounded to x's dtype before the weight product; one Triton kernel
forward, one backward (both gradients).

Backward, per row of D values, r = rsqrt(mean(x^2) + eps), n = x r (fp32), g = dy * w:
    n_j = x_j r and dr/dx_k = -r^3 x_k / D, so dn_j/dx_k = r delta_jk - r^3 x_j x_k / D and
    dx_k = sum_j g_j dn_j/dx_k = r (g_k - n_k mean_j(g_j n_j));   dw = sum_rows dy * n (as rounded in forward).
Memory: autograd over the reference keeps an fp32 copy of x, the normalized x and rsqrt (6 bytes a value in bf16
plus 4 a row); the kernel keeps only r (4 bytes a row) besides x itself, and recomputes n in backward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from slimtune.kernels import cast, cdiv, enabled, interpreting, jit, next_pow2, sm_count

tl = None  # triton.language, bound when a kernel is first launched (slimtune.kernels.jit)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The decoder's RMSNorm in plain PyTorch (autograd differentiates it)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@jit
def _rms_fwd(X, W, Y, RSTD, n_cols, sx, sy, inv_n, eps, BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < n_cols
    x = tl.load(X + row * sx + cols, mask=m, other=0.0).to(tl.float32)
    r = tl.math.rsqrt(tl.sum(x * x, 0) * inv_n + eps)  # mean = sum * (1 / D), as PyTorch's mean
    xn = cast(x * r, X.dtype.element_ty, EMULATE_RNE).to(tl.float32)  # rounded to x's dtype, as the reference
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + row * sy + cols, cast(w * xn, Y.dtype.element_ty, EMULATE_RNE), mask=m)
    tl.store(RSTD + row, r)


@jit
def _rms_bwd(DY, X, W, RSTD, DX, DW, n_rows, n_cols, sdy, sx, sdx, inv_n,
             ROWS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr):
    # each program walks ROWS_PER_PROGRAM rows and keeps its own partial sum of dw (summed by the caller); the
    # count is a power of two known at compile time (few specializations; the interpreter cannot loop to a runtime
    # bound)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < n_cols
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, ROWS_PER_PROGRAM):
        row = pid.to(tl.int64) * ROWS_PER_PROGRAM + i
        rm = m & (row < n_rows)
        x = tl.load(X + row * sx + cols, mask=rm, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * sdy + cols, mask=rm, other=0.0).to(tl.float32)
        r = tl.load(RSTD + row, mask=row < n_rows, other=0.0)
        n = x * r
        dw += dy * cast(n, X.dtype.element_ty, EMULATE_RNE).to(tl.float32)
        g = dy * w
        dx = r * (g - n * (tl.sum(g * n, 0) * inv_n))
        tl.store(DX + row * sdx + cols, cast(dx, DX.dtype.element_ty, EMULATE_RNE), mask=rm)
    tl.store(DW + pid * n_cols + cols, dw, mask=m)


def _rows(t: Tensor) -> Tensor:
    """t as (rows, D) with unit stride along D (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x2 = _rows(x)
        M, D = x2.shape
        y = torch.empty(M, D, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        block = next_pow2(D)
        if M:
            _rms_fwd[(M,)](x2, weight, y, rstd, D, x2.stride(0), y.stride(0), 1.0 / D, eps, BLOCK=block,
                           EMULATE_RNE=interpreting(), num_warps=_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], D)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        M, D = x2.shape
        dx = torch.empty(M, D, dtype=x2.dtype, device=x2.device)
        per = next_pow2(cdiv(M, 4 * sm_count(x2.device)))  # rows per program: about 4 programs per SM
        programs = max(1, cdiv(M, per))
        dw = torch.empty(programs, D, dtype=torch.float32, device=x2.device)
        block = next_pow2(D)
        if M:
            _rms_bwd[(programs,)](dy2, x2, weight, rstd, dx, dw, M, D, dy2.stride(0), x2.stride(0), dx.stride(0),
                                  1.0 / D, ROWS_PER_PROGRAM=per, BLOCK=block, EMULATE_RNE=interpreting(),
                                  num_warps=_warps(block))
        gw = dw.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.x_shape), gw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float, kernels: bool | str | None = None) -> Tensor:
    """RMSNorm over the last dimension: the Triton kernel where enabled, else `rms_norm_reference`.

    Args:
        x: (..., D) any float dtype; weight: (D,); eps: added to the mean square.
        kernels: False / "off" forces the reference.
    Returns:
        (..., D) in the promoted dtype of x and weight.
    """
    if not enabled(x.device, kernels):
        return rms_norm_reference(x, weight, eps)
    return _RMSNormFunction.apply(x, weight, eps)
