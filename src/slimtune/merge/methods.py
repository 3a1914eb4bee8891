"""The per-tensor math of model merging: linear, task arithmetic, TIES, DARE and SLERP.

Semantics of `weight`, `density`, `normalize`, `lambda`, `rescale` and `t` follow mergekit (arcee-ai/mergekit:
merge_methods/generalized_task_arithmetic.py, linear.py, slerp.py, sparsify.py), so a mergekit YAML means the same
merge. Deliberate differences: everything is computed in fp32 (mergekit computes in the config's dtype); the TIES trim
keeps every entry tied with the k-th largest |delta| (mergekit's argsort breaks ties arbitrarily); DARE rescales by
exactly 1 / (1 - p), as in the DARE paper (mergekit now rescales by the realised L1-norm ratio, ~ the same), with its
own seeded random stream. Whole-tensor statistics (the TIES threshold, the SLERP angle) are separate first passes so
that `stream.py` can compute them chunk by chunk.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

DOT_THRESHOLD = 0.9995  # |cos| above this: the two tensors are nearly parallel and SLERP falls back to lerp
NORM_EPS = 1e-8  # a tensor with a smaller L2 norm is not normalised (mergekit's slerp eps)
DARE_BLOCK = 2**20  # DARE's random stream is drawn per block of this many elements (of the flattened tensor)


# ---- linear -------------------------------------------------------------------------------------------------------
def linear(tensors: list[Tensor], weights: list[float], normalize: bool = True) -> Tensor:
    """Weighted average sum_i w_i theta_i, divided by sum_i w_i when `normalize` (mergekit's default for linear).

    Model soups (Wortsman et al. 2022) average fine-tuned weights this way.
    """
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for w, t in zip(weights, tensors):
        out.add_(t, alpha=w)
    if normalize:
        out.div_(sum(weights))
    return out


# ---- TIES trim: the exact k-th largest |delta|, found in two passes over chunks -------------------------------------
def _count(hist: Tensor, idx: Tensor) -> None:
    """hist[v] += number of v in idx (int32 values in [0, 65536)); scatter_add is ~100x faster than a
    minlength-65536 bincount on small chunks (torch 2.13 CPU)."""
    idx = idx.long()
    hist.scatter_add_(0, idx, torch.ones_like(idx))


def topk_thresholds(passes: Callable[[], Iterable[list[Tensor]]], ks: list[int]) -> list[float]:
    """For each of n streams of non-negative values, the exact k-th largest value, without holding a whole stream.

    Radix select on the fp32 bit pattern: for x >= 0 the int32 bits of x sort like x, so a histogram of the high 16
    bits finds the bucket holding the k-th largest, and a second histogram of the low 16 bits inside that bucket
    finds the value itself. Memory: two 65536-bin histograms per stream, whatever the tensor size. A stream that
    comes in one chunk is answered directly by `torch.kthvalue` (the same value, without the histograms).

    Args:
        passes: called twice; each call returns an iterator over chunks, each chunk a list of n fp32 tensors of
            non-negative values (one per stream; chunks of one stream together cover it exactly once).
        ks: the rank wanted in each stream (1 = the largest); each between 1 and the stream's length.
    Returns:
        The n threshold values; `x >= threshold` keeps at least k values (more only when values tie with it).
    """
    n = len(ks)
    chunks = iter(passes())
    first = next(chunks)
    second = next(chunks, None)
    if second is None:  # one chunk: the k-th largest is the (len - k + 1)-th smallest
        return [float(x.reshape(-1).float().kthvalue(x.numel() - k + 1).values) for x, k in zip(first, ks)]
    hi = [torch.zeros(65536, dtype=torch.int64) for _ in range(n)]
    for chunk in (first, second, *chunks):
        for i, x in enumerate(chunk):
            bits = x.reshape(-1).float().view(torch.int32)
            _count(hi[i], bits >> 16)
    buckets, rest = [], []
    for i in range(n):
        # count from the top bucket down: the first bucket where the running count reaches k holds the k-th largest
        above = hi[i].flip(0).cumsum(0)
        j = int(torch.searchsorted(above, ks[i]))
        bucket = 65535 - j
        buckets.append(bucket)
        rest.append(ks[i] - (int(above[j - 1]) if j > 0 else 0))  # rank still wanted inside the bucket
    lo = [torch.zeros(65536, dtype=torch.int64) for _ in range(n)]
    for chunk in passes():
        for i, x in enumerate(chunk):
            bits = x.reshape(-1).float().view(torch.int32)
            _count(lo[i], bits[(bits >> 16) == buckets[i]] & 0xFFFF)
    out = []
    for i in range(n):
        j = int(torch.searchsorted(lo[i].flip(0).cumsum(0), rest[i]))
        bits = torch.tensor([(buckets[i] << 16) | (65535 - j)], dtype=torch.int32)
        out.append(float(bits.view(torch.float32)))
    return out


def trim_count(density: float, numel: int) -> int | None:
    """How many entries TIES keeps: int(density * numel) as in mergekit (at least 1); None keeps all (density >= 1)."""
    return None if density >= 1 else max(1, int(density * numel))


def magnitude_trim(delta: Tensor, density: float) -> Tensor:
    """TIES trim (Yadav et al. 2023, step 1) of a whole tensor: keep the top `density` fraction of |delta|."""
    k = trim_count(density, delta.numel())
    if k is None:
        return delta
    (thr,) = topk_thresholds(lambda: [[delta.abs()]], [k])
    return delta * (delta.abs() >= thr)


# ---- DARE: seeded Bernoulli drop and rescale ----------------------------------------------------------------------
def dare_seed(seed: int, key: str, block: int) -> int:
    """A 63-bit generator seed for one block of one tensor of one model, from the global seed and the names."""
    h = hashlib.blake2b(f"{seed}\0{key}\0{block}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def dare_uniform(seed: int, key: str, numel: int, start: int, n: int) -> Tensor:
    """Uniform [0, 1) draws for elements [start, start + n) of a tensor of `numel` elements.

    The draws are made per fixed block of DARE_BLOCK elements of the flattened tensor, each block from its own
    generator seeded by (seed, key, block), so they depend only on the seed, the key (tensor and model) and the
    position: the same for any chunking, any machine.
    """
    parts = []
    first, last = start // DARE_BLOCK, (start + n - 1) // DARE_BLOCK
    for b in range(first, last + 1):
        g = torch.Generator().manual_seed(dare_seed(seed, key, b))
        parts.append(torch.rand(min(DARE_BLOCK, numel - b * DARE_BLOCK), generator=g))
    u = torch.cat(parts) if len(parts) > 1 else parts[0]
    off = start - first * DARE_BLOCK
    return u[off:off + n]


def dare_keep(seed: int, key: str, numel: int, start: int, n: int, density: float) -> Tensor:
    """The keep-mask (True with probability `density`) of elements [start, start + n), from `dare_uniform`."""
    return dare_uniform(seed, key, numel, start, n) < density


def dare_drop(delta: Tensor, keep: Tensor, density: float, rescale: bool = True) -> Tensor:
    """DARE (Yu et al. 2024, "Language Models are Super Mario"): drop each delta entry with p = 1 - density and
    rescale the survivors by 1 / (1 - p) = 1 / density, which keeps the expected delta unchanged."""
    out = delta * keep.view(delta.shape)
    return out / density if rescale else out


# ---- task arithmetic / TIES / DARE: combine the (sparsified) deltas ----------------------------------------------
def combine(base: Tensor, deltas: list[Tensor], weights: list[float], consensus: bool, normalize: bool,
            lam: float = 1.0) -> Tensor:
    """base + lam * mix(w_i delta_i), mergekit's generalized task arithmetic.

    Without consensus (task arithmetic, dare_linear): mix = sum_i w_i delta_i, divided by sum_i w_i when `normalize`.
    With consensus (TIES steps 2-3, dare_ties): each entry's sign is elected as the sign of sum_i w_i delta_i (>= 0
    counts as +), and only the entries whose weighted delta has that sign are summed ("disjoint merge"); with
    `normalize` they are divided by the sum of the weights of the entries kept (a weighted disjoint mean).
    Shapes: base and each delta (...); weights one float per delta.
    """
    if not deltas:
        return base.clone()
    wd = [d * w for d, w in zip(deltas, weights)]  # n x (...)
    if consensus:
        total = torch.stack(wd).sum(0) if len(wd) > 1 else wd[0].clone()
        elected = torch.where(total >= 0, 1.0, -1.0)  # (...)
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for d, w in zip(wd, weights):
            agree = d.sign() == elected  # zero entries (trimmed or dropped) never agree
            mixed.add_(d * agree)
            divisor.add_(agree.to(base.dtype), alpha=w)
        divisor[divisor == 0] = 1
    else:
        mixed = torch.stack(wd).sum(0) if len(wd) > 1 else wd[0].clone()
        divisor = sum(weights)
        if abs(divisor) < 1e-8:
            divisor = 1.0
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return base + mixed


def task_arithmetic(base: Tensor, models: list[Tensor], weights: list[float], normalize: bool = False,
                    lam: float = 1.0) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023): base + lam * sum_i w_i (theta_i - base)."""
    return combine(base, [m - base for m in models], weights, consensus=False, normalize=normalize, lam=lam)


