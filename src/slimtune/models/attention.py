"""Self-attention of the decoder and its seams: `rotate` (RoPE through `slimtune.kernels.rope`, a fused kernel on
CUDA; partial rotary) and `attend`, the one place where q, k, v meet (PyTorch SDPA; the math path for Gemma 2's
soft-capped scores; LongLoRA's shifted sparse attention, `shifted.py`, when `Attention.s2_group` is set in training).
q/k/v and o run through `models.projections.project`; the cos / sin come from `models.rope`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from slimtune.kernels.rope import apply_rope
from slimtune.models.config import ModelConfig
from slimtune.models.layers import RMSNorm
from slimtune.models.projections import project
from slimtune.models.shifted import shifted_attention

# With a KV cache the key length changes every step; cuDNN attention (the default on Hopper) builds a new plan per
# shape (measured: 63 ms a decode step on an H100, flash 0.6 ms), so decoding uses flash, or math for masks.
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def rotate(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """RoPE on q (B, nh, T, hd) and k (B, nkv, T, hd) with cos / sin (B, T, rd) (`kernels.rope.apply_rope`); with
    rd < hd (partial rotary, the Phi-3 family) only the first rd features turn, the rest pass unchanged."""
    rd, hd = cos.shape[-1], q.shape[-1]
    if rd == hd:
        return apply_rope(q, k, cos, sin)
    (q, q_pass), (k, k_pass) = q.split([rd, hd - rd], -1), k.split([rd, hd - rd], -1)
    q, k = apply_rope(q, k, cos, sin)
    return torch.cat([q, q_pass], -1), torch.cat([k, k_pass], -1)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, decode: bool,
           scale: float | None = None, softcap: float | None = None, group: int | None = None) -> Tensor:
    """softmax(q k^T * scale + mask) v for q (B, nh, T, hd), k and v (B, nkv, S, hd), grouped-query when
    nh > nkv; mask: boolean (B, 1, T, S), True = may attend; scale defaults to hd ** -0.5. Returns (B, nh, T, hd).

    Training lets PyTorch pick the SDPA backend (flash / memory-efficient / cuDNN: none builds an S x S matrix);
    decoding (`decode`: a KV cache whose length changes every step) uses flash or math, see DECODE_BACKENDS.
    `softcap` (Gemma 2) needs the scores themselves, so it runs `softcapped_attention`, which builds them.
    `group` (LongLoRA's S^2-Attn, self-attention without a cache, S == T): attention within groups of `group` tokens,
    shifted by group / 2 in half of the heads (`shifted.shifted_attention`), each batch of groups through this function.
    """
    if group and not decode and q.shape[2] > group:
        return shifted_attention(q, k, v, mask, group,
                                 lambda *a: attend(*a, decode=False, scale=scale, softcap=softcap))
    if softcap is not None:
        return softcapped_attention(q, k, v, mask, is_causal, scale, softcap)
    kw = dict(attn_mask=mask, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1], scale=scale)
    if not decode:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    with sdpa_kernel(DECODE_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def softcapped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool,
                         scale: float | None, softcap: float) -> Tensor:
    """Attention with Gemma 2's logit soft-capping: softmax(c * tanh(q k^T * scale / c) + mask) v, the softmax in
    fp32 and its result cast back to q's dtype, as transformers' eager Gemma 2 attention (its SDPA path drops the cap).

    Cost: the math path. The scores (B, nh, T, S) exist in q's dtype, and backward keeps tanh's output (q's dtype)
    and the fp32 probabilities: about (2 x itemsize + 4) * B * nh * T * S bytes a layer (bf16, B=1, nh=16, T=S=4096:
    2 GiB a layer) where flash attention keeps O(B * nh * T). A fused kernel (flex_attention's score_mod, or
    FlashAttention's softcap) would remove it; this is the reference it must match.
    """
    nh, nkv, T, S = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if nh != nkv:  # query head h reads key/value head h // (nh / nkv)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)  # (B, nh, T, S)
    s = torch.tanh(s / softcap) * softcap
    if is_causal:  # query t (at position S - T + t) sees keys up to its own position
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)  # as transformers adds: exp underflows to 0
    return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


class Attention(nn.Module):
    """Grouped-query self-attention: nh query heads share nkv key/value heads (nh % nkv == 0).

    q/k/v come from q_proj, k_proj, v_proj, or (Phi-3, `fused_proj`) from one qkv_proj whose output is [q; k; v]
    (nh*hd, nkv*hd, nkv*hd features); the fused layer stays one module under transformers' name, so state dicts
    and PEFT adapters (which target qkv_proj for Phi-3) keep the checkpoint's layout.
    `prefix` (set by prefix tuning) is an optional module returning (k, v), each (B, nkv, P, hd): P extra key/value
    positions that every query sees. `s2_group` (set by LongLoRA): in training, attention within shifted groups of
    that many tokens (S^2-Attn); None, in eval mode, with a cache or a prefix: full attention.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        d, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.nh, self.nkv, self.hd, self.layer_idx = nh, nkv, hd, layer_idx
        if cfg.fused_proj:
            self.qkv_proj = nn.Linear(d, (nh + 2 * nkv) * hd, bias=cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(d, nh * hd, bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(d, nkv * hd, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(d, nkv * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, d, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3, Gemma 3: RMSNorm over each head's hd features, before RoPE
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.norm_offset)
        self.scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None  # Gemma
        self.softcap = cfg.attn_softcap
        self.prefix: nn.Module | None = None
        self.s2_group: int | None = None

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, T, nh, hd), k and v (B, T, nkv, hd) of x (B, T, d)."""
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj"):
            qkv = project(x, [self.qkv_proj])[0]
            q, k, v = qkv.split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], -1)
        else:
            q, k, v = project(x, [self.q_proj, self.k_proj, self.v_proj])  # one fused call on CUDA
        return q.view(B, T, self.nh, self.hd), k.view(B, T, self.nkv, self.hd), v.view(B, T, self.nkv, self.hd)

    def forward(self, x: Tensor, cos: Tensor | None, sin: Tensor | None, mask: Tensor | None,
                cache=None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cos is not None:
            q, k = rotate(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, past + T, hd)
        is_causal = mask is None and T > 1  # build_mask returns None for T > 1 only when past == 0
        if self.prefix is not None:
            pk, pv = self.prefix(B)
            P = pk.shape[2]
            k, v = torch.cat([pk.to(k.dtype), k], 2), torch.cat([pv.to(v.dtype), v], 2)
            if mask is None:  # build the causal mask this fast path skipped
                S = k.shape[2] - P
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)[None, None]
            mask = torch.cat([mask.new_ones(*mask.shape[:-1], P), mask], -1)  # every query sees the prefix
            is_causal = False
        group = self.s2_group if self.training and cache is None and self.prefix is None else None
        y = attend(q, k, v, mask, is_causal, cache is not None, self.scale, self.softcap, group)  # (B, nh, T, hd)
        return project(y.transpose(1, 2).reshape(B, T, self.nh * self.hd), [self.o_proj])[0]
