"""LoRA linear layers with few launches: y = x W^T + b + sum_i s_i (x A_i^T) B_i^T, for one projection or several
that share their input (q,k,v; gate,up), through one autograd Function with a hand-written backward.

The frozen base W (stacked by rows for several projections) is a dense tensor or a callable that dequantizes it
(`slimtune.models.projections` builds these calls from the decoder's LoRA / quantized layers);
it is dequantized again in backward, never saved. The fp32 master factors are cast to the compute dtype (that of
x) once per call (one concatenation, one cast); the adapter math then runs in that dtype (as Unsloth), gradients
reach the masters in fp32. Dropout p > 0 falls back to autograd over the same ops for the adapter part.

`base_last`: the adapters' node first, then the frozen base product in a node of its own that saves no tensor
(y = z + x W^T in one addmm; W is loaded again in backward). PyTorch's non-reentrant checkpoint stops its recompute
once the last saved tensor is back, so for a block's last projection (the MLP's down) the recompute never reaches
that product: d f of the 2 d^2 + 2 d kv + 3 d f multiply-adds per token of a block's matmuls (kv = the k / v width;
at d 4096, kv 1024, f 14336: 27% of the recompute), with no memory added. The price: the two nodes' input
gradients are summed by autograd (one (M, in) add).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


# the frozen base: (O, in) dense, one dense (out_p, in) per projection, or dtype -> (O, in) dequantized
WeightSource = Tensor | Sequence[Tensor] | Callable[[torch.dtype], Tensor]
Adapter = tuple[Tensor, Tensor, float, int]  # A (r, in), B (out_p, r), scale s, index p of the projection


@dataclass(frozen=True)
class _Plan:
    """How to get W, and where each adapter reads (x A^T columns) and writes (y columns)."""

    load: Callable[[torch.dtype], Tensor] | None  # dequantizes the stacked W (else `weight` is given)
    split: tuple[Tensor, ...] | None  # dense per-projection weights, multiplied one by one (no stacking copy)
    out_cols: tuple[tuple[int, int], ...]  # per adapter: output columns (o0, o1) of its projection
    rank_cols: tuple[tuple[int, int], ...]  # per adapter: columns (r0, r1) of x A_cat^T
    scales: tuple[float, ...]
    width: int = 0  # O, the stacked projections' outputs
    base: bool = True  # False: the adapters only (`base_last`: the base product is `_FrozenBase`'s)


_OUT_DTYPE_MM: dict[str, bool] = {}  # device type -> torch.mm(..., out_dtype=float32) works there


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 (or wider) result: cuBLAS writes fp32 directly where torch.mm takes out_dtype."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    kind = a.device.type
    if _OUT_DTYPE_MM.get(kind, kind == "cuda"):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_MM[kind] = False
    return (a @ b).float()


def _cast_flat(ts: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """All of `ts`, flattened and concatenated, in `dtype`: two kernels whatever their number (CUDA's cat runs one
    batched kernel only when its inputs and output share a dtype, else one copy per input)."""
    flat = torch.cat([t.reshape(-1) for t in ts])
    return flat if flat.dtype == dtype else flat.to(dtype)


def _unflatten(flat: Tensor, shapes: Sequence[torch.Size], n: int) -> tuple[Tensor, list[Tensor]]:
    """(A_cat (R, in), [B_i]) as views of the flat cast buffer: the n A's first (rows stacked), then the B's."""
    R = sum(s[0] for s in shapes[:n])
    d_in = shapes[0][1]
    A_cat = flat[:R * d_in].view(R, d_in)
    Bs, o = [], R * d_in
    for s in shapes[n:]:
        Bs.append(flat[o:o + s.numel()].view(s))
        o += s.numel()
    return A_cat, Bs


class _LoraFunction(torch.autograd.Function):
    """Forward: y = x2 W^T + b; xa = x2 A_cat^T (M, R); y[:, cols_i] += s_i xa_i B_i^T (in-place addmm_).

    Backward: y = x W^T + s (x A^T) B^T is linear in each of x, A, B, so with g = dL/dy, dL/dx = g W + s (g B) A,
    dL/dB = s g^T (x A^T), dL/dA = s (g B)^T x. Per adapter i (g_i: the columns of its projection p_i, M rows):
        gs_i = s_i g_i B_i                      (M, r_i), written into one (M, R) buffer gs
        dx   = g W + gs A_cat                   (W dequantized again, not saved)
        dA_i = gs_i^T x2  = s_i (g_i B_i)^T x   (fp32 out: one (R, in) matmul for all adapters)
        dB_i = s_i g_i^T xa_i                   (reuses xa saved in forward)
        db   = sum_rows g
    Memory: saves x (the caller's tensor), xa (M, R) and the cast factors; LoraLinear over QuantLinear saves an
    fp32 copy of x and x A^T per adapter (q,k,v: three fp32 copies of x, 100 MB at 2048 tokens of width 4096).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, plan: _Plan, *factors: Tensor) -> Tensor:
        cd = x.dtype
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        y = _base_forward(x2, weight, bias, plan, cd) if plan.base else x2.new_zeros(x2.shape[0], plan.width)  # (M, O)
        n = len(plan.scales)
        xa = flat = None
        if n:
            flat = _cast_flat(factors, cd)
            A_cat, Bs = _unflatten(flat, [f.shape for f in factors], n)
            xa = x2 @ A_cat.t()  # (M, R)
            for (o0, o1), (r0, r1), s, B in zip(plan.out_cols, plan.rank_cols, plan.scales, Bs):
                y[:, o0:o1].addmm_(xa[:, r0:r1], B.t(), alpha=s)
        ctx.save_for_backward(x, weight, xa, flat)
        ctx.plan, ctx.shapes = plan, [f.shape for f in factors]
        ctx.dtypes = [f.dtype for f in factors] + [None if bias is None else bias.dtype]
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, xa, flat = ctx.saved_tensors
        plan, n, cd = ctx.plan, len(ctx.plan.scales), x.dtype
        need = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        g = dy.reshape(-1, dy.shape[-1]).to(cd)  # (M, O)
        gx = gs = None
        grads_A, grads_B = [None] * n, [None] * n
        if n:
            A_cat, Bs = _unflatten(flat, ctx.shapes, n)
            if need[0] or any(need[4:4 + n]):
                gs = torch.empty(x2.shape[0], A_cat.shape[0], dtype=cd, device=x.device)  # (M, R)
                for (o0, o1), (r0, r1), s, B in zip(plan.out_cols, plan.rank_cols, plan.scales, Bs):
                    gs[:, r0:r1].addmm_(g[:, o0:o1], B, beta=0, alpha=s)
            if any(need[4:4 + n]):
                gA = _mm_f32(gs.t(), x2)  # (R, in)
                grads_A = [gA[r0:r1].to(dt) if need[4 + i] else None
                           for i, ((r0, r1), dt) in enumerate(zip(plan.rank_cols, ctx.dtypes))]
            for i, ((o0, o1), (r0, r1), s) in enumerate(zip(plan.out_cols, plan.rank_cols, plan.scales)):
                if need[4 + n + i]:
                    gB = _mm_f32(g[:, o0:o1].t(), xa[:, r0:r1])  # (out_p, r_i)
                    grads_B[i] = (gB if s == 1 else gB.mul_(s)).to(ctx.dtypes[n + i])
        if need[0]:
            gx = _base_input_grad(g, weight, plan, cd) if plan.base else None  # (M, in)
            if gs is not None:
                gx = gs @ A_cat if gx is None else gx.addmm_(gs, A_cat)
            gx = gx.view(x.shape)  # (a plan without the base has adapters: gs is set)
        gb = g.sum(0, dtype=torch.promote_types(cd, torch.float32)).to(ctx.dtypes[-1]) if need[2] else None
        return (gx, None, gb, None, *grads_A, *grads_B)