def ties(base: Tensor, models: list[Tensor], weights: list[float], densities: list[float], normalize: bool = True,
         lam: float = 1.0) -> Tensor:
    """TIES-Merging (Yadav et al. 2023) of whole tensors: trim each delta to its top `density`, elect signs, merge."""
    deltas = [magnitude_trim(m - base, d) for m, d in zip(models, densities)]
    return combine(base, deltas, weights, consensus=True, normalize=normalize, lam=lam)


def dare(base: Tensor, models: list[Tensor], weights: list[float], densities: list[float], seed: int, name: str,
         use_ties: bool, normalize: bool = False, rescale: bool = True, lam: float = 1.0) -> Tensor:
    """dare_linear (use_ties False) or dare_ties of whole tensors; model i's drop mask is keyed by f"{name}#{i}"."""
    deltas = []
    for i, (m, d) in enumerate(zip(models, densities)):
        delta = m - base
        if d < 1:
            keep = dare_keep(seed, f"{name}#{i}", delta.numel(), 0, delta.numel(), d)
            delta = dare_drop(delta, keep, d, rescale)
        deltas.append(delta)
    return combine(base, deltas, weights, consensus=use_ties, normalize=normalize, lam=lam)


# ---- SLERP --------------------------------------------------------------------------------------------------------
def slerp_factors(t: float, dot: float, norm0: float, norm1: float) -> tuple[float, float]:
    """The coefficients (s0, s1) of slerp(t, v0, v1) = s0 v0 + s1 v1, from dot = <v0, v1> and the two L2 norms.

    With cos = <v0/|v0|, v1/|v1|> and theta = arccos(cos): s0 = sin((1-t) theta) / sin theta, s1 = sin(t theta) /
    sin theta (Shoemake 1985), applied to the unnormalised tensors as mergekit does. When |cos| > DOT_THRESHOLD the
    tensors are nearly parallel, sin theta ~ 0, and it falls back to lerp: s0 = 1 - t, s1 = t.
    """
    u0 = norm0 if norm0 > NORM_EPS else 1.0
    u1 = norm1 if norm1 > NORM_EPS else 1.0
    cos = dot / (u0 * u1)
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


def slerp(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """Spherical interpolation of two whole tensors (t = 0 gives v0, the base model; t = 1 gives v1)."""
    a, b = v0.double(), v1.double()
    s0, s1 = slerp_factors(t, float((a * b).sum()), float(a.norm()), float(b.norm()))
    return (s0 * v0.float() + s1 * v1.float())
