"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"): P trainable key
and value vectors at every layer that every query attends to; optionally produced during training by an MLP from P
smaller embeddings (the paper's reparameterisation), folded into plain prefixes afterwards.

Enters slimtune's Decoder through each `Attention.prefix` hook, and a transformers model through its cache API (a
`DynamicCache` holding the P prefix positions, as PEFT does). Run it with `prompt.forward_with_prompts`, which numbers
the real tokens from P as PEFT does (the prefix keys carry no rotation, so the offset matters); a plain `model(...)`
call numbers them from 0. File: PEFT's `prompt_embeddings` of shape (P, 2 L nkv hd), whose last axis is laid out as
(layer, k|v, kv head, head dim), PEFT's past_key_values order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimtune.errors import ConfigError
from slimtune.peft.base import MethodConfig, MethodSpec, check_rank, option, register
from slimtune.peft.prompt import get_encoder, parameters, prompt_modules, word_embeddings
from slimtune.peft.prompt import remove as remove_prompt


@dataclass
class PrefixTuningConfig(MethodConfig):
    """PEFT's PrefixTuningConfig fields: num_virtual_tokens P; prefix_projection: produce the prefixes with an MLP
    from P embeddings of width t = nkv hd (Linear(t, h), tanh, Linear(h, 2 L t)) while training, as PEFT;
    encoder_hidden_size h (default t); init_weights
    'zero' starts the prefixes (or the MLP's last layer) at zero, None draws them from normal(0, 1) as PEFT.
    token_dim (nkv hd), num_layers and num_attention_heads (nkv) are filled from the model by `apply`."""

    method = "prefix"
    peft_type = "PREFIX_TUNING"
    num_virtual_tokens: int = option(20, flat="num_virtual_tokens", cli="virtual-tokens",
                                     help="number of virtual tokens")
    prefix_projection: bool = option(False, cli="projection", help="prefix: MLP reparameterisation")
    encoder_hidden_size: int | None = option(None, cli="encoder-hidden", help="prompt encoder width")
    init_weights: str | None = None
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int = 1
    task_type: str = "CAUSAL_LM"

    def validate(self) -> None:
        check_rank(self.num_virtual_tokens, "num_virtual_tokens")
        if self.encoder_hidden_size is not None:
            check_rank(self.encoder_hidden_size, "encoder_hidden_size")
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"prefix init_weights {self.init_weights!r} is unknown; use 'zero' or leave it unset")


