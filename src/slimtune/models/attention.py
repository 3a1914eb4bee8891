"""Self-attention of the decoder and its seams: rotary position embeddings (RoPE: linear / llama3 / longrope scaling,
partial rotary) and `attend`, the one place where q, k, v meet (PyTorch SDPA; the math path for Gemma 2's soft-capped
scores; kernels and LongLoRA's shifted attention plug in here). RoPE runs through `slimtune.kernels.rope` (a fused
kernel on CUDA, its PyTorch reference elsewhere), q/k/v and o through `models.projections.project`.
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


def scaled_inv_freq(inv: Tensor, rs: dict) -> Tensor:
    """Inverse frequencies with linear or llama3 scaling applied (others unchanged).

    llama3 (Llama 3.1): wavelengths longer than original_len / low_freq_factor are divided by `factor`, shorter than
    original_len / high_freq_factor kept, and those in between interpolated smoothly.
    """
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


def longrope_factor(rs: dict, max_positions: int) -> float:
    """LongRoPE's (Phi-3) factor on cos and sin: attention_factor, else sqrt(1 + ln(s) / ln(L0)) with s = factor or
    max_positions / L0, L0 the original length (1 when s <= 1); as transformers' _compute_longrope_parameters."""
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    L0 = rs["original_max_position_embeddings"]
    s = rs.get("factor") or max_positions / L0
    return 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(L0))


class Rotary:
    """cos and sin of one RoPE variant for integer positions; the inverse frequencies theta^(-2i/rd), i < rd/2, are
    kept in fp32 (CPU master, a copy per device). `local` (Gemma 3's sliding layers): base rope_local_theta, unscaled.
    LongRoPE (Phi-3): frequencies divided by short_factor, or by long_factor once the largest position reaches the
    original length (transformers' dynamic longrope: chosen per forward, on the device, so CUDA graphs hold), and
    cos / sin scaled by `longrope_factor`.
    """

    def __init__(self, cfg: ModelConfig, local: bool = False) -> None:
        rd = cfg.rotary_dim
        theta = cfg.rope_local_theta if local else cfg.rope_theta
        rs = {} if local else dict(cfg.rope_scaling or {})
        base = theta ** (torch.arange(0, rd, 2, dtype=torch.int64, device="cpu").float() / rd)
        self.factor, self.switch = 1.0, None
        if rs.get("rope_type") == "longrope":
            self.inv = {"cpu": 1.0 / (torch.tensor(rs["short_factor"], dtype=torch.float32, device="cpu") * base)}
            self.long = {"cpu": 1.0 / (torch.tensor(rs["long_factor"], dtype=torch.float32, device="cpu") * base)}
            self.switch = rs["original_max_position_embeddings"]
            self.factor = longrope_factor(rs, cfg.max_position_embeddings)
        else:
            self.inv = {"cpu": scaled_inv_freq(1.0 / base, rs)}

    @staticmethod
    def _on(table: dict[str, Tensor], dev: torch.device) -> Tensor:
        t = table.get(str(dev))
        if t is None:
            t = table[str(dev)] = table["cpu"].to(dev)
        return t

    def __call__(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin (B, T, rd) for positions (B, T); angles in fp32 as transformers."""
        inv = self._on(self.inv, position_ids.device)
        if self.switch is not None:
            long = self._on(self.long, position_ids.device)
            inv = torch.where(position_ids.max() + 1 > self.switch, long, inv)
        ang = position_ids[..., None].float() * inv  # (B, T, rd/2)
        emb = torch.cat([ang, ang], dim=-1)
        if self.factor != 1.0:
            return (emb.cos() * self.factor).to(dtype), (emb.sin() * self.factor).to(dtype)
        return emb.cos().to(dtype), emb.sin().to(dtype)


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
           scale: float | None = None, softcap: float | None = None) -> Tensor:
    """softmax(q k^T * scale + mask) v for q (B, nh, T, hd), k and v (B, nkv, S, hd), grouped-query when
    nh > nkv; mask: boolean (B, 1, T, S), True = may attend; scale defaults to hd ** -0.5. Returns (B, nh, T, hd).

    Training lets PyTorch pick the SDPA backend (flash / memory-efficient / cuDNN: none builds an S x S matrix);
    decoding (`decode`: a KV cache whose length changes every step) uses flash or math, see DECODE_BACKENDS.
    `softcap` (Gemma 2) needs the scores themselves, so it runs `softcapped_attention`, which builds them.
    """
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
    positions that every query sees.
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
        y = attend(q, k, v, mask, is_causal, cache is not None, self.scale, self.softcap)  # (B, nh, T, hd)
        return project(y.transpose(1, 2).reshape(B, T, self.nh * self.hd), [self.o_proj])[0]
