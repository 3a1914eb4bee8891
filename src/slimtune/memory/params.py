"""The parameter tensors of a `Decoder` config, listed analytically (no model built), and their bytes per format.

Weights of the block linears can be stored quantized: NF4/FP4 (packed 2 per byte + one absmax per block of 64: fp32,
or with double quantization uint8 + one fp32 per 256 blocks + an fp32 offset), int8 / fp8 (1 byte + an fp32 scale per
output row), int4 (2 per byte + fp32 scale and uint8 zero per group), ternary (4 per byte + one fp32 scale); the
same buffers `slimtune.quant.QuantLinear` holds.
"""
from __future__ import annotations

from dataclasses import dataclass

from slimtune.errors import ConfigError
from slimtune.models.config import ModelConfig

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1, "int8": 1}
QUANT_FORMATS = ("nf4", "fp4", "int8", "int4", "fp8", "w8a8", "ternary")


def dtype_bytes(name: str, what: str = "dtype") -> int:
    """Bytes per element of a dtype name ('bf16', 'float32', ...).

    Raises:
        ConfigError: unknown name.
    """
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise ConfigError(f"unknown {what} {name!r}; choose one of fp32, bf16, fp16, fp8, int8")
    return DTYPE_BYTES[key]


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
    lin = [("self_attn", "q_proj", qd, d, cfg.qkv_bias), ("self_attn", "k_proj", kvd, d, cfg.qkv_bias),
           ("self_attn", "v_proj", kvd, d, cfg.qkv_bias), ("self_attn", "o_proj", d, qd, cfg.o_bias)]
    if cfg.mlp_gated:
        lin.append(("mlp", "gate_proj", f, d, cfg.mlp_bias))
    lin += [("mlp", "up_proj", f, d, cfg.mlp_bias), ("mlp", "down_proj", d, f, cfg.mlp_bias)]
    norm_shapes = [(d,), (d,)] if cfg.norm_type == "rms" else [(d,), (d,), (d,), (d,)]
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        for j, shape in enumerate(norm_shapes):
            which = "input_layernorm" if j % 2 == 0 else "post_attention_layernorm"
            ps.append(Param(f"{pre}{which}.{'weight' if j < 2 else 'bias'}", shape, "norm", i))
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


def quant_linear_bytes(out_f: int, in_f: int, fmt: str, group: int | None = None, double_quant: bool = True) -> int:
    """Bytes of one quantized (out_f, in_f) weight: the buffers of `QuantLinear` (bias excluded).

    Raises:
        ConfigError: unknown format.
    """
    n = out_f * in_f
    if fmt in ("nf4", "fp4"):
        g = group or 64
        nb = -(-n // g)  # blocks of `g` weights, each with one absmax
        absmax = nb + 4 * -(-nb // 256) + 4 if double_quant else 4 * nb
        return (n + 1) // 2 + absmax
    if fmt in ("int8", "w8a8", "fp8"):
        return n + 4 * out_f
    if fmt == "int4":
        g = group or 64
        return n // 2 + out_f * (in_f // g) * 5
    if fmt == "ternary":
        return n // 4 + 4
    raise ConfigError(f"unknown weight format {fmt!r}; choose a dtype (fp32, bf16, fp16) or one of "
                      f"{', '.join(QUANT_FORMATS)}")


def quant_tables_bytes(fmt: str, double_quant: bool = True) -> int:
    """Per-layer lookup tables a 4-bit checkpoint carries: the 16-entry code (fp32) and, with double quantization, the
    256-entry code of the absmax values (fp32). Zero for the other formats."""
    if fmt not in ("nf4", "fp4"):
        return 0
    return 16 * 4 + (256 * 4 if double_quant else 0)
