"""One flat config for every supported decoder, read from and written to a Hugging Face `config.json`.

Architectures differ only in fields: q/k/v biases (Qwen2), q/k RMSNorm (Qwen3), sliding window (Mistral), RoPE
scaling (llama3 for Llama 3.1+; linear, dynamic NTK and YaRN to extend a context, `rope.py`); Gemma 2 / 3 and Phi-3
add theirs (read and written in `families.py`). The GPT-style fields (LayerNorm, plain GELU MLP, learned positions)
exist so that shapes such as GPT-3 175B can be built and counted.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimtune.errors import CheckpointError
from slimtune.io.jsonfile import read_json
from slimtune.models.families import WINDOWED, family_fields, family_hf, normalize_rope, with_defaults
from slimtune.models.validate import check_hf_config
from slimtune.precision.formats import declared_float

# model_type -> the transformers class name written in `architectures`
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' names of the attention kinds
O_BIAS = ("llama", "qwen3", "gemma2", "gemma3_text")  # attention_bias covers o_proj too


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    model_type: str = "llama"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    mlp_gated: bool = True  # SwiGLU (gate, up, down); False: up -> act -> down (GPT)
    norm_type: str = "rms"  # "rms" or "layer" (LayerNorm with bias, GPT)
    learned_positions: bool = False  # GPT's absolute position table instead of RoPE
    # Gemma 2 / 3
    norm_offset: bool = False  # RMSNorm scales by (1 + w), in fp32, before the cast back
    sandwich_norm: bool = False  # 4 norms a block: before and after attention, before and after the MLP
    embed_scale: bool = False  # token embeddings times sqrt(hidden_size) (rounded to the weights' dtype)
    query_pre_attn_scalar: float | None = None  # scores scaled by this ** -0.5 instead of head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> c * tanh(scores / c) before the softmax
    final_softcap: float | None = None  # logits -> c * tanh(logits / c)
    layer_types: list[str] | None = None  # per layer, one of LAYER_TYPES; None: every layer sliding if a window
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3), unscaled
    # Phi-3
    fused_proj: bool = False  # qkv_proj and gate_up_proj: q, k, v (and gate, up) as one linear each
    partial_rotary_factor: float = 1.0  # RoPE turns the first int(head_dim * factor) features only
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    dtype: str = "float32"  # the checkpoint's declared torch_dtype
    hf: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # the original config.json

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                                  f"num_key_value_heads={self.num_key_value_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise CheckpointError(f"RoPE scaling type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        if self.layer_types is not None:
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            if bad or len(self.layer_types) != self.num_hidden_layers:
                raise CheckpointError(f"layer_types must name {self.num_hidden_layers} layers, each one of "
                                      f"{', '.join(LAYER_TYPES)}; got {self.layer_types}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise CheckpointError("layer_types has sliding_attention layers but sliding_window is not set")

    @property
    def rotary_dim(self) -> int:
        """The number of features of each head that RoPE turns (the first ones; Phi-3's partial rotary)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_type(self, i: int) -> str:
        """'sliding_attention' or 'full_attention' for layer i."""
        if self.layer_types is not None:
            return self.layer_types[i]
        return "sliding_attention" if self.sliding_window else "full_attention"

    @property
    def torch_dtype(self) -> torch.dtype:
        """The declared storage dtype: fp32, bf16 or fp16 (float32 for anything else config.json may name)."""
        return declared_float(self.dtype)

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ---- Hugging Face config.json --------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Parse a transformers `config.json` dict (4.x keys or 5.x `rope_parameters`).

        Raises:
            CheckpointError: unsupported architecture, or a missing required key.
        """
        mt = d.get("model_type")
        if mt not in ARCHITECTURES:
            raise CheckpointError(f"{source}: model_type {mt!r} is not supported; supported architectures: "
                                  f"{', '.join(ARCHITECTURES)} ({', '.join(ARCHITECTURES.values())})")
        d = with_defaults(mt, d)
        check_hf_config(d, source)
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope = dict(rope.get("full_attention") or {}) if "full_attention" in rope else rope  # per layer type (5.x)
        theta = rope.pop("rope_theta", None) or d.get("rope_theta", 10000.0)
        rope = normalize_rope(rope, d)
        attn_bias = bool(d.get("attention_bias", False))
        window = d.get("sliding_window") if (mt in WINDOWED or d.get("use_sliding_window")) else None
        dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
        try:
            extra = family_fields(mt, d, source)
            return cls(
                vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim"), model_type=mt,
                rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=rope or None,
                max_position_embeddings=d.get("max_position_embeddings", 4096),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=True if mt == "qwen2" else attn_bias, o_bias=attn_bias if mt in O_BIAS else False,
                mlp_bias=bool(d.get("mlp_bias", False)), qk_norm=mt in ("qwen3", "gemma3_text"),
                sliding_window=window, hidden_act=d.get("hidden_activation") or d.get("hidden_act", "silu"),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
                dtype=dtype if isinstance(dtype, str) else "float32", hf=dict(d), **extra)
        except KeyError as e:
            raise CheckpointError(f"{source}: required key {e.args[0]!r} is missing") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_hf(read_config_json(path), source=str(path))

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers (4.x and 5.x) loads: the original keys, updated with ours."""
        if self.model_type not in ARCHITECTURES:
            raise CheckpointError(f"model_type {self.model_type!r} cannot be written as a Hugging Face checkpoint")
        d = dict(self.hf)
        d.pop("rope_parameters", None)
        d.update(
            architectures=[ARCHITECTURES[self.model_type]], model_type=self.model_type, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, hidden_act=self.hidden_act,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
            torch_dtype=self.dtype)
        if self.model_type in ("llama", "qwen3"):
            d["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        if self.model_type in WINDOWED:
            d["sliding_window"] = self.sliding_window
        d.update(family_hf(self))
        d.pop("dtype", None)
        return d


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The dict of a config.json file.

    Raises:
        CheckpointError: no such file, bad JSON (`io.jsonfile.read_json`), or not a JSON object.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: config.json not found; a Hugging Face model folder holds config.json "
                              "and *.safetensors")
    return read_json(path, fix="copy config.json again from the model's source")
