"""Quantization-aware training and BitNet b1.58 as fine-tuning methods, so the one training loop runs them
(`method: qat` / `method: bitnet`) like any adapter: `apply` wraps the linear layers, `freeze_base` leaves their
weights trainable, and the adapter file holds the trained latent weights (slimtune_method qat / bitnet).

qat: every linear layer but `skip` computes with Q(W) (int8 / int4 / nf4 round trip, straight-through gradients,
optional int8 activations; `slimtune.quant.fake`). With `r` set (`rank: 16` in a training config), the fake-quantized
weights stay frozen and a LoRA adapter trains on top instead; converting then quantizes W + s B A.
bitnet: every linear layer but `skip` becomes a BitLinear (ternary weights, int8 activations, STE).
`convert(model)` turns either into real QuantLinear layers; `export_quantized` writes a checkpoint `load_model` reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from slimtune.errors import ConfigError
from slimtune.peft.base import FILE_PREFIX, MethodConfig, MethodSpec, check_rank, option, register
from slimtune.peft.layer import layer_parameters

_KEY = "slimtune_qat"  # model.__dict__[_KEY][adapter name] = the wrapped layer paths


@dataclass
class QatConfig(MethodConfig):
    """fmt: int8, int4 or nf4 (the format converted to); group_size: int4 group / nf4 block (default 64); act_bits:
    8 for fake int8 activations (int8 + 8 converts to W8A8); skip: linear layers left alone; r / lora_alpha: train a
    LoRA adapter of rank r over the frozen fake-quantized weights instead of the weights themselves."""

    method = "qat"
    peft_type = None
    fmt: str = "int4"
    group_size: int | None = None
    act_bits: int | None = None
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    r: int | None = option(None, flat="rank")
    lora_alpha: float | None = option(None, flat="alpha")

    def validate(self) -> None:
        from slimtune.quant.fake import QATConfig

        QATConfig(self.fmt, self.group_size, self.act_bits)  # raises ConfigError on a bad format / act_bits
        if self.r is not None:
            check_rank(self.r, "qat LoRA rank r")

    def qat(self):
        from slimtune.quant.fake import QATConfig

        return QATConfig(self.fmt, self.group_size, self.act_bits)


@dataclass
class BitnetConfig(MethodConfig):
    """BitNet b1.58: every linear layer but `skip` trains as a BitLinear (exported as 2-bit packed ternary)."""

    method = "bitnet"
    peft_type = None
    skip: list[str] = field(default_factory=lambda: ["lm_head"])


def _lora_config(cfg: QatConfig, paths: list[str]):
    from slimtune.peft.lora import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha or cfg.r, target_modules=paths)


def _wrapped(model: nn.Module, name: str) -> list[str]:
    paths = model.__dict__.get(_KEY, {}).get(name)
    if paths is None:
        raise ConfigError(f"no qat / bitnet adapter named {name!r} on this model")
    return paths


def _apply(model: nn.Module, cfg: QatConfig | BitnetConfig, name: str) -> None:
    """Wrap the linear layers (once per model) and, for qat with r, add LoRA on top.

    Raises:
        ConfigError: a second qat / bitnet adapter, no linear layer, a group size that does not divide a width.
    """
    from slimtune.quant.bitnet import prepare_bitnet
    from slimtune.quant.fake import prepare_qat

    cfg.validate()
    if model.__dict__.get(_KEY):
        raise ConfigError(f"this model already trains {', '.join(model.__dict__[_KEY])} by qat / bitnet; one per model")
    skip = tuple(cfg.skip)
    paths = prepare_bitnet(model, skip) if isinstance(cfg, BitnetConfig) else prepare_qat(model, cfg.qat(), skip)
    model.__dict__.setdefault(_KEY, {})[name] = paths
    if isinstance(cfg, QatConfig) and cfg.r:
        from slimtune.peft import lora

        lora.apply(model, _lora_config(cfg, paths), name)


def _weights(model: nn.Module, name: str) -> list[tuple[str, nn.Parameter]]:
    """(file key, parameter) of the wrapped layers' latent weights and biases."""
    out = []
    for p in _wrapped(model, name):
        m = model.get_submodule(p)
        m = getattr(m, "base_layer", m)  # a LoraLinear over a FakeQuantLinear
        for k in ("weight", "bias"):
            t = getattr(m, k, None)
            if isinstance(t, nn.Parameter):
                out.append((f"{FILE_PREFIX}{p}.{k}", t))
    return out


def _parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    cfg = model.__dict__.get("slimtune_adapters", {}).get(name)
    if isinstance(cfg, QatConfig) and cfg.r:
        return layer_parameters(model, name)
    return [t for _, t in _weights(model, name)]


def _state_dict(model: nn.Module, name: str) -> dict[str, Tensor]:
    cfg = model.__dict__.get("slimtune_adapters", {}).get(name)
    if isinstance(cfg, QatConfig) and cfg.r:
        from slimtune.peft import lora

        return lora.state_dict(model, name)
    return {k: t.detach() for k, t in _weights(model, name)}


def _shapes(model: nn.Module, cfg: QatConfig | BitnetConfig) -> dict[str, tuple[int, ...]]:
    from slimtune.quant.linear import linear_names

    paths = linear_names(model, tuple(cfg.skip))
    if isinstance(cfg, QatConfig) and cfg.r:
        from slimtune.peft import lora

        return lora.shapes(model, _lora_config(cfg, paths))
    out = {}
    for p in paths:
        m = model.get_submodule(p)
        out[f"{FILE_PREFIX}{p}.weight"] = tuple(m.weight.shape)
        if m.bias is not None:
            out[f"{FILE_PREFIX}{p}.bias"] = tuple(m.bias.shape)
    return out


def convert(model: nn.Module) -> list[str]:
    """Replace the trained layers by real QuantLinear layers, in place (qat: the format trained for; bitnet: packed
    ternary); a LoRA adapter on top is merged into the latent weights first. Returns the converted paths."""
    from slimtune.peft.api import merge_and_unload
    from slimtune.quant.bitnet import export_bitnet
    from slimtune.quant.fake import convert_qat

    merge_and_unload(model)  # LoRA over FakeQuantLinear: W <- W + s B A; then the registry is cleared
    names = convert_qat(model) + export_bitnet(model)
    model.__dict__.pop(_KEY, None)
    return names


def export_quantized(model: nn.Module, out: str | Path, tokenizer=None, tokenizer_dir: str | Path | None = None) -> Path:
    """`convert` the model and write it as a slimtune-quantized checkpoint (`load_model` / `slimtune generate` read
    it). Returns the folder."""
    from slimtune.quant.linear import QuantLinear
    from slimtune.models.save import save_quantized
    from slimtune.quant.ptq import quant_config

    convert(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    fmts = sorted({m.fmt for m in layers.values()})
    group = next((m.group_size for m in layers.values() if m.group_size), None)
    qcfg = quant_config(fmts[0] if len(fmts) == 1 else "mixed", group, False, (), {n: m.fmt for n, m in layers.items()})
    return save_quantized(model, out, qcfg, tokenizer, tokenizer_dir)


QAT = register(MethodSpec("qat", QatConfig, _apply, _state_dict, None, _shapes, _parameters))
BITNET = register(MethodSpec("bitnet", BitnetConfig, _apply, _state_dict, None, _shapes, _parameters))