class _FrozenBase(torch.autograd.Function):
    """y = z + x W^T + b with a frozen W, saving no tensor: dL/dx = g W (W loaded again), dL/dz = g, dL/db = sum g.
    (W is held by the plan, as in `_LoraFunction`'s backward, not saved: nothing for a checkpoint to recompute.)"""

    @staticmethod
    def forward(ctx, x: Tensor, z: Tensor, weight: Tensor | None, bias: Tensor | None, plan: _Plan) -> Tensor:
        x2, z2 = x.reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1])  # (M, in), (M, O)
        y = _base_forward(x2, weight, bias, plan, x.dtype, acc=z2)
        ctx.weight, ctx.plan, ctx.shape, ctx.bias_dtype = weight, plan, x.shape, None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: Tensor):
        need, cd = ctx.needs_input_grad, dy.dtype
        g = dy.reshape(-1, dy.shape[-1])
        gx = _base_input_grad(g, ctx.weight, ctx.plan, cd).view(ctx.shape) if need[0] else None
        gb = g.sum(0, dtype=torch.promote_types(cd, torch.float32)).to(ctx.bias_dtype) if need[3] else None
        return gx, dy if need[1] else None, None, gb, None


def _base_forward(x2: Tensor, weight: Tensor | None, bias: Tensor | None, plan: _Plan, cd: torch.dtype,
                  acc: Tensor | None = None) -> Tensor:
    """acc + x2 W^T + b (M, O) (acc None: nothing added): one matmul over the stacked W (or the one dense W), else one
    per dense projection into its columns."""
    b = None if bias is None else bias.to(cd)
    ws = [plan.load(cd) if weight is None else weight.to(cd)] if plan.split is None else [w.to(cd) for w in plan.split]
    if len(ws) == 1:
        if acc is None:
            return x2 @ ws[0].t() if b is None else torch.addmm(b, x2, ws[0].t())
        y = torch.addmm(acc, x2, ws[0].t())
    else:
        if acc is None:
            y = torch.empty(x2.shape[0], sum(w.shape[0] for w in ws), dtype=cd, device=x2.device)
        else:
            y = acc.clone()
        o = 0
        for W in ws:  # beta=0 without acc: the uninitialized columns are ignored
            y[:, o:o + W.shape[0]].addmm_(x2, W.t(), beta=0 if acc is None else 1)
            o += W.shape[0]
    return y if b is None else y.add_(b)


