"""The decoder: one readable transformer for Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3,
driven by `ModelConfig`.

Module names follow the Hugging Face layout (`model.layers.N.self_attn.q_proj` ...) so that state dicts and adapters
are interchangeable with transformers and PEFT. Attention lives in `attention.py`, norms and the MLP in `layers.py`,
the generation cache in `cache.py`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from slimtune.errors import ConfigError
from slimtune.models.attention import Attention
from slimtune.models.cache import KVCache
from slimtune.models.config import ModelConfig
from slimtune.models.layers import MLP, ScaledEmbedding, make_norm
from slimtune.models.recompute import MLP_TILE, HostPool, checkpointed, run_blocks
from slimtune.models.rope import Rotary


class CausalLMOutput(Tensor):
    """What `Decoder.forward` returns: the logits (B, T, vocab) as a tensor that also answers transformers' output
    habits, `out.logits` (the same tensor) and `out.loss` (with `labels`: the mean next-token cross-entropy, else
    None).

    A tensor subclass rather than an output object, so that every caller that uses the logits as a tensor (the
    training step, generation, `model(x)[:, -1]`, tests) stays unchanged and nothing is copied (`as_subclass` shares
    storage and autograd history). Torch functions are disabled on it, as on nn.Parameter: any op on it returns a
    plain Tensor, so it adds no dispatch cost and `.loss` never leaks into results derived from it.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl
    loss: Tensor | None = None

    @property
    def logits(self) -> Tensor:
        return self


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). With `sandwich_norm` (Gemma 2 / 3) the
    outputs are normed too: x + post_attention_layernorm(attn(input_layernorm(x))), then
    x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x))).

    cos, sin and mask are tensors, or dicts by attention kind ('sliding_attention' / 'full_attention') when the
    layers differ; the block takes its own kind's.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.kind = cfg.layer_type(layer_idx)
        self.input_layernorm = make_norm(cfg, d)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = make_norm(cfg, d)
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = make_norm(cfg, d)
            self.post_feedforward_layernorm = make_norm(cfg, d)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor | dict | None, sin: Tensor | dict | None, mask: Tensor | dict | None,
                cache: "KVCache | None" = None) -> Tensor:
        if isinstance(cos, dict):
            cos, sin = cos[self.kind], sin[self.kind]
        if isinstance(mask, dict):
            mask = mask[self.kind]
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        if hasattr(self, "pre_feedforward_layernorm"):
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """`model.*`: token embeddings, the blocks and the final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # on the meta device, skip nn.Embedding's normal_ init: its meta kernel imports torch._dynamo (2-4 s)
        meta = torch.empty(0).is_meta

        def embedding(n: int, d: int, cls=nn.Embedding) -> nn.Embedding:
            return cls(n, d, _weight=torch.empty(n, d) if meta else None)

        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, ScaledEmbedding if cfg.embed_scale else
                                      nn.Embedding)
        if cfg.learned_positions:
            self.embed_positions = embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)


class _Recompute:
    """A decoder setting of the recomputation (grad_ckpt, mlp_tile, ckpt_blocks): setting it checks the value (a count
    >= `low`, or None) and re-applies every block's MLP tile."""

    def __init__(self, low: int | None = None, unit: str = "", none: str = "") -> None:
        self.low, self.unit, self.none = low, unit, none

    def __set_name__(self, owner, name: str) -> None:
        self.key, self.slot = name, "_" + name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj, self.slot)

    def __set__(self, obj, value) -> None:
        if self.low is not None and value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < self.low):
            raise ConfigError(f"{self.key} must be a number of {self.unit} >= {self.low} (or None: {self.none}), "
                              f"got {value!r}")
        setattr(obj, self.slot, value)
        obj._set_tiles()


