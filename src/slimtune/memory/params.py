"""The parameter tensors of a `Decoder` config, listed analytically (no model built): names, shapes, kinds. Their
bytes come from the dtype table (`slimtune.precision.formats`) or, quantized, from the format's codec."""
from __future__ import annotations

from dataclasses import dataclass

from slimtune.models.config import ModelConfig

@dataclass(frozen=True)
class Param:
    """One parameter tensor: `name` (HF path), `shape`, `kind` ('linear', 'bias', 'norm', 'embed', 'head'), `layer`
    (block index or -1), `module` (the linear's short name, e.g. 'q_proj', for 'linear' and 'bias')."""

    name: str
    shape: tuple[int, ...]
    kind: str
    layer: int = -1
    module: str = ""

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def param_table(cfg: ModelConfig) -> list[Param]:
    """Every parameter tensor of `Decoder(cfg)` (tied lm_head counted once, as the embedding)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qd, kvd = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    ps = [Param("model.embed_tokens.weight", (cfg.vocab_size, d), "embed")]
    if cfg.learned_positions:
        ps.append(Param("model.embed_positions.weight", (cfg.max_position_embeddings, d), "embed"))
    if cfg.fused_proj:  # Phi-3: one qkv_proj, one gate_up_proj
        lin = [("self_attn", "qkv_proj", qd + 2 * kvd, d, cfg.qkv_bias), ("self_attn", "o_proj", d, qd, cfg.o_bias),
               ("mlp", "gate_up_proj", 2 * f, d, cfg.mlp_bias)]
    else:
        lin = [("self_attn", "q_proj", qd, d, cfg.qkv_bias), ("self_attn", "k_proj", kvd, d, cfg.qkv_bias),
               ("self_attn", "v_proj", kvd, d, cfg.qkv_bias), ("self_attn", "o_proj", d, qd, cfg.o_bias)]
        if cfg.mlp_gated:
            lin.append(("mlp", "gate_proj", f, d, cfg.mlp_bias))
        lin.append(("mlp", "up_proj", f, d, cfg.mlp_bias))
    lin.append(("mlp", "down_proj", d, f, cfg.mlp_bias))
    norms = ["input_layernorm", "post_attention_layernorm"]
    if cfg.sandwich_norm:  # Gemma 2 / 3
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    leaves = ["weight"] if cfg.norm_type == "rms" else ["weight", "bias"]
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        for leaf in leaves:
            for which in norms:
                ps.append(Param(f"{pre}{which}.{leaf}", (d,), "norm", i))
        for sub, n, out_f, in_f, bias in lin:
            ps.append(Param(f"{pre}{sub}.{n}.weight", (out_f, in_f), "linear", i, n))
            if bias:
                ps.append(Param(f"{pre}{sub}.{n}.bias", (out_f,), "bias", i, n))
        if cfg.qk_norm:
            ps += [Param(f"{pre}self_attn.q_norm.weight", (hd,), "norm", i),
                   Param(f"{pre}self_attn.k_norm.weight", (hd,), "norm", i)]
    ps.append(Param("model.norm.weight", (d,), "norm"))
    if cfg.norm_type != "rms":
        ps.append(Param("model.norm.bias", (d,), "norm"))
    if not cfg.tie_word_embeddings:
        ps.append(Param("lm_head.weight", (cfg.vocab_size, d), "head"))
    return ps
