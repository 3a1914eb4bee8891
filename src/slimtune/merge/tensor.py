"""Merge one output tensor, chunk of rows by chunk of rows, for every method of `config.METHODS`.

Statistics of a whole tensor (the TIES / breadcrumbs thresholds, the L1 norms of `rescale`, the SLERP / NuSLERP
angles, Model Stock's cosines) are gathered in first passes over the same row chunks; the last pass yields the merged
rows. Peak memory is a few chunks of every input, whatever the tensor size. Task-vector methods are in
`task_vectors.py`.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from slimtune.errors import ConfigError
from slimtune.merge import geometric as G
from slimtune.merge import methods as M
from slimtune.merge.context import CHUNK_ELEMS, Ctx, Span, spans
from slimtune.merge.plan import Plan
from slimtune.merge.task_vectors import merge_gta

def merge_tensor(plan: Plan, name: str, seed: int, chunk: int = CHUNK_ELEMS) -> Iterator[Tensor]:
    """Yield the merged tensor `name` in fp32 row chunks (in order), following the plan's method and parameters."""
    job = plan.jobs[name]
    family = plan.cfg.method.family
    every = family in ("linear", "passthrough")
    ctx = Ctx(plan, job, job.members if every else job.others)
    yield from FAMILIES[family](ctx, spans(job.shape, chunk), seed)


def _linear(ctx: Ctx, sp: list[Span], seed: int) -> Iterator[Tensor]:
    w = [ctx.per(m, "weight") for m in ctx.members]
    norm = ctx.shared("normalize")
    if norm and abs(sum(w)) < 1e-8:
        raise ConfigError(f"{ctx.cfg.source}: the weights for {ctx.job.name} sum to {sum(w):g}, and normalize divides "
                          "by that sum; fix: weights that do not cancel, or normalize: false")
    for s in sp:
        yield M.linear(ctx.rows(s)[1], w, norm)


def _passthrough(ctx: Ctx, sp: list[Span], seed: int) -> Iterator[Tensor]:
    scale = ctx.per(ctx.members[0], "scale")
    for s in sp:
        (x,) = ctx.rows(s)[1]
        yield x if scale is None else x * scale


def _slerp(ctx: Ctx, sp: list[Span], seed: int) -> Iterator[Tensor]:
    t = ctx.shared("t")
    if not 0 <= t <= 1:
        raise ConfigError(f"{ctx.cfg.source}: t = {t} for {ctx.job.name} is outside [0, 1]")
    dot = n0 = n1 = 0.0
    for s in sp:  # pass 1: the angle between the whole tensors, accumulated in float64
        b, (m,) = ctx.rows(s)
        b64, m64 = b.double(), m.double()
        dot += float((b64 * m64).sum())
        n0 += float((b64 * b64).sum())
        n1 += float((m64 * m64).sum())
    s0, s1 = M.slerp_factors(t, dot, n0 ** 0.5, n1 ** 0.5)
    for s in sp:
        b, (m,) = ctx.rows(s)
        yield b * s0 + m * s1


def _nuslerp(ctx: Ctx, sp: list[Span], seed: int) -> Iterator[Tensor]:
    t = G.nuslerp_t([ctx.per(m, "weight") for m in ctx.members])
    flatten, row_wise = ctx.shared("nuslerp_flatten"), ctx.shared("nuslerp_row_wise")
    whole = flatten or len(ctx.job.shape) < 2

    def vecs(s: Span) -> tuple[Tensor | None, Tensor, Tensor]:
        b, (x, y) = ctx.rows(s)
        return b, (x - b if b is not None else x), (y - b if b is not None else y)

    stats = None
    if whole or row_wise:  # pass 1: one angle for the tensor, or one per column
        dims = None if whole else 0
        for s in sp:
            _, x, y = vecs(s)
            x, y = x.double(), y.double()
            part = torch.stack([(x * y).sum(dims) if dims is not None else (x * y).sum(),
                                (x * x).sum(dims) if dims is not None else (x * x).sum(),
                                (y * y).sum(dims) if dims is not None else (y * y).sum()])
            stats = part if stats is None else stats + part
        s0, s1 = G.nuslerp_factors(t, stats[0], stats[1].sqrt(), stats[2].sqrt())
    for s in sp:
        b, x, y = vecs(s)
        if not (whole or row_wise):  # one angle per row
            x64, y64 = x.double(), y.double()
            s0, s1 = G.nuslerp_factors(t, (x64 * y64).sum(-1, keepdim=True), x64.norm(dim=-1, keepdim=True),
                                       y64.norm(dim=-1, keepdim=True))
        out = s0.float() * x + s1.float() * y
        yield out + b if b is not None else out


def _model_stock(ctx: Ctx, sp: list[Span], seed: int) -> Iterator[Tensor]:
    per_row = ctx.shared("filter_wise") and len(ctx.job.shape) > 1
    pairs = G.pairs(len(ctx.members))

    def stats(s: Span) -> tuple[Tensor, Tensor]:
        b, ms = ctx.rows(s)
        offs = [(m - b).double() for m in ms]
        offs = [o.reshape(o.shape[0], -1) if per_row else o.reshape(1, -1) for o in offs]
        return (torch.stack([(offs[i] * offs[j]).sum(-1) for i, j in pairs]),
                torch.stack([(o * o).sum(-1) for o in offs]))

    if not per_row:  # pass 1: the cosines of the whole offsets
        dots = sq = 0
        for s in sp:
            d, q = stats(s)
            dots, sq = dots + d, sq + q
        t = G.stock_t(dots, sq.sqrt()).reshape(())
    for s in sp:
        if per_row:
            d, q = stats(s)
            t = G.stock_t(d, q.sqrt()).reshape(-1, *([1] * (len(ctx.job.shape) - 1)))
        b, ms = ctx.rows(s)
        yield G.stock_apply(b, ms, t)


FAMILIES = {"linear": _linear, "passthrough": _passthrough, "slerp": _slerp, "nuslerp": _nuslerp,
            "model_stock": _model_stock, "gta": merge_gta}