class PrefixEncoder(nn.Module):
    """The prefixes of all layers, (P, L * 2 * nkv * hd): a plain `embedding` table, or with projection an
    `embedding` (P, d) followed by `transform` = Linear(d, h), tanh, Linear(h, 2 L nkv hd); d = nkv hd as PEFT."""

    is_prefix = True

    def __init__(self, P: int, L: int, nkv: int, hd: int, d: int, h: int | None, zero: bool,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.L, self.nkv, self.hd = L, nkv, hd
        self.hooked = False  # True: slimtune's Attention.prefix hooks read it; False: `cache` feeds a transformers model
        width = L * 2 * nkv * hd
        if h is not None:
            self.embedding = nn.Embedding(P, d, device=device)
            self.transform = nn.Sequential(nn.Linear(d, h, device=device), nn.Tanh(),
                                           nn.Linear(h, width, device=device))
            if zero and not self.embedding.weight.is_meta:
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(P, width, device=device)  # normal(0, 1), as PEFT
            if zero and not self.embedding.weight.is_meta:
                nn.init.zeros_(self.embedding.weight)

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.num_embeddings

    def flat(self) -> Tensor:
        """(P, L * 2 * nkv * hd), PEFT's prompt_embeddings."""
        w = self.embedding.weight
        return self.transform(w) if hasattr(self, "transform") else w

    def layer_kv(self, layer: int) -> tuple[Tensor, Tensor]:
        """k, v of one layer, each (nkv, P, hd)."""
        P = self.num_virtual_tokens
        kv = self.flat().view(P, self.L, 2, self.nkv, self.hd)[:, layer]  # (P, 2, nkv, hd)
        kv = kv.permute(1, 2, 0, 3)  # (2, nkv, P, hd)
        return kv[0], kv[1]

    def cache(self, B: int, dtype: torch.dtype):
        """A transformers `DynamicCache` already holding the prefix: per layer k, v (B, nkv, P, hd) in `dtype` (the
        graph to the encoder kept, so the prefix trains through it)."""
        from transformers import DynamicCache

        kv = [self.layer_kv(i) for i in range(self.L)]
        return DynamicCache([(k[None].expand(B, -1, -1, -1).to(dtype), v[None].expand(B, -1, -1, -1).to(dtype))
                             for k, v in kv])


class LayerPrefix(nn.Module):
    """The `Attention.prefix` hook of one layer: (k, v), each (B, nkv, P, hd), read from the shared encoder (held
    outside the module tree, so its parameters are counted once, under model.prompt_encoder)."""

    def __init__(self, encoder: PrefixEncoder, layer: int) -> None:
        super().__init__()
        self._encoder = [encoder]
        self.layer = layer

    def forward(self, B: int) -> tuple[Tensor, Tensor]:
        k, v = self._encoder[0].layer_kv(self.layer)
        return k[None].expand(B, -1, -1, -1), v[None].expand(B, -1, -1, -1)


def _attentions(model: nn.Module) -> list[nn.Module]:
    """slimtune's attention layers in order (none in a transformers model)."""
    from slimtune.models.attention import Attention

    return sorted((m for m in model.modules() if isinstance(m, Attention)), key=lambda m: m.layer_idx)


def _dims(model: nn.Module) -> tuple[int, int, int]:
    """(layers L, key/value heads nkv, head dim hd): from slimtune's attention layers, else from a transformers
    model's config.

    Raises:
        ConfigError: a model with neither.
    """
    atts = _attentions(model)
    if atts:
        return len(atts), atts[0].nkv, atts[0].hd
    mc = getattr(model, "config", None)
    get_text = getattr(mc, "get_text_config", None)
    mc = get_text() if get_text is not None else mc
    L, nh = getattr(mc, "num_hidden_layers", None), getattr(mc, "num_attention_heads", None)
    if not L or not nh:
        raise ConfigError(f"prefix tuning needs a decoder with a KV cache: slimtune's Decoder or a transformers model "
                          f"(num_hidden_layers, num_attention_heads in its config); {type(model).__name__} has neither")
    nkv = getattr(mc, "num_key_value_heads", None) or nh
    return L, nkv, getattr(mc, "head_dim", None) or mc.hidden_size // nh


# ---- method protocol ------------------------------------------------------------------------------------------------
def _fill(model: nn.Module, cfg: PrefixTuningConfig) -> tuple[int, int, int, int]:
    L, nkv, hd = _dims(model)
    cfg.num_layers, cfg.num_attention_heads, cfg.token_dim = L, nkv, nkv * hd  # PEFT's GQA convention
    return L, nkv, hd, nkv * hd  # the MLP's input width: PEFT's token_dim


def apply(model: nn.Module, cfg: PrefixTuningConfig, name: str = "default") -> None:
    """Add prefix encoder `name` as model.prompt_encoder[name]; hook it into every attention layer of slimtune's
    Decoder (a transformers model gets it through its cache in `forward_with_prompts`).

    Raises:
        ConfigError: a bad option; a model that is neither slimtune's Decoder nor a transformers decoder.
    """
    cfg.validate()
    L, nkv, hd, d = _fill(model, cfg)
    dev = word_embeddings(model).weight.device
    h = (cfg.encoder_hidden_size or d) if cfg.prefix_projection else None
    enc = PrefixEncoder(cfg.num_virtual_tokens, L, nkv, hd, d, h, cfg.init_weights == "zero", device=dev)
    prompt_modules(model)[name] = enc
    _hook(model, enc)


def _hook(model: nn.Module, enc: PrefixEncoder) -> None:
    atts = _attentions(model)
    for i, att in enumerate(atts):
        att.prefix = LayerPrefix(enc, i)
    enc.hooked = bool(atts)


def remove(model: nn.Module, name: str = "default", merged: bool = False) -> None:
    """Unhook and delete prefix adapter `name` (`MethodSpec.remove`).

    Raises:
        ConfigError: `merged` (prefixes do not fold into weights).
    """
    enc = get_encoder(model, name)
    for att in _attentions(model):
        if isinstance(att.prefix, LayerPrefix) and att.prefix._encoder[0] is enc:
            att.prefix = None
    remove_prompt(model, name, merged)


@torch.no_grad()
def fold(model: nn.Module, name: str = "default") -> None:
    """Replace a projected encoder by the plain prefixes it produces now (what the file stores); no-op if plain."""
    enc = get_encoder(model, name)
    if not hasattr(enc, "transform"):
        return
    flat = enc.flat()
    plain = PrefixEncoder(enc.num_virtual_tokens, enc.L, enc.nkv, enc.hd, 0, None, False, device=flat.device)
    plain.embedding.weight.copy_(flat)
    prompt_modules(model)[name] = plain
    _hook(model, plain)


def state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """{'prompt_embeddings': (P, 2 L nkv hd)} (produced by the MLP, detached, while not folded)."""
    enc = get_encoder(model, name)
    if hasattr(enc, "transform"):
        with torch.no_grad():
            return {"prompt_embeddings": enc.flat()}
    return {"prompt_embeddings": enc.embedding.weight.detach()}


@torch.no_grad()
def load_state_dict(model: nn.Module, sd: dict[str, Tensor], name: str = "default") -> None:
    """Load plain prefixes (a projected encoder `name` is replaced by a plain one)."""
    fold(model, name)
    get_encoder(model, name).embedding.weight.copy_(sd["prompt_embeddings"])


def shapes(model: nn.Module, cfg: PrefixTuningConfig) -> dict[str, tuple[int, ...]]:
    L, nkv, hd, _ = _fill(model, cfg)
    return {"prompt_embeddings": (cfg.num_virtual_tokens, L * 2 * nkv * hd)}


SPEC = register(MethodSpec("prefix", PrefixTuningConfig, apply, state_dict, load_state_dict, shapes, parameters,
                           remove))
