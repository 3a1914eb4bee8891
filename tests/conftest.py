"""Shared fixtures: tiny random transformers models of each supported architecture, saved as HF folders."""
from __future__ import annotations

import pytest
import torch

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
}


def make_hf_model(arch: str, seed: int = 0):
    """A 2-layer transformers model of `arch` with all weights random (norm weights too), fp32."""
    import transformers

    cls_name, extra = ARCHS[arch]
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(extra)
    cfg = getattr(transformers, cls_name)(**base)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
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
