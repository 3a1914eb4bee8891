"""The config.json keys of the families beyond Llama (Gemma 2, Gemma 3 text, Phi-3): transformers' defaults for keys a
file may leave out, the `ModelConfig` fields read from them (4.x and 5.x spellings), and the keys written back.

Defaults and meanings follow transformers 5.17's Gemma2Config, Gemma3TextConfig and Phi3Config and their modeling
files (a key left out of config.json takes the class default there, so it must here too).
"""
from __future__ import annotations

from typing import Any

from slimtune.errors import CheckpointError

WINDOWED = ("mistral", "gemma2", "gemma3_text", "phi3")  # families whose config.json sliding_window always applies
GEMMA = ("gemma2", "gemma3_text")

# transformers' class defaults of the keys that change the computation
DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": dict(tie_word_embeddings=True, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                   query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, max_position_embeddings=8192, rms_norm_eps=1e-6),
    "gemma3_text": dict(tie_word_embeddings=True, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                        query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=None,
                        final_logit_softcapping=None, max_position_embeddings=131072, rms_norm_eps=1e-6,
                        rope_theta=1_000_000.0),
    "phi3": dict(tie_word_embeddings=False, hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=4096,
                 original_max_position_embeddings=4096),
}
SLIDING_PATTERN = {"gemma2": 2, "gemma3_text": 6}  # every n-th layer is global (4.x `sliding_window_pattern`)


def with_defaults(model_type: str, d: dict[str, Any]) -> dict[str, Any]:
    """config.json `d` with transformers' defaults filled in for the keys it leaves out."""
    return {**DEFAULTS.get(model_type, {}), **d}


def normalize_rope(rope: dict[str, Any], d: dict[str, Any]) -> dict[str, Any]:
    """A RoPE scaling dict with `rope_type` spelled out ('su' -> 'longrope', as transformers' Phi-3 does), the
    partial-rotary factor taken out (a field of its own), longrope's original length filled from the top level;
    empty for plain RoPE."""
    rope = {k: v for k, v in rope.items() if k != "partial_rotary_factor"}
    if "type" in rope:
        rope.setdefault("rope_type", rope.pop("type"))
        rope.pop("type", None)
    if rope.get("rope_type") == "su" or (rope.get("rope_type") == "yarn" and d.get("model_type") == "phi3"):
        rope["rope_type"] = "longrope"
    if rope.get("rope_type") == "longrope" and "original_max_position_embeddings" not in rope:
        rope["original_max_position_embeddings"] = d.get("original_max_position_embeddings",
                                                         d.get("max_position_embeddings"))
    return {} if rope.get("rope_type", "default") == "default" else rope


def _layer_types(model_type: str, d: dict[str, Any]) -> list[str]:
    """Per-layer attention kinds: 5.x `layer_types`, else every `sliding_window_pattern`-th layer global."""
    if d.get("layer_types"):
        return list(d["layer_types"])
    n = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or SLIDING_PATTERN[model_type]
    return ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(d["num_hidden_layers"])]


def _local_theta(d: dict[str, Any], source: str) -> float:
    """Gemma 3's RoPE base of the sliding layers: 5.x rope_parameters['sliding_attention'] or 4.x
    rope_local_base_freq (unscaled: transformers applies rope_scaling to the global layers only)."""
    local = (d.get("rope_parameters") or {}).get("sliding_attention")
    if isinstance(local, dict):
        if local.get("rope_type", "default") != "default":
            raise CheckpointError(f"{source}: RoPE scaling {local.get('rope_type')!r} on the sliding layers is not "
                                  "supported; supported there: default")
        return float(local.get("rope_theta", 10000.0))
    return float(d.get("rope_local_base_freq", 10000.0))


def family_fields(model_type: str, d: dict[str, Any], source: str) -> dict[str, Any]:
    """The `ModelConfig` fields of Gemma 2, Gemma 3 and Phi-3 in config.json `d` (defaults filled); {} for others.

    Raises:
        CheckpointError: bidirectional attention (Gemma 3 encoders), a scaled RoPE on Gemma 3's sliding layers.
    """
    if model_type in GEMMA:
        if d.get("use_bidirectional_attention"):
            raise CheckpointError(f"{source}: use_bidirectional_attention=true is not supported (slimtune trains "
                                  "causal decoders)")
        out = dict(norm_offset=True, sandwich_norm=True, embed_scale=True,
                   query_pre_attn_scalar=d.get("query_pre_attn_scalar"), attn_softcap=d.get("attn_logit_softcapping"),
                   final_softcap=d.get("final_logit_softcapping"), layer_types=_layer_types(model_type, d))
        if model_type == "gemma3_text":
            out["rope_local_theta"] = _local_theta(d, source)
        return out
    if model_type == "phi3":
        rope = d.get("rope_parameters") or {}
        return dict(fused_proj=True,
                    partial_rotary_factor=float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))))
    return {}


def family_hf(cfg) -> dict[str, Any]:
    """The config.json keys of `cfg`'s family (a `ModelConfig`), in the spelling transformers 4.x and 5.x both read."""
    if cfg.model_type in GEMMA:
        d = dict(hidden_activation=cfg.hidden_act, query_pre_attn_scalar=cfg.query_pre_attn_scalar,
                 attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
                 layer_types=cfg.layer_types, attention_bias=cfg.qkv_bias)
        if cfg.model_type == "gemma3_text":
            d["rope_local_base_freq"] = cfg.rope_local_theta
        return d
    if cfg.model_type == "phi3":
        d = dict(partial_rotary_factor=cfg.partial_rotary_factor)
        if (cfg.rope_scaling or {}).get("rope_type") == "longrope":
            d["original_max_position_embeddings"] = cfg.rope_scaling["original_max_position_embeddings"]
        return d
    return {}
