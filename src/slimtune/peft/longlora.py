"""LongLoRA (Chen et al. 2023, "LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models"): extend a
model's context by fine-tuning LoRA on q, k, v, o together with the embeddings and norms ("LoRA+", the paper's
Table 2: without them long-context perplexity stays far from full fine-tuning), under shifted sparse attention
(S^2-Attn, `models.shifted`) in training and full attention at inference, with the RoPE positions scaled to the new
length (linear position interpolation as the paper; dynamic NTK or YaRN where asked).

An adapter in PEFT's LoRA format: the embeddings and norms are `modules_to_save`, the RoPE scaling is written
beside them (`rope_type`, `rope_factor`) and applied again when the adapter is loaded into slimtune (with transformers
+ PEFT, set the same `rope_scaling` on the base config). Needs slimtune's Decoder (its `Attention.s2_group`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from slimtune.errors import ConfigError
from slimtune.peft import lora
from slimtune.peft.base import MethodSpec, option, register
from slimtune.peft.lora import LoraConfig
from slimtune.peft.save_modules import NORMS, present_modules

ROPE_TYPES = ("linear", "dynamic", "yarn", "none")
EMBED_NORM = ("embed_tokens", *NORMS)  # LoRA+: trainable copies of these
_KEY = "slimtune_longlora"  # model.__dict__[_KEY]: {"names": LongLoRA adapters applied, "base": the base's RoPE}


@dataclass
class LongLoraConfig(LoraConfig):
    """LoRA's options (rank 8 on q, k, v, o by default, as the paper), plus: rope_factor f (the context grows f
    times: max_position_embeddings L -> f L), rope_type (linear, dynamic, yarn; none keeps the model's RoPE), s2_group
    (S^2-Attn group size in tokens; default f L / 4, the paper's quarter of the target length; 0 turns S^2-Attn off),
    trainable_embed_norm (LoRA+). original_max_position_embeddings is filled from the model by `apply`."""

    method = "longlora"
    peft_type = "LORA"
    lora_alpha: float = option(16, flat="alpha", help="LoRA scaling numerator: the update is scaled by alpha / r")
    target_modules: list[str] | str | None = option(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], flat="targets",
        help="modules to adapt: comma-separated names / suffixes, a regex, or all-linear")
    rope_factor: float = option(4.0, flat="rope_factor", help="LongLoRA: extend the context this many times")
    rope_type: str = option("linear", flat="rope_type", help="LongLoRA RoPE scaling: linear, dynamic, yarn or none")
    s2_group: int | None = option(None, flat="s2_group", help="LongLoRA S^2-Attn group (tokens); 0: full attention")
    trainable_embed_norm: bool = option(True, flat="trainable_embed_norm",
                                        help="LongLoRA: train the embeddings and norms too (LoRA+)")
    original_max_position_embeddings: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"longlora rope_type {self.rope_type!r} is unknown; choose one of {', '.join(ROPE_TYPES)}")
        if not (isinstance(self.rope_factor, (int, float)) and self.rope_factor >= 1):
            raise ConfigError(f"longlora rope_factor must be a number >= 1, got {self.rope_factor!r}")
        if self.s2_group is not None and (isinstance(self.s2_group, bool) or not isinstance(self.s2_group, int)
                                          or self.s2_group < 0 or self.s2_group % 2):
            raise ConfigError(f"longlora s2_group must be an even number of tokens >= 0, got {self.s2_group!r}")

    def to_peft_json(self) -> dict[str, Any]:
        return {**super().to_peft_json(), "slimtune_method": "longlora"}  # PEFT reads it as LoRA, ignoring the rest

    def rope_scaling(self, old: int) -> dict[str, Any] | None:
        """The model's new `rope_scaling` for an original context of `old` positions (None for rope_type none)."""
        f = float(self.rope_factor)
        if self.rope_type == "none":
            return None
        if self.rope_type == "yarn":
            return {"rope_type": "yarn", "factor": f, "original_max_position_embeddings": old}
        return {"rope_type": self.rope_type, "factor": f}

    def group(self) -> int:
        """The S^2-Attn group size: s2_group, else a quarter of the extended context (even)."""
        if self.s2_group is not None:
            return self.s2_group
        return max(2, int(self.original_max_position_embeddings * self.rope_factor) // 8 * 2)


def _attentions(model: nn.Module) -> list[nn.Module]:
    from slimtune.models.attention import Attention

    atts = [m for m in model.modules() if isinstance(m, Attention)]
    if not atts or not hasattr(model, "reset_rope"):
        raise ConfigError(f"longlora needs slimtune's Decoder (its S^2-Attn and RoPE scaling); {type(model).__name__} "
                          "is not one: load the model with slimtune")
    return atts


def _fill(model: nn.Module, cfg: LongLoraConfig) -> LongLoraConfig:
    """Fill original_max_position_embeddings and (LoRA+) modules_to_save from the model."""
    _attentions(model)
    mc = model.config
    if cfg.original_max_position_embeddings is None:
        state = model.__dict__.get(_KEY)
        cfg.original_max_position_embeddings = state["base"][1] if state else mc.max_position_embeddings
    if cfg.trainable_embed_norm and cfg.modules_to_save is None:
        cfg.modules_to_save = present_modules(model, EMBED_NORM)
    return cfg


def apply(model: nn.Module, cfg: LongLoraConfig, name: str = "default") -> None:
    """LoRA (+ trainable copies of the embeddings and norms) as adapter `name`, the RoPE scaled to the longer context,
    and S^2-Attn switched on in every attention layer (it acts in training mode only).

    Raises:
        ConfigError: bad options; a model that is not slimtune's Decoder; a base that already scales RoPE otherwise
            (e.g. llama3) with a rope_type other than none.
    """
    cfg.validate()
    atts = _attentions(model)
    _fill(model, cfg)
    mc, state = model.config, model.__dict__.get(_KEY)
    had = (mc.rope_scaling or {}).get("rope_type", "default")
    new = cfg.rope_scaling(cfg.original_max_position_embeddings)
    if new is not None and had != "default" and not state:
        raise ConfigError(f"the base model already scales RoPE ({had}); set rope_type=none to keep its scaling, or "
                          "extend a model with plain RoPE")
    lora.apply(model, cfg, name)
    if not state:
        state = model.__dict__[_KEY] = {"names": [], "base": (mc.rope_scaling, mc.max_position_embeddings)}
    state["names"].append(name)
    if new is not None:
        mc.rope_scaling = new
        if cfg.rope_type != "dynamic":  # dynamic NTK reads max_position_embeddings as the original length
            mc.max_position_embeddings = int(cfg.original_max_position_embeddings * cfg.rope_factor)
        model.reset_rope()
    for att in atts:
        att.s2_group = cfg.group() or None


def remove(model: nn.Module, name: str = "default", merged: bool = False) -> None:
    """When the last LongLoRA adapter goes: switch S^2-Attn off and, unless `merged` (the extended model keeps its
    RoPE), restore the base's RoPE."""
    state = model.__dict__.get(_KEY)
    if not state or name not in state["names"]:
        return
    state["names"].remove(name)
    if state["names"]:
        return
    del model.__dict__[_KEY]
    for att in _attentions(model):
        att.s2_group = None
    if not merged:
        model.config.rope_scaling, model.config.max_position_embeddings = state["base"]
        model.reset_rope()


def shapes(model: nn.Module, cfg: LongLoraConfig) -> dict[str, tuple[int, ...]]:
    return lora.shapes(model, _fill(model, cfg))


def state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    return lora.state_dict(model, name)


SPEC = register(MethodSpec("longlora", LongLoraConfig, apply, state_dict, shapes=shapes, remove=remove))