def _base_input_grad(g: Tensor, weight: Tensor | None, plan: _Plan, cd: torch.dtype) -> Tensor:
    """g W (M, in), with W loaded again (dequantized) or taken projection by projection."""
    if plan.split is None:
        return g @ (plan.load(cd) if weight is None else weight.to(cd))
    gx, o = None, 0
    for W in plan.split:
        gp = g[:, o:o + W.shape[0]]
        gx = gp @ W.to(cd) if gx is None else gx.addmm_(gp, W.to(cd))
        o += W.shape[0]
    return gx


def _plan(adapters: Sequence[Adapter], parts: Sequence[int], d_in: int, load: Callable[[torch.dtype], Tensor] | None,
          split: tuple[Tensor, ...] | None) -> _Plan:
    """Column ranges of each adapter; checks the factor shapes against `parts` and `d_in`."""
    starts = [sum(parts[:p]) for p in range(len(parts))]
    out_cols, rank_cols, scales, r = [], [], [], 0
    for A, B, s, p in adapters:
        if not 0 <= p < len(parts) or A.shape[1] != d_in or B.shape != (parts[p], A.shape[0]):
            raise ValueError(f"LoRA factors A {tuple(A.shape)}, B {tuple(B.shape)} do not fit projection {p} of "
                             f"widths {list(parts)} over {d_in} inputs")
        out_cols.append((starts[p], starts[p] + parts[p]))
        rank_cols.append((r, r + A.shape[0]))
        scales.append(float(s))
        r += A.shape[0]
    return _Plan(load, split, tuple(out_cols), tuple(rank_cols), tuple(scales), sum(parts))