class Decoder(nn.Module):
    """A causal language model: `model` (the backbone) and `lm_head` (tied to the embeddings if the config says so).

    `grad_ckpt`: False, True (recompute each block in backward) or "offload" (recompute, with the block inputs
    waiting in pinned host memory); see `recompute.py`. `mlp_tile`: under grad_ckpt, the MLPs of sequences longer
    than this many tokens run in pieces of it (`layers.MLP.tile`); None: never. `ckpt_blocks`: checkpoint only the
    first N blocks (None: all); the later ones keep their activations (faster, more memory). Setting any of them
    updates every block's MLP (`mlp.tile` = mlp_tile in the checkpointed blocks, else None; `mlp.base_last` in the
    blocks checkpointed with grad_ckpt=True).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._grad_ckpt: bool | str = False
        self._mlp_tile: int | None = MLP_TILE
        self._ckpt_blocks: int | None = None
        self._host_pool = HostPool()  # pinned buffers of offloaded block inputs, reused across steps
        self.kinds = sorted({cfg.layer_type(i) for i in range(cfg.num_hidden_layers)})
        self.reset_rope()

    grad_ckpt = _Recompute()
    mlp_tile = _Recompute(1, "tokens", "off")
    ckpt_blocks = _Recompute(0, "blocks", "all")

    def _set_tiles(self) -> None:
        for i, layer in enumerate(self.model.layers):
            mode = checkpointed(i, self._grad_ckpt, self._ckpt_blocks)
            layer.mlp.tile = self._mlp_tile if mode else None
            layer.mlp.base_last = mode is True  # a non-reentrant recompute then stops before the down's base product

    # ---- positions and masks ------------------------------------------------------------------------------------
    def reset_rope(self) -> None:
        """Build the RoPE of each attention kind from the config (again after its `rope_scaling` changed, e.g. by
        LongLoRA); Gemma 3's sliding layers have their own base."""
        cfg = self.config
        self._rotary: dict[str, Rotary] = {}
        if not cfg.learned_positions:
            full = Rotary(cfg)
            local = cfg.rope_local_theta is not None
            self._rotary = {k: Rotary(cfg, local=True) if local and k == "sliding_attention" else full
                            for k in self.kinds}

    def rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor | dict, Tensor | dict]:
        """cos, sin of shape (B, T, rotary_dim) for integer positions (B, T), angles in fp32 as transformers; dicts
        by attention kind when the kinds' RoPE differ (Gemma 3)."""
        if len({id(r) for r in self._rotary.values()}) == 1:
            return self._rotary[self.kinds[0]](position_ids, dtype)
        both = {k: r(position_ids, dtype) for k, r in self._rotary.items()}
        return {k: cs[0] for k, cs in both.items()}, {k: cs[1] for k, cs in both.items()}

    def build_mask(self, B: int, T: int, past: int, device: torch.device, attention_mask: Tensor | None,
                   seq_ids: Tensor | None, window: int | None = None) -> Tensor | None:
        """Boolean (B, 1, T, past+T) mask, True = may attend; None when plain causal attention is exact.

        attention_mask: (B, past+T) with 0 on padding keys. seq_ids: (B, T) example index within a packed row
        (no attention across examples). window: a sliding layer's window (keys within the last `window` cache
        positions, as transformers). The diagonal stays visible so that padding queries never see an empty row
        (whose softmax would be NaN).
        """
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

    def masks(self, B: int, T: int, past: int, device: torch.device, attention_mask: Tensor | None,
              seq_ids: Tensor | None, position_ids: Tensor, cache: "KVCache | None") -> Tensor | dict | None:
        """The mask of each attention kind (a dict when the layers differ, else the one mask). With a static cache
        the caller's (B, max_len) mask of filled slots, narrowed to the window by the cache for sliding layers."""
        out = {}
        for kind in self.kinds:
            window = self.config.sliding_window if kind == "sliding_attention" else None
            if cache is not None and cache.static:
                m = attention_mask[:, None, None, :].bool()  # (B, 1, 1, max_len)
                out[kind] = m & cache.window_mask(position_ids, window) if window else m
            else:
                out[kind] = self.build_mask(B, T, past, device, attention_mask, seq_ids, window)
        return out if len(out) > 1 else out[self.kinds[0]]

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
        mask = self.masks(B, T, past, x.device, attention_mask, seq_ids, position_ids, cache)
        cos = sin = None
        if self.config.learned_positions:
            x = x + self.model.embed_positions(position_ids)
        else:
            cos, sin = self.rope(position_ids, x.dtype)
        mode = self.grad_ckpt if self.training and torch.is_grad_enabled() else False
        x = run_blocks(self.model.layers, x, cos, sin, mask, cache, mode, self._host_pool, self._ckpt_blocks)
        if cache is not None and not cache.static:
            cache.pos += T
        return self.model.norm(x)

    def logits(self, h: Tensor) -> Tensor:
        """lm_head(h) (..., vocab), soft-capped to c * tanh(logits / c) where the config says (Gemma 2)."""
        y = self.lm_head(h)
        c = self.config.final_softcap
        return y if c is None else torch.tanh(y / c) * c

    def forward(self, input_ids: Tensor | None = None, labels: Tensor | None = None, **kw) -> CausalLMOutput:
        """Logits (B, T, vocab) as a `CausalLMOutput`; keyword arguments as `hidden_states`.

        labels: (B, T), -100 where not trained: `.loss` is then the mean cross-entropy of logits[:, t] against
        labels[:, t + 1] (transformers' causal-LM loss, `slimtune.train.loss.mean_lm_loss`).
        """
        out = self.logits(self.hidden_states(input_ids, **kw)).as_subclass(CausalLMOutput)
        if labels is not None:
            from slimtune.train.loss import mean_lm_loss

            out.loss = mean_lm_loss(out, labels)
        return out


def init_weights(model: Decoder, seed: int, std: float = 0.02) -> Decoder:
    """Deterministic random init (normal(0, std) matrices and embeddings, zero biases, unit norms) on the CPU."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(0.0 if model.config.norm_offset else 1.0)  # unit scale: w = 1, or 1 + w with w = 0
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
