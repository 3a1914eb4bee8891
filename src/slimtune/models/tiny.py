"""The built-in tiny model: a small Llama-shaped decoder with random weights from a seed, and a byte-level tokenizer.

Both are made here, deterministically and without any download, for the quickstart, the tests and `--model builtin`.
The tokenizer is a real Hugging Face fast tokenizer (every byte one token, plus chat special tokens and a chat
template), so everything downstream runs through the same code as for real checkpoints.
"""
from __future__ import annotations

from pathlib import Path

import torch

from slimtune.models.config import ModelConfig

BUILTIN_NAMES = ("builtin", "slimtune-tiny")
SPECIALS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|reserved|>"]
N_SPECIAL = len(SPECIALS)  # the 256 bytes follow at ids 8..263
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def builtin_config() -> ModelConfig:
    """d 256, 4 layers, 4 heads / 2 KV heads, SwiGLU 688, vocab 320 (264 used): about 3.1M parameters."""
    return ModelConfig(vocab_size=320, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, model_type="llama", rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=[2, 6], pad_token_id=0, dtype="float32")


def builtin_model(seed: int = 0):
    """The tiny decoder with normal(0, 0.02) weights drawn from `seed` (fp32, CPU)."""
    from slimtune.models.decoder import Decoder, init_weights

    return init_weights(Decoder(builtin_config()), seed)


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to code points from 256 up."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def builtin_tokenizer():
    """A `transformers.PreTrainedTokenizerFast`: specials at ids 0..7, byte b at id 8 + b; chat template included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({ch: N_SPECIAL + b for b, ch in _bytes_to_unicode().items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=SPECIALS[3:], chat_template=CHAT_TEMPLATE,
                                   padding_side="left", model_max_length=2048)


def write_builtin(path: str | Path, seed: int = 0, dtype: torch.dtype | None = None) -> Path:
    """Write the tiny model as a Hugging Face folder (config.json, model.safetensors, tokenizer files)."""
    from slimtune.models.save import save_model

    path = Path(path)
    save_model(builtin_model(seed), path, dtype=dtype, tokenizer=builtin_tokenizer())
    return path
