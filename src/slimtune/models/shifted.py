"""LongLoRA's shifted sparse attention, S^2-Attn (Chen et al. 2023, "LongLoRA: Efficient Fine-tuning of Long-Context
Large Language Models", section 3.2 and Algorithm 1), used in training only: the tokens are split into groups of G and
attend causally within their group; in the second half of the heads the groups are shifted by G/2, so that
information flows between neighbouring groups. Inference keeps full attention.

The paper's pseudocode rolls the shifted heads by -G/2 before grouping, which puts the last G/2 tokens and the first
G/2 into one group, where the first tokens see the last (a look into the future). The authors' CUDA path
(`flash_attn_varlen_qkvpacked_func` with group boundaries G/2, 3G/2, ...) keeps those two half groups apart; so does
this file: shifted groups are [0, G/2), [G/2, 3G/2), ..., and every token sees only earlier tokens of its group.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
from torch import Tensor

AttnFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None", bool], Tensor]


def segments(T: int, start: int, G: int) -> list[tuple[int, int]]:
    """The groups [a, b) of T positions when group boundaries sit at start, start + G, ...: [0, start) first (when
    start > 0), then full groups of G, then what is left."""
    out = [(0, start)] if start else []
    a = start
    while a < T:
        out.append((a, min(a + G, T)))
        a += G
    return out


def layout(segs: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """Index (n, L) of n segments padded to the longest, L, and the mask (n, L) of real slots, on the CPU. A padding
    slot repeats its segment's last position: it comes after every real slot, so causal attention never reaches it."""
    L = max(b - a for a, b in segs)
    ar = torch.arange(L)
    start = torch.tensor([a for a, _ in segs])[:, None]
    end = torch.tensor([b for _, b in segs])[:, None]
    return torch.minimum(start + ar, end - 1), (start + ar) < end


def _attend_segments(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, idx: Tensor, real: Tensor,
                     attn: AttnFn) -> Tensor:
    """Attention within each segment of the layout idx, real (n, L), all segments in one batched call.
    Returns (B, h, n L, hd)."""
    B, h, _, hd = q.shape
    n, L = idx.shape

    def grouped(x: Tensor) -> Tensor:  # (B, heads, T, hd) -> (B n, heads, L, hd)
        return x[:, :, idx].transpose(1, 2).reshape(B * n, x.shape[1], L, x.shape[-1])

    m = None
    if mask is not None:  # the model's mask within each segment, causal over the slots, padding keys hidden
        m = mask[:, 0][:, idx[:, :, None], idx[:, None, :]]  # (B, n, L, L)
        slots = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        m = (m & slots & real[:, None, :]) | (torch.eye(L, dtype=torch.bool, device=q.device) & ~real[:, :, None])
        m = m.reshape(B * n, 1, L, L)
    out = attn(grouped(q), grouped(k), grouped(v), m, m is None)  # (B n, h, L, hd)
    return out.reshape(B, n, h, L, hd).transpose(1, 2).reshape(B, h, n * L, hd)


@lru_cache(maxsize=64)
def plan(T: int, start: int, G: int, device: torch.device) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """The layouts of `segments(T, start, G)` on `device`, full groups in one and the (at most two) shorter ones in
    another, and the slot (T,) of each position's output among theirs. Cached: built on the CPU and copied once per
    length, not in every layer and step (nor inside a CUDA-graph capture)."""
    segs = segments(T, start, G)
    full = [s for s in segs if s[1] - s[0] == G]
    layouts, pos = [], []
    for group in (full, [s for s in segs if s not in full]):
        if group:
            idx, real = layout(group)
            layouts.append((idx.to(device), real.to(device)))
            pos.append(torch.where(real, idx, -1).flatten())
    pos = torch.cat(pos)  # the position held by each output slot, -1 for padding
    slot = torch.empty(T, dtype=torch.long)
    slot[pos[pos >= 0]] = torch.nonzero(pos >= 0).flatten()
    return layouts, slot.to(device)


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, start: int, G: int,
                      attn: AttnFn) -> Tensor:
    """Causal attention within the groups `segments(T, start, G)`: full groups in one call, the (at most two) shorter
    ones in another. q (B, h, T, hd), k, v (B, hkv, T, hd), mask None (causal) or bool (B, 1, T, T).
    Returns (B, h, T, hd)."""
    layouts, slot = plan(q.shape[2], start, G, q.device)
    outs = [_attend_segments(q, k, v, mask, idx, real, attn) for idx, real in layouts]
    return torch.cat(outs, 2).index_select(2, slot)


def shifted_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, G: int, attn: AttnFn) -> Tensor:
    """S^2-Attn: heads [0, nh/2) attend within groups [0, G), [G, 2G), ...; heads [nh/2, nh) within groups shifted by
    G/2. When one group covers the sequence (T <= G) this is plain causal attention.

    Args:
        q: (B, nh, T, hd); k, v: (B, nkv, T, hd), nh a multiple of nkv (grouped-query attention).
        mask: None (causal) or boolean (B, 1, T, T), True = may attend (padding, packed examples).
        G: the group size. attn(q, k, v, mask, is_causal): the attention to run on each batch of groups.
    Returns:
        (B, nh, T, hd).
    """
    nh, T = q.shape[1], q.shape[2]
    if T <= G:
        return attn(q, k, v, mask, mask is None)
    h1, r = nh // 2, nh // k.shape[1]
    if h1 % r:  # the halves would split the query heads of one key/value head: give each query head its own
        k, v, r = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), 1
    shifted = grouped_attention(q[:, h1:], k[:, h1 // r:], v[:, h1 // r:], mask, G // 2, G, attn)
    if h1 == 0:  # one head: shifted only
        return shifted
    plain = grouped_attention(q[:, :h1], k[:, :h1 // r], v[:, :h1 // r], mask, 0, G, attn)
    return torch.cat([plain, shifted], 1)
