"""Shared fixtures: tiny random transformers models of each supported architecture, saved as HF folders."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # slimtune.kernels tests run their Triton kernels in Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

ARCHS = {
    # llama with Llama 3.1 RoPE scaling (llama3), GQA
    "llama3": ("LlamaConfig", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 64},
                                   max_position_embeddings=256)),
    # Llama 2: plain RoPE, full multi-head attention
    "llama2": ("LlamaConfig", dict(num_key_value_heads=4)),
    # Mistral with a sliding window shorter than the test sequence
    "mistral": ("MistralConfig", dict(sliding_window=8)),
    # Qwen2: q/k/v biases, tied embeddings
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, use_sliding_window=False)),
    # Qwen3: q/k RMSNorm, explicit head_dim != hidden / heads
    "qwen3": ("Qwen3Config", dict(head_dim=24)),
    # Gemma 2: sliding layer 0 (window shorter than the test sequence), global layer 1, soft-capping strong enough to
    # bend the scores, query_pre_attn_scalar != head_dim, tied embeddings; eager attention (transformers' SDPA path
    # drops the attention soft-cap)
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8, tie_word_embeddings=True,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                    attn_implementation="eager")),
    # Gemma 3 text: q/k norms, sliding layer with its own RoPE base, global layer with linear RoPE scaling
    "gemma3_text": ("Gemma3TextConfig", dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=8, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}})),
    # Phi-3 (mini-4k style): fused qkv_proj / gate_up_proj, a sliding window shorter than the test sequence
    "phi3": ("Phi3Config", dict(sliding_window=10)),
    # Phi-3 with LongRoPE (mini-128k style) and partial rotary (Phi-4-mini style): 16 tokens use the long factors,
    # 12 the short ones (original length 12)
    "phi3_longrope": ("Phi3Config", dict(
        partial_rotary_factor=0.5, original_max_position_embeddings=12,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 1.9, 2.6], "long_factor": [1.5, 2.8, 4.0, 7.5]})),
}


def make_hf_model(arch: str, seed: int = 0):
    """A 2-layer transformers model of `arch` with all weights random (norm weights too), fp32."""
    import transformers

    cls_name, extra = ARCHS[arch]
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(extra)
    attn = base.pop("attn_implementation", None)
    cfg = getattr(transformers, cls_name)(**base)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.08)
    return model.eval()


@pytest.fixture(params=list(ARCHS))
def hf_folder(request, tmp_path):
    """(arch, folder, transformers model) for each architecture."""
    model = make_hf_model(request.param)
    folder = tmp_path / request.param
    model.save_pretrained(folder)
    return request.param, folder, model


@pytest.fixture(scope="session")
def zygote(tmp_path_factory):
    """A process that imported slimtune once and forks a child per CLI command (tests/reliability_harness.py)."""
    from reliability_harness import Zygote

    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


@pytest.fixture(scope="session")
def ws(tmp_path_factory, zygote):
    """Good inputs the reliability tests damage copies of (tests/reliability_assets.py); built while the zygote
    imports."""
    from reliability_assets import build_workspace

    return build_workspace(tmp_path_factory.mktemp("ws"))