def _adapter_delta(x: Tensor, adapters: Sequence[Adapter], parts: Sequence[int], dropout: float,
                   training: bool) -> Tensor:
    """sum_i s_i drop(x) A_i^T B_i^T placed in the columns of projection p_i: (..., sum parts), x's dtype."""
    per_part: list[Tensor | None] = [None] * len(parts)
    for A, B, s, p in adapters:
        xd = F.dropout(x, dropout, training) if dropout > 0 else x
        d = F.linear(F.linear(xd, A.to(x.dtype)), B.to(x.dtype)) * s
        per_part[p] = d if per_part[p] is None else per_part[p] + d
    return torch.cat([d if d is not None else x.new_zeros(*x.shape[:-1], w) for d, w in zip(per_part, parts)], -1)


def lora_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, adapters: Sequence[Adapter] = (),
                          parts: Sequence[int] | None = None, dropout: float = 0.0, training: bool = False) -> Tensor:
    """Plain autograd version of `lora_linear` with a dense W (the reference of the tests)."""
    parts = [weight.shape[0]] if parts is None else list(parts)
    y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return y + _adapter_delta(x, adapters, parts, dropout, training) if adapters else y


def lora_linear(x: Tensor, weight: WeightSource, bias: Tensor | None = None, adapters: Sequence[Adapter] = (),
                parts: Sequence[int] | None = None, dropout: float = 0.0, training: bool = False,
                base_last: bool = False) -> Tensor:
    """y = x W^T + b + sum_i s_i (drop(x) A_i^T) B_i^T, the adapters writing into the columns of their projection.

    Args:
        x: (..., in) in the compute dtype (bf16 / fp16 / fp32).
        weight: the frozen base: (O, in) dense; a list of dense (out_p, in), one per projection (one matmul each,
            no stacking copy); or a callable dtype -> (O, in) (e.g. `stacked_weight`), called once in forward and
            once in backward.
        bias: frozen (O,) or None (its gradient is returned if it requires one).
        adapters: (A (r, in), B (out_p, r), scale, p) per adapter; ranks may differ; several may share p.
        parts: widths of the stacked projections (sum O); default one projection of W's rows.
        dropout, training: LoRA dropout on x; p > 0 while training takes the autograd fallback.
        base_last: the base product last, in a node that saves nothing (see the module docstring).
    Returns:
        (..., O) in x's dtype; split it with `y.split(parts, -1)` (whose backward is one concatenation).
    Raises:
        ValueError: factor shapes that do not fit, a trainable base weight, `parts` missing for a callable.
    """
    dense = isinstance(weight, Tensor)
    split = tuple(weight) if isinstance(weight, (list, tuple)) else None
    if any(w.requires_grad for w in ([weight] if dense else split or [])):
        raise ValueError("lora_linear: the base weight must be frozen (requires_grad=False)")
    if parts is None:
        if not dense and split is None:
            raise ValueError("lora_linear: give `parts` (the output widths) with a dequantizing callable")
        parts = [weight.shape[0]] if dense else [w.shape[0] for w in split]
    plan = _plan(adapters, list(parts), x.shape[-1], None if dense or split else weight, split)
    base = weight if dense else None
    if base_last and adapters:
        factors = [a[0] for a in adapters] + [a[1] for a in adapters]
        if dropout > 0 and training:
            z = _adapter_delta(x, adapters, list(parts), dropout, training)
        else:
            z = _LoraFunction.apply(x, None, None, dataclasses.replace(plan, load=None, split=None, base=False),
                                    *factors)
        return _FrozenBase.apply(x, z, base, bias, plan)
    if dropout > 0 and training and adapters:
        y = _LoraFunction.apply(x, base, bias, _Plan(plan.load, split, (), (), ()))
        return y + _adapter_delta(x, adapters, list(parts), dropout, training)
    factors = [a[0] for a in adapters] + [a[1] for a in adapters]
    return _LoraFunction.apply(x, base, bias, plan, *factors)
