"""Angle-based merges that need statistics of whole tensors (or whole rows / columns): Model Stock and NuSLERP.

Both are written as coefficients computed from dot products and norms, so that `tensor.py` can gather those
statistics chunk by chunk in float64 and then apply the coefficients to each chunk. Semantics follow mergekit 0.1.5
(merge_methods/model_stock.py, nuslerp.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

STOCK_EPS = 1e-6  # Model Stock: floor of |a| |b| in a cosine, and of |1 + (n - 1) cos| (below: keep the base)
NUSLERP_NORM_EPS = 1e-7  # NuSLERP: floor of a norm when normalising
NUSLERP_EPS = 1e-8  # NuSLERP: 1 - cos^2 <= eps^2 counts as colinear, and falls back to lerp


def pairs(n: int) -> list[tuple[int, int]]:
    """The pairs (i, j), i < j, of n offsets, in mergekit's order."""
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def stock_t(dots: Tensor, norms: Tensor) -> Tensor:
    """Model Stock's interpolation ratio (Jang et al. 2024): t = n cos / (1 + (n - 1) cos).

    Args:
        dots: (P, R) float64, <o_i, o_j> of the offsets o = w - w_base for each pair of `pairs(n)`, per row
            (R = 1 when the whole tensor is one vector).
        norms: (n, R) float64, |o_i| per row.
    Returns:
        (R,) t, with cos the mean pairwise cosine; t = 0 (the base) where 1 + (n - 1) cos is ~ 0.
    """
    n = norms.shape[0]
    cos = torch.stack([(dots[p] / (norms[i] * norms[j]).clamp(min=STOCK_EPS)).clamp(-1, 1)
                       for p, (i, j) in enumerate(pairs(n))]).mean(0)
    den = 1 + (n - 1) * cos
    singular = den.abs() < STOCK_EPS
    return torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(den), den))


def model_stock(base: Tensor, models: list[Tensor], filter_wise: bool = False) -> Tensor:
    """Model Stock of whole tensors: t * mean(models) + (1 - t) * base, t from the offsets' angles (per row when
    `filter_wise`, else one t for the flattened tensor)."""
    per_row = filter_wise and base.dim() > 1
    rows = (lambda x: x.double().reshape(-1, x.shape[-1])) if per_row else (lambda x: x.double().reshape(1, -1))
    offs = [rows(m) - rows(base) for m in models]
    dots = torch.stack([(offs[i] * offs[j]).sum(-1) for i, j in pairs(len(offs))])
    t = stock_t(dots, torch.stack([o.norm(dim=-1) for o in offs]))  # (R,)
    return stock_apply(base, models, t.reshape(-1, 1) if per_row else t.reshape(()))


def stock_apply(base: Tensor, models: list[Tensor], t: Tensor) -> Tensor:
    """t * mean(models) + (1 - t) * base in fp32; t a scalar or (R, 1) for rows (R, C)."""
    avg = sum(m.float() for m in models) / len(models)
    t = t.float()
    return t * avg + (1 - t) * base.float()


def nuslerp_factors(t: float, dot: Tensor, n0: Tensor, n1: Tensor) -> tuple[Tensor, Tensor]:
    """NuSLERP's coefficients (s0, s1) of s0 v0 + s1 v1 from <v0, v1> and the norms (any matching shapes, float64).

    cos = <v0 / |v0|, v1 / |v1|> (norms floored at NUSLERP_NORM_EPS), theta = arccos(cos): s0 = sin((1 - t) theta) /
    sin theta, s1 = sin(t theta) / sin theta; colinear vectors (1 - cos^2 <= NUSLERP_EPS^2) get lerp: 1 - t, t.
    """
    cos = (dot / (n0.clamp(min=NUSLERP_NORM_EPS) * n1.clamp(min=NUSLERP_NORM_EPS))).clamp(-1, 1)
    colinear = (1 - cos * cos) <= NUSLERP_EPS ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.sin(theta)
    s = torch.where(colinear, torch.ones_like(s), s)
    s0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / s)
    s1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / s)
    return s0, s1


def nuslerp_t(weights: list[float]) -> float:
    """The interpolation position of NuSLERP's two models from their weights: w1 / (w0 + w1) (0.5 when ~0)."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def nuslerp(t: float, v0: Tensor, v1: Tensor, flatten: bool = True, row_wise: bool = False) -> Tensor:
    """NuSLERP of whole tensors: one angle for the flattened tensors, else one per row (last dim) or per column
    (`row_wise`: mergekit's dim 0, vectors along the rows)."""
    a, b = v0.double(), v1.double()
    if flatten or a.dim() < 2:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    s0, s1 = nuslerp_factors(t, (a * b).sum(-1, keepdim=True), a.norm(dim=-1, keepdim=True),
                             b.norm(dim=-1, keepdim=True))
    out = s0 * a + s1 * b
    if not (flatten or v0.dim() < 2) and row_wise:
        out = out.transpose(0, -1)
    return out.reshape(v0.shape).float()
