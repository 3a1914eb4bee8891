"""SwiGLU's gate, h = silu(g) * u (Llama / Mistral / Qwen MLPs), in one Triton kernel forward and one backward.

With sig = 1 / (1 + exp(-g)) and silu(g) = g sig:
    dh/du = silu(g)                          -> du = dh * silu(g)
    d silu/dg = sig + g sig (1 - sig) = sig (1 + g (1 - sig))
                                             -> dg = (dh * u) * sig * (1 + g (1 - sig))
silu(g) and dh * u are rounded to the input dtype as PyTorch's separate kernels do (bf16 results agree with the
reference to about one rounding). Memory: autograd over the reference saves g, u and silu(g) (3 tensors of
(tokens, ffn)); the kernel saves g and u and recomputes silu(g): one (tokens, ffn) tensor less per MLP.
`swiglu_packed` takes gate and up side by side in one (..., 2f) tensor (the output of a fused gate/up projection)
and returns its gradient as one tensor, so no concatenation is needed in backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slimtune.kernels import cast, cdiv, enabled, interpreting, jit

tl = None  # triton.language, bound when a kernel is first launched (slimtune.kernels.jit)
BLOCK = 1024  # values per program along the ffn dimension


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up in plain PyTorch (autograd differentiates it)."""
    return F.silu(gate) * up


@jit
def _swiglu_fwd(G, U, H, n_cols, sg, su, sh, BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n_cols
    g = tl.load(G + row * sg + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + row * su + cols, mask=m, other=0.0).to(tl.float32)
    s = cast(g / (1.0 + tl.exp(-g)), G.dtype.element_ty, EMULATE_RNE).to(tl.float32)  # PyTorch's silu formula
    tl.store(H + row * sh + cols, cast(s * u, H.dtype.element_ty, EMULATE_RNE), mask=m)


@jit
def _swiglu_bwd(DH, G, U, DG, DU, n_cols, sdh, sg, su, sdg, sdu, BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n_cols
    dh = tl.load(DH + row * sdh + cols, mask=m, other=0.0).to(tl.float32)
    g = tl.load(G + row * sg + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + row * su + cols, mask=m, other=0.0).to(tl.float32)
    e = tl.exp(-g)
    s = cast(g / (1.0 + e), G.dtype.element_ty, EMULATE_RNE).to(tl.float32)
    tl.store(DU + row * sdu + cols, cast(dh * s, DU.dtype.element_ty, EMULATE_RNE), mask=m)
    t = cast(dh * u, G.dtype.element_ty, EMULATE_RNE).to(tl.float32)  # grad of silu(g), rounded
    sig = 1.0 / (1.0 + e)
    tl.store(DG + row * sdg + cols, cast(t * sig * (1.0 + g * (1.0 - sig)), DG.dtype.element_ty, EMULATE_RNE),
             mask=m)


def _grid(rows: int, f: int) -> tuple[int, int]:
    return rows, cdiv(f, BLOCK)


def _rows(t: Tensor) -> Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _forward(g: Tensor, u: Tensor) -> Tensor:
    """h (rows, f) from 2-D g, u (unit column stride, any row stride)."""
    h = torch.empty(g.shape, dtype=torch.promote_types(g.dtype, u.dtype), device=g.device)
    if h.numel():
        _swiglu_fwd[_grid(*g.shape)](g, u, h, g.shape[1], g.stride(0), u.stride(0), h.stride(0), BLOCK=BLOCK,
                                     EMULATE_RNE=interpreting(), num_warps=4)
    return h


def _backward(dh: Tensor, g: Tensor, u: Tensor, dg: Tensor, du: Tensor) -> None:
    """Write dg, du (2-D views, unit column stride) from dh, g, u."""
    if dh.numel():
        _swiglu_bwd[_grid(*g.shape)](dh, g, u, dg, du, g.shape[1], dh.stride(0), g.stride(0), u.stride(0),
                                     dg.stride(0), du.stride(0), BLOCK=BLOCK, EMULATE_RNE=interpreting(), num_warps=4)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        g, u = _rows(gate), _rows(up)
        ctx.save_for_backward(g, u)
        ctx.shape = gate.shape
        return _forward(g, u).view(gate.shape)

    @staticmethod
    def backward(ctx, dh: Tensor):
        g, u = ctx.saved_tensors
        dg, du = torch.empty_like(g), torch.empty_like(u)
        _backward(_rows(dh), g, u, dg, du)
        return dg.view(ctx.shape), du.view(ctx.shape)


class _PackedSwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gu: Tensor) -> Tensor:
        gu2 = _rows(gu)  # (rows, 2f): gate | up
        f = gu2.shape[1] // 2
        ctx.save_for_backward(gu2)
        ctx.shape = gu.shape
        return _forward(gu2[:, :f], gu2[:, f:]).view(*gu.shape[:-1], f)

    @staticmethod
    def backward(ctx, dh: Tensor):
        (gu2,) = ctx.saved_tensors
        f = gu2.shape[1] // 2
        dgu = torch.empty_like(gu2)  # one buffer: the fused projection's output gradient
        _backward(_rows(dh), gu2[:, :f], gu2[:, f:], dgu[:, :f], dgu[:, f:])
        return dgu.view(ctx.shape)


def swiglu(gate: Tensor, up: Tensor, kernels: bool | str | None = None) -> Tensor:
    """silu(gate) * up: the Triton kernel where enabled, else `swiglu_reference`.

    Args:
        gate, up: (..., f) of one shape (any row strides, unit stride on f).
        kernels: False / "off" forces the reference.
    Returns:
        (..., f).
    Raises:
        ValueError: shapes that differ.
    """
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    if not enabled(gate.device, kernels):
        return swiglu_reference(gate, up)
    return _SwiGLUFunction.apply(gate, up)


def swiglu_packed(gate_up: Tensor, kernels: bool | str | None = None) -> Tensor:
    """silu(g) * u for g, u = gate_up.chunk(2, -1) (a fused gate/up output (..., 2f)); returns (..., f).
    Raises ValueError for an odd last dimension."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu_packed: the last dimension of {tuple(gate_up.shape)} is odd")
    if not enabled(gate_up.device, kernels):
        g, u = gate_up.chunk(2, -1)
        return swiglu_reference(g, u)
    return _PackedSwiGLUFunction.apply(gate_up)
