"""The decoder: one readable Llama-family transformer (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) driven by `ModelConfig`.

Module names follow the Hugging Face layout (`model.layers.N.self_attn.q_proj` ...) so that state dicts and adapters
are interchangeable with transformers and PEFT. Attention lives in `attention.py`, norms and the MLP in `layers.py`,
the generation cache in `cache.py`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from slimtune.models.attention import Attention, rope_attention_factor, rope_inv_freq, rope_type
from slimtune.models.cache import KVCache
from slimtune.models.config import ModelConfig
from slimtune.models.layers import MLP, make_norm
from slimtune.models.recompute import HostPool, run_blocks


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

    `grad_ckpt`: False, True (recompute each block in backward) or "offload" (recompute, with the block inputs
    waiting in pinned host memory); see `recompute.py`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.grad_ckpt: bool | str = False
        self._host_pool = HostPool()  # pinned buffers of offloaded block inputs, reused across steps
        self.reset_rope()

    # ---- positions and masks ------------------------------------------------------------------------------------
    def reset_rope(self) -> None:
        """Recompute the rotary frequencies from the config (after its `rope_scaling` changed, e.g. by LongLoRA)."""
        cfg = self.config
        self._inv_freq = {"cpu": rope_inv_freq(cfg)} if not cfg.learned_positions else {}
        self._rope_factor = rope_attention_factor(cfg)

    def rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin of shape (B, T, hd) for integer positions (B, T); angles computed in fp32 as transformers."""
        dev = position_ids.device
        inv = self._inv_freq.get(str(dev))
        if inv is None:
            inv = self._inv_freq[str(dev)] = self._inv_freq["cpu"].to(dev)
        if rope_type(self.config) == "dynamic":  # dynamic NTK: the frequencies follow this call's longest position
            seq = int(position_ids.max()) + 1
            if seq > self.config.max_position_embeddings:
                inv = rope_inv_freq(self.config, seq).to(dev)
        ang = position_ids[..., None].float() * inv  # (B, T, hd/2)
        emb = torch.cat([ang, ang], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self._rope_factor != 1.0:  # YaRN's attention factor, applied to both (as transformers)
            cos, sin = cos * self._rope_factor, sin * self._rope_factor
        return cos.to(dtype), sin.to(dtype)

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
        mode = self.grad_ckpt if self.training and torch.is_grad_enabled() else False
        x = run_blocks(self.model.layers, x, cos, sin, mask, cache, mode, self._host_pool)
        if cache is not None and not cache.static:
            cache.pos += T
        return self.model.norm(x)

    def forward(self, input_ids: Tensor | None = None, **kw) -> Tensor:
        """Logits (B, T, vocab); keyword arguments as `hidden_states`."""
        return self.lm_head(self.hidden_states(input_ids, **kw))


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
