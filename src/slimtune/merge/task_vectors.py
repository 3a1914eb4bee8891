"""Streamed generalized task arithmetic: task_arithmetic, TIES, DARE, Model Breadcrumbs and DELLA (+ their _ties /
_linear variants) of one tensor.

Each model's delta (model - base) is sparsified (magnitude top-k, DARE drop, breadcrumbs band, DELLA drop),
optionally rescaled, weighted and combined (sum or TIES sign consensus) as mergekit 0.1.5's
GeneralizedTaskArithmeticMerge does. Passes over the row chunks: thresholds (radix select), then L1 norms for
`rescale`, then the merged rows.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from slimtune.errors import ConfigError
from slimtune.merge import methods as M
from slimtune.merge import sparsify as S
from slimtune.merge.context import Ctx, Span


def _thresholds(ctx: Ctx, sp: list[Span], ranks: list[list[int]]) -> list[list[float]]:
    """For each model j, the values of rank ranks[j][...] (1 = largest) of |delta_j| over the whole tensor."""
    streams = [(j, k) for j, rs in enumerate(ranks) for k in rs]
    out: list[list[float]] = [[] for _ in ranks]
    if not streams:
        return out

    def passes():
        for s in sp:
            b, ms = ctx.rows(s)
            absd = {j: (ms[j] - b).abs_() for j in {j for j, _ in streams}}
            yield [absd[j] for j, _ in streams]

    for (j, _), v in zip(streams, M.topk_thresholds(passes, [k for _, k in streams])):
        out[j].append(v)
    return out


def _masks(ctx: Ctx, sp: list[Span], seed: int, dens: list[float]) -> list[Callable[[Span, Tensor], Tensor]]:
    """Per model, a function (span, delta rows) -> the rows with the dropped entries zeroed (not rescaled)."""
    job, kind = ctx.job, ctx.cfg.method.sparsify
    numel = torch.Size(job.shape).numel()
    row = numel // job.shape[0] if len(job.shape) > 1 and job.shape[0] else numel
    keys = [f"{job.name}#{m.index}" for m in ctx.members]

    def draws(j: int, s: Span, d: Tensor) -> Tensor:  # the model's seeded uniforms at these positions
        return M.dare_uniform(seed, keys[j], numel, s[0] * row if s else 0, d.numel()).view(d.shape)

    fns: list[Callable[[Span, Tensor], Tensor]] = []
    if kind in ("magnitude", "outliers"):
        if kind == "magnitude":
            ranks = [[k] if (k := M.trim_count(d, numel)) is not None else [] for d in dens]
        else:
            gam = [ctx.per(m, "gamma") for m in ctx.members]
            ranks = [S.outlier_ranks(d, g, numel) if d < 1 else [] for d, g in zip(dens, gam)]
        thr = _thresholds(ctx, sp, ranks)
        for j, d in enumerate(dens):
            if d >= 1:
                fns.append(lambda s, x: x)
            elif kind == "magnitude":
                fns.append(lambda s, x, t=thr[j][0]: x * (x.abs() >= t))
            else:
                hi, lo = thr[j] if len(thr[j]) == 2 else (None, thr[j][0] if thr[j] else None)
                fns.append(lambda s, x, hi=hi, lo=lo: x * S.band_mask(x.abs(), hi, lo))
    elif kind == "random":
        for j, d in enumerate(dens):
            fns.append((lambda s, x: x) if d >= 1 else (lambda s, x, j=j, d=d: x * (draws(j, s, x) < d)))
    elif kind == "della":
        for j, (m, d) in enumerate(zip(ctx.members, dens)):
            eps = ctx.per(m, "epsilon")
            why = S.check_della(d, eps)
            if why:
                raise ConfigError(f"{ctx.cfg.source}: della for {job.name} of {m.input.label}: {why}")
            fns.append((lambda s, x: x) if d >= 1 else
                       (lambda s, x, j=j, d=d, e=eps: x * (draws(j, s, x) < S.della_probs(x.abs(), d, e))))
    else:
        fns = [lambda s, x: x for _ in dens]
    return fns


def merge_gta(ctx: Ctx, sp: list[Span], seed: int) -> Iterator[Tensor]:
    """Yield the rows of base + lambda * mix_j(w_j * sparsify(model_j - base))."""
    method, job = ctx.cfg.method, ctx.job
    w = [ctx.per(m, "weight") for m in ctx.members]
    dens = [ctx.per(m, "density") for m in ctx.members]
    for m, d in zip(ctx.members, dens):
        if not 0 < d <= 1:
            raise ConfigError(f"{ctx.cfg.source}: density {d} for {job.name} of {m.input.label} is outside (0, 1]")
    norm, lam, rescale = ctx.shared("normalize"), ctx.shared("lambda"), ctx.shared("rescale")
    masks = _masks(ctx, sp, seed, dens)
    scale = [1.0] * len(dens)
    dare = rescale and method.sparsify == "random"  # DARE: survivors / (1 - p), as in the paper
    if rescale and method.sparsify not in (None, "random"):  # mergekit: ||delta||_1 / ||kept||_1 (pass 2)
        sums = torch.zeros(len(dens), 2, dtype=torch.float64)
        for s in sp:
            b, ms = ctx.rows(s)
            for j, m in enumerate(ms):
                d = m - b
                sums[j, 0] += d.abs().double().sum()
                sums[j, 1] += masks[j](s, d).abs().double().sum()
        scale = [S.l1_factor(float(a), float(k)) if dj < 1 else 1.0 for (a, k), dj in zip(sums.tolist(), dens)]
    for s in sp:
        b, ms = ctx.rows(s)
        deltas = []
        for j, m in enumerate(ms):
            d = masks[j](s, m - b)
            if dare and dens[j] < 1:
                d = d / dens[j]
            deltas.append(d * scale[j] if scale[j] != 1.0 else d)
        yield M.combine(b, deltas, w, consensus=method.consensus, normalize=norm, lam=lam)
