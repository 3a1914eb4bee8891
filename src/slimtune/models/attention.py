"""Self-attention of the decoder and its seams: rotary position embeddings (RoPE, with linear / llama3 scaling) and
`attend`, the one place where q, k, v meet (PyTorch SDPA today; LongLoRA's shifted sparse attention, `shifted.py`,
plugs in here: `Attention.s2_group` set, in training only; kernels plug in here too).
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
from slimtune.models.shifted import shifted_attention

# With a KV cache the key length changes every step; cuDNN attention (the default on Hopper) builds a new plan per
# shape (measured: 63 ms a decode step on an H100, flash 0.6 ms), so decoding uses flash, or math for masks.
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def rope_type(cfg: ModelConfig) -> str:
    """The RoPE scaling of a config: default, linear, llama3, dynamic or yarn."""
    rs = cfg.rope_scaling or {}
    return rs.get("rope_type", rs.get("type", "default"))


def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> Tensor:
    """Inverse frequencies theta^(-2i/hd), i < hd/2, in fp32, with the config's scaling applied (as transformers'
    `ROPE_INIT_FUNCTIONS`).

    linear (position interpolation, Chen et al. 2023): divided by `factor`. llama3 (Llama 3.1): wavelengths longer
    than original_len / low_freq_factor are divided by `factor`, shorter than original_len / high_freq_factor kept,
    those in between interpolated smoothly. dynamic (NTK-aware, bloc97 / emozilla): for a call whose longest position
    `seq_len` passes max_position_embeddings L, the base becomes theta (f seq_len / L - (f - 1))^(hd / (hd - 2)).
    yarn (Peng et al. 2023): per dimension, a ramp between interpolated (/ factor) and original frequencies over the
    dimensions that turn beta_fast .. beta_slow times within the original length (cos / sin are also scaled by
    `rope_attention_factor`).
    """
    hd, theta, rs, kind = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling or {}, rope_type(cfg)
    if kind == "dynamic" and seq_len is not None and seq_len > cfg.max_position_embeddings:
        f = rs["factor"]
        theta = theta * (f * seq_len / cfg.max_position_embeddings - (f - 1)) ** (hd / (hd - 2))
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd))
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
    elif kind == "yarn":
        inv = _yarn(inv, hd, theta, rs, cfg.max_position_embeddings)
    return inv


def _yarn(inv: Tensor, hd: int, theta: float, rs: dict, max_pos: int) -> Tensor:
    """YaRN's "NTK-by-parts" frequencies: dimension i keeps its frequency where it turns more than beta_fast times
    over the original length, is interpolated (/ factor) where it turns fewer than beta_slow times, and is blended
    linearly in between (dimension bounds from d(r) = hd ln(L / (2 pi r)) / (2 ln theta), floored / ceiled)."""
    old = rs["original_max_position_embeddings"]
    factor = rs.get("factor") or max_pos / old

    def dim_of(rotations: float) -> float:
        return hd * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = dim_of(rs.get("beta_fast") or 32), dim_of(rs.get("beta_slow") or 1)
    if rs.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, hd - 1)
    ramp = ((torch.arange(hd // 2, dtype=torch.float32, device="cpu") - lo) / ((hi - lo) or 0.001)).clamp(0, 1)  # (hd/2,)
    return inv / factor * ramp + inv * (1 - ramp)


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor YaRN multiplies cos and sin by (so q.k grows by its square): `attention_factor`, else
    0.1 ln(factor) + 1 (or the ratio of two such terms with mscale / mscale_all_dim); 1 for the other scalings."""
    if rope_type(cfg) != "yarn":
        return 1.0
    rs = cfg.rope_scaling
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    factor = rs.get("factor") or cfg.max_position_embeddings / rs["original_max_position_embeddings"]

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if rs.get("mscale") and rs.get("mscale_all_dim"):
        return mscale(rs["mscale"]) / mscale(rs["mscale_all_dim"])
    return mscale(1.0)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, decode: bool,
           group: int | None = None) -> Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v for q (B, nh, T, hd), k and v (B, nkv, S, hd), grouped-query when
    nh > nkv; mask: boolean (B, 1, T, S), True = may attend. Returns (B, nh, T, hd).

    Training lets PyTorch pick the SDPA backend (flash / memory-efficient / cuDNN: none builds an S x S matrix);
    decoding (`decode`: a KV cache whose length changes every step) uses flash or math, see DECODE_BACKENDS.
    `group` (LongLoRA's S^2-Attn, self-attention without a cache, S == T): attention within groups of `group` tokens,
    shifted by group / 2 in half of the heads (`shifted.shifted_attention`), each batch of groups through this function.
    """
    if group and not decode and q.shape[2] > group:
        return shifted_attention(q, k, v, mask, group, lambda *a: attend(*a, decode=False))
    gqa = q.shape[1] != k.shape[1]
    if not decode:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
    with sdpa_kernel(DECODE_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)


class Attention(nn.Module):
    """Grouped-query self-attention: nh query heads share nkv key/value heads (nh % nkv == 0).

    `prefix` (set by prefix tuning) is an optional module returning (k, v), each (B, nkv, P, hd): P extra key/value
    positions that every query sees. `s2_group` (set by LongLoRA): in training, attention within shifted groups of
    that many tokens (S^2-Attn); None, in eval mode, with a cache or a prefix: full attention.
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
        self.s2_group: int | None = None

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
        group = self.s2_group if self.training and cache is None and self.prefix is None else None
        y = attend(q, k, v, mask, is_causal, decode=cache is not None, group=group)  # (B, nh, T, hd)
        return project(y.transpose(1, 2).reshape(B, T, self.nh * self.hd), [self.o_proj])[0]
