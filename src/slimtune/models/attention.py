"""Self-attention of the decoder and its seams: rotary position embeddings (RoPE, with linear / llama3 scaling) and
`attend`, the one place where q, k, v meet (PyTorch SDPA today; kernels and LongLoRA's shifted attention plug in here).
RoPE runs through `slimtune.kernels.rope` (a fused kernel on CUDA, its PyTorch reference elsewhere).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from slimtune.kernels.rope import apply_rope
from slimtune.models.config import ModelConfig
from slimtune.models.layers import RMSNorm
from slimtune.models.projections import project

# With a KV cache the key length changes every step; cuDNN attention (the default on Hopper) builds a new plan per
# shape (measured: 63 ms a decode step on an H100, flash 0.6 ms), so decoding uses flash, or math for masks.
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies theta^(-2i/hd), i < hd/2, in fp32, with linear or llama3 scaling applied.

    llama3 (Llama 3.1): wavelengths longer than original_len / low_freq_factor are divided by `factor`, shorter than
    original_len / high_freq_factor kept, and those in between interpolated smoothly.
    """
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        inv = inv / rs["factor"]
    elif kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, decode: bool) -> Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v for q (B, nh, T, hd), k and v (B, nkv, S, hd), grouped-query when
    nh > nkv; mask: boolean (B, 1, T, S), True = may attend. Returns (B, nh, T, hd).

    Training lets PyTorch pick the SDPA backend (flash / memory-efficient / cuDNN: none builds an S x S matrix);
    decoding (`decode`: a KV cache whose length changes every step) uses flash or math, see DECODE_BACKENDS.
    """
    gqa = q.shape[1] != k.shape[1]
    if not decode:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
    with sdpa_kernel(DECODE_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)


class Attention(nn.Module):
    """Grouped-query self-attention: nh query heads share nkv key/value heads (nh % nkv == 0).

    `prefix` (set by prefix tuning) is an optional module returning (k, v), each (B, nkv, P, hd): P extra key/value
    positions that every query sees.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        d, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.nh, self.nkv, self.hd, self.layer_idx = nh, nkv, hd, layer_idx
        self.q_proj = nn.Linear(d, nh * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, nkv * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, nkv * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, d, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's hd features, before RoPE
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.prefix: nn.Module | None = None

    def forward(self, x: Tensor, cos: Tensor | None, sin: Tensor | None, mask: Tensor | None,
                cache=None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = project(x, [self.q_proj, self.k_proj, self.v_proj])  # one fused call on CUDA
        q = q.view(B, T, self.nh, self.hd)
        k = k.view(B, T, self.nkv, self.hd)
        v = v.view(B, T, self.nkv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cos is not None:
            q, k = apply_rope(q, k, cos, sin)
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
        y = attend(q, k, v, mask, is_causal, decode=cache is not None)  # (B, nh, T, hd)
        return project(y.transpose(1, 2).reshape(B, T, self.nh * self.hd), [self.o_proj])[0]
