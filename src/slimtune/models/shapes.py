"""Named model shapes that can be built on the `meta` device without weights, for counting and memory planning.

Real shapes follow the published config.json of each model (vocab, widths, heads, RoPE; Gemma 2 9B, Gemma 3 12B and
Phi-3-mini-4k as quoted in public repositories' tests, checked against transformers' class defaults); GPT-3 175B follows
Brown et al. 2020, Table 2.1 (d_model 12288, 96 layers, 96 heads, FFN 4 x d, context 2048).
"""
from __future__ import annotations

from slimtune.errors import SlimtuneError
from slimtune.models.config import ModelConfig

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

SHAPES: dict[str, dict] = {
    # tiny shapes for tests (one per architecture feature)
    "tiny": dict(vocab_size=320, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "tiny-qwen2": dict(model_type="qwen2", vocab_size=320, hidden_size=128, intermediate_size=352,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, qkv_bias=True,
                       tie_word_embeddings=True),
    "tiny-qwen3": dict(model_type="qwen3", vocab_size=320, hidden_size=128, intermediate_size=352,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64, qk_norm=True),
    "tiny-gemma2": dict(model_type="gemma2", vocab_size=320, hidden_size=128, intermediate_size=352,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                        hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, norm_offset=True,
                        sandwich_norm=True, embed_scale=True, query_pre_attn_scalar=24, attn_softcap=50.0,
                        final_softcap=30.0, sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
    "tiny-phi3": dict(model_type="phi3", vocab_size=320, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, fused_proj=True, sliding_window=16),
    # real shapes
    "llama3-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                      max_position_embeddings=131072, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
                      tie_word_embeddings=True, dtype="bfloat16"),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, dtype="float16"),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                      max_position_embeddings=8192, dtype="bfloat16"),
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                        max_position_embeddings=131072, rope_scaling=_LLAMA3_ROPE, dtype="bfloat16"),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, rope_theta=500000.0,
                       max_position_embeddings=8192, dtype="bfloat16"),
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=1000000.0,
                       max_position_embeddings=32768, dtype="bfloat16"),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, qkv_bias=True,
                       rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6, dtype="bfloat16"),
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     qk_norm=True, rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6,
                     dtype="bfloat16"),
    # Gemma 2 9B: GeGLU, 4 norms a block, soft-capped attention (50) and logits (30), sliding 4096 / global layers
    "gemma2-9b": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                      num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                      hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, norm_offset=True, sandwich_norm=True, embed_scale=True,
                      query_pre_attn_scalar=256, attn_softcap=50.0, final_softcap=30.0, sliding_window=4096,
                      layer_types=["sliding_attention", "full_attention"] * 21, dtype="bfloat16"),
    # Gemma 3 12B, the text model of Gemma3ForConditionalGeneration: q/k norms, 5 sliding (1024, base 1e4) : 1
    # global (base 1e6, linear x8) layers
    "gemma3-12b": dict(model_type="gemma3_text", vocab_size=262208, hidden_size=3840, intermediate_size=15360,
                       num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                       hidden_act="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                       rope_local_theta=10000.0, tie_word_embeddings=True, qk_norm=True, norm_offset=True,
                       sandwich_norm=True, embed_scale=True, query_pre_attn_scalar=256, sliding_window=1024,
                       layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 8, dtype="bfloat16"),
    # Phi-3-mini-4k: fused qkv_proj and gate_up_proj, sliding window 2047
    "phi3-mini": dict(model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, sliding_window=2047, fused_proj=True,
                      bos_token_id=1, eos_token_id=32000, pad_token_id=32000, dtype="bfloat16"),
    "gpt3-175b": dict(model_type="gpt", vocab_size=50257, hidden_size=12288, intermediate_size=4 * 12288,
                      num_hidden_layers=96, num_attention_heads=96, max_position_embeddings=2048, qkv_bias=True,
                      o_bias=True, mlp_bias=True, mlp_gated=False, hidden_act="gelu", norm_type="layer",
                      learned_positions=True, tie_word_embeddings=True, dtype="float16"),
}


def get_shape(name: str) -> ModelConfig:
    """The `ModelConfig` of a named shape.

    Raises:
        SlimtuneError: unknown name (listing the known ones).
    """
    if name not in SHAPES:
        raise SlimtuneError(f"unknown shape {name!r}; known shapes: {', '.join(SHAPES)}")
    return ModelConfig(**SHAPES[name])


def build_meta(cfg: ModelConfig):
    """A `Decoder` of this config on the meta device: shapes and parameter counts, no memory."""
    import torch

    from slimtune.models.decoder import Decoder

    with torch.device("meta"):
        return Decoder(cfg)
