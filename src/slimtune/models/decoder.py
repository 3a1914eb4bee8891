"""The decoder: one readable Llama-family transformer (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) driven by `ModelConfig`.

Module names follow the Hugging Face layout (`model.layers.N.self_attn.q_proj` ...) so that state dicts and adapters
are interchangeable with transformers and PEFT. Attention goes through `F.scaled_dot_product_attention` with
grouped-query heads; a preallocated KV cache serves generation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from slimtune.models.config import ModelConfig

# With a KV cache the key length changes every step; cuDNN attention (the default on Hopper) builds a new plan per
# shape (measured: 63 ms a decode step on an H100, flash 0.6 ms), so decoding uses flash, or math for masks.
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), the statistic in fp32, the product in the input dtype (as transformers)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


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
                cache: "KVCache | None" = None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cos is not None:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd), broadcast over heads
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
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
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=self.nh != self.nkv)
        else:
            with sdpa_kernel(DECODE_BACKENDS):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                   enable_gqa=self.nh != self.nkv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)); or, ungated (GPT), down(act(up(x)))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        if cfg.mlp_gated:
            self.gate_proj = nn.Linear(d, f, bias=b)
        self.up_proj = nn.Linear(d, f, bias=b)
        self.down_proj = nn.Linear(f, d, bias=b)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "gate_proj"):
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, cfg.rms_norm_eps) if cfg.norm_type == "rms" else nn.LayerNorm(dim, eps=cfg.rms_norm_eps)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.hidden_size)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = make_norm(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor | None, sin: Tensor | None, mask: Tensor | None,
                cache: "KVCache | None" = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """`model.*`: token embeddings, the blocks and the final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # on the meta device, skip nn.Embedding's normal_ init: its meta kernel imports torch._dynamo (2-4 s)
        meta = torch.empty(0).is_meta

        def embedding(n: int, d: int) -> nn.Embedding:
            return nn.Embedding(n, d, _weight=torch.empty(n, d) if meta else None)

        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.learned_positions:
            self.embed_positions = embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)


class Decoder(nn.Module):
    """A causal language model: `model` (the backbone) and `lm_head` (tied to the embeddings if the config says so).

    `grad_ckpt = True` recomputes each block in backward (activation checkpointing per block).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.grad_ckpt = False
        self._inv_freq = {"cpu": rope_inv_freq(cfg)} if not cfg.learned_positions else {}

    # ---- positions and masks ------------------------------------------------------------------------------------
    def rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin of shape (B, T, hd) for integer positions (B, T); angles computed in fp32 as transformers."""
        dev = position_ids.device
        inv = self._inv_freq.get(str(dev))
        if inv is None:
            inv = self._inv_freq[str(dev)] = self._inv_freq["cpu"].to(dev)
        ang = position_ids[..., None].float() * inv  # (B, T, hd/2)
        emb = torch.cat([ang, ang], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def build_mask(self, B: int, T: int, past: int, device: torch.device, attention_mask: Tensor | None,
                   seq_ids: Tensor | None) -> Tensor | None:
        """Boolean (B, 1, T, past+T) mask, True = may attend; None when plain causal attention is exact.

        attention_mask: (B, past+T) with 0 on padding keys. seq_ids: (B, T) example index within a packed row
        (no attention across examples). The diagonal stays visible so that padding queries never see an empty row
        (whose softmax would be NaN).
        """
        window = self.config.sliding_window
        S = past + T
        need_window = window is not None and S > window
        if attention_mask is None and seq_ids is None and not need_window and (past == 0 or T == 1):
            return None
        qpos = torch.arange(past, S, device=device)[:, None]
        kpos = torch.arange(S, device=device)[None, :]
        m = kpos <= qpos  # (T, S) causal
        if need_window:
            m = m & (kpos > qpos - window)
        m = m[None].expand(B, T, S)
        if attention_mask is not None:
            m = m & attention_mask[:, None, :].bool()
        if seq_ids is not None:
            m = m & (seq_ids[:, :, None] == seq_ids[:, None, :])
        m = m | (kpos == qpos)[None]
        return m[:, None]

    # ---- forward ---------------------------------------------------------------------------------------------------
    def hidden_states(self, input_ids: Tensor | None = None, *, inputs_embeds: Tensor | None = None,
                      attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                      seq_ids: Tensor | None = None, cache: "KVCache | None" = None) -> Tensor:
        """Final-norm hidden states (B, T, d).

        Args:
            input_ids: (B, T) token ids, or inputs_embeds: (B, T, d).
            attention_mask: (B, past+T), 1 = real token, 0 = padding (left padding for generation).
            position_ids: (B, T); default: past..past+T-1, or counted over real tokens when a mask is given.
            seq_ids: (B, T) example index in packed rows; with restarting position_ids.
            cache: a `KVCache`; its position advances by T.
        """
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        past = cache.pos if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # positions count real tokens (as transformers.generate)
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:past + T]
            else:
                position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        if cache is not None and cache.static:
            mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, max_len): the caller marks filled slots
        else:
            mask = self.build_mask(B, T, past, x.device, attention_mask, seq_ids)
        cos = sin = None
        if self.config.learned_positions:
            x = x + self.model.embed_positions(position_ids)
        else:
            cos, sin = self.rope(position_ids, x.dtype)
        for layer in self.model.layers:
            if self.grad_ckpt and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None and not cache.static:
            cache.pos += T
        return self.model.norm(x)

    def forward(self, input_ids: Tensor | None = None, **kw) -> Tensor:
        """Logits (B, T, vocab); keyword arguments as `hidden_states`."""
        return self.lm_head(self.hidden_states(input_ids, **kw))


class KVCache:
    """Preallocated keys and values for generation: per layer (B, nkv, max_len, hd); `pos` tokens filled so far.

    In `static` mode (for CUDA graphs) every shape is fixed: new keys go to the slots in the tensor `index`, attention
    runs over all max_len slots, and the caller passes a (B, max_len) attention mask of the filled slots and the
    position ids; `pos` is then the caller's business.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.pos = 0
        self.max_len = max_len
        self.static = False
        self.index = torch.zeros(1, dtype=torch.long, device=device)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.static:
            self.k[layer].index_copy_(2, self.index, k)
            self.v[layer].index_copy_(2, self.index, v)
            return self.k[layer], self.v[layer]
        T = k.shape[2]
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full")
        self.k[layer][:, :, self.pos:self.pos + T] = k
        self.v[layer][:, :, self.pos:self.pos + T] = v
        return self.k[layer][:, :, :self.pos + T], self.v[layer][:, :, :self.pos + T]


def init_weights(model: Decoder, seed: int, std: float = 0.02) -> Decoder:
    """Deterministic random init (normal(0, std) matrices and embeddings, zero biases, unit norms) on the CPU."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
