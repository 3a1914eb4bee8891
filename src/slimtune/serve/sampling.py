"""Next-token choice for a batch whose rows each carry their own sampling settings: greedy rows take the argmax, the
others sample from softmax(logits / temperature) after their own top-k and top-p (the order of `process_logits`),
with noise drawn from a hash of (seed, step, token), so a seeded request gives the same text whatever it is batched with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF


@dataclass
class RowSampling:
    """One request's settings: temperature 0 = greedy; top_k 0 and top_p 1 disable those filters."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


def filter_logits(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Per-row temperature, then top-k, then top-p, as `slimtune.generate.process_logits` does for one setting.

    Args:
        logits: (B, V) fp32; temperature: (B,) > 0; top_k: (B,) int, 0 = off; top_p: (B,) in (0, 1].
    Returns:
        (B, V) scaled logits with the filtered tokens at -inf.
    """
    x = logits / temperature[:, None]
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        V = x.shape[-1]
        srt, idx = x.sort(dim=-1, descending=True)
        k = torch.where(top_k > 0, top_k.clamp(max=V), V)
        kth = srt.gather(1, (k - 1)[:, None])  # (B, 1): ties with the k-th value are kept, as process_logits
        srt = srt.masked_fill(srt < kth, float("-inf"))
        probs = srt.softmax(-1)
        nucleus = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p < 1)[:, None]  # mass before reached top_p
        drop = nucleus | (srt == float("-inf"))
        x = x.masked_fill(torch.empty_like(drop).scatter_(1, idx, drop), float("-inf"))
    return x


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (multiply-xorshift; constant 0x45d9f3b < 2^27, so int64 products never overflow)."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & MASK32
    return x ^ (x >> 16)


def hashed_uniform(seed: Tensor, step: Tensor, V: int) -> Tensor:
    """(B, V) uniforms in (0, 1), a fixed function of (seed (B,), step (B,), token index): exact in fp32 (24 bits)."""
    h = _mix32(_mix32(seed & MASK32) ^ ((seed >> 32) & MASK32))
    h = _mix32(h ^ (step & MASK32))  # (B,)
    v = torch.arange(V, device=seed.device)
    x = _mix32(_mix32(h[:, None] ^ v[None, :]) ^ 0x9E3779B9)
    return ((x >> 8).float() + 0.5) / float(1 << 24)


def sample(logits: Tensor, rows: list[RowSampling], steps: list[int]) -> Tensor:
    """The next token of each row (B,), long.

    Sampled rows use the Gumbel-max trick: argmax(filtered + g), g = -log(-log(u)), picks token i with probability
    softmax(filtered)_i exactly; u comes from `hashed_uniform(seed, step)`, so the choice depends on the row only.
    Args:
        logits: (B, V) fp32; rows: each row's settings; steps: how many tokens each row has generated so far.
    """
    out = logits.argmax(-1)
    hot = [i for i, r in enumerate(rows) if r.temperature > 0]
    if not hot:
        return out
    dev = logits.device
    sel = torch.tensor(hot, device=dev)
    t = torch.tensor([rows[i].temperature for i in hot], device=dev)
    k = torch.tensor([rows[i].top_k for i in hot], device=dev)
    p = torch.tensor([rows[i].top_p for i in hot], device=dev)
    x = filter_logits(logits[sel], t, k, p)
    seed = torch.tensor([rows[i].seed for i in hot], device=dev)
    step = torch.tensor([steps[i] for i in hot], device=dev)
    u = hashed_uniform(seed, step, x.shape[-1])
    out[sel] = (x - torch.log(-torch.log(u))).argmax(-1)
    return out
