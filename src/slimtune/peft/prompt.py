"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"): n trainable
virtual-token embeddings prepended to the input embeddings; the model itself is untouched.

The prompt modules of every prompt method (prompt, P-tuning, prefix) live in `model.prompt_encoder[name]`;
`forward_with_prompts` runs a model with them: it prepends the virtual tokens, extends the attention mask with ones,
ignores the virtual positions in the loss and returns the logits of the real tokens only, aligned with `labels`.
File: PEFT's single tensor `prompt_embeddings`, shape (n, d).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from slimtune.errors import ConfigError
from slimtune.peft.base import MethodConfig, MethodSpec, check_rank, option, register
from slimtune.peft.layer import active_adapters
from slimtune.train.loss import mean_lm_loss

INITS = ("SAMPLE_VOCAB", "TEXT", "RANDOM")


@dataclass
class PromptTuningConfig(MethodConfig):
    """PEFT's PromptTuningConfig fields. prompt_tuning_init: SAMPLE_VOCAB (rows of random vocabulary tokens, the
    default here), TEXT (the embeddings of `prompt_tuning_init_text`, tokenized with `tokenizer_name_or_path` and
    repeated or cut to n tokens) or RANDOM (normal(0, 1), PEFT's default). token_dim, num_layers and
    num_attention_heads are filled from the model by `apply` (PEFT writes them to adapter_config.json)."""

    method = "prompt"
    peft_type = "PROMPT_TUNING"
    num_virtual_tokens: int = option(20, flat="num_virtual_tokens", cli="virtual-tokens",
                                     help="number of virtual tokens")
    prompt_tuning_init: str = "SAMPLE_VOCAB"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int = 1
    task_type: str = "CAUSAL_LM"
    inference_mode: bool = False  # True (as read from a file): skip the init, the weights come from the file

    def validate(self) -> None:
        check_rank(self.num_virtual_tokens, "num_virtual_tokens")
        if str(self.prompt_tuning_init).upper() not in INITS:
            raise ConfigError(f"prompt_tuning_init {self.prompt_tuning_init!r} is unknown; choose one of "
                              f"{', '.join(INITS)}")
        if str(self.prompt_tuning_init).upper() == "TEXT" and not self.prompt_tuning_init_text:
            raise ConfigError("prompt_tuning_init TEXT needs prompt_tuning_init_text (the text whose tokens start "
                              "the virtual embeddings)")


# ---- the model's prompt modules -------------------------------------------------------------------------------------
def word_embeddings(model: nn.Module) -> nn.Embedding:
    """The input token embedding of a model: transformers' get_input_embeddings(), else `*.embed_tokens`, else the
    first nn.Embedding.

    Raises:
        ConfigError: the model has no token embedding.
    """
    get = getattr(model, "get_input_embeddings", None)
    if get is not None:
        emb = get()
        if emb is not None:
            return emb
    embs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    for n, m in embs:
        if n.endswith("embed_tokens"):
            return m
    if not embs:
        raise ConfigError(f"prompt methods need a token embedding, and {type(model).__name__} has no nn.Embedding")
    return embs[0][1]


def prompt_modules(model: nn.Module) -> nn.ModuleDict:
    """`model.prompt_encoder`: adapter name -> prompt module (created empty on first use)."""
    if not isinstance(getattr(model, "prompt_encoder", None), nn.ModuleDict):
        model.prompt_encoder = nn.ModuleDict()
    return model.prompt_encoder


def get_encoder(model: nn.Module, name: str | None = None) -> nn.Module:
    """The prompt module `name` (default: the last one added).

    Raises:
        ConfigError: the model carries no prompt method (or not this name).
    """
    mods = getattr(model, "prompt_encoder", None)
    if not isinstance(mods, nn.ModuleDict) or not len(mods):
        raise ConfigError("this model carries no prompt method; apply prompt, ptuning or prefix first")
    if name is None:
        name = list(mods.keys())[-1]
    if name not in mods:
        raise ConfigError(f"no prompt adapter named {name!r}; this model has {', '.join(mods.keys())}")
    return mods[name]


class PromptEmbedding(nn.Module):
    """The virtual tokens themselves: `prompt_embeddings` (n, d), fp32 (cast to the model dtype when used)."""

    def __init__(self, n: int, d: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.prompt_embeddings = nn.Parameter(torch.empty(n, d, device=device, dtype=torch.float32))

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_embeddings.shape[0]

    def embeds(self) -> Tensor:
        """(n, d) virtual-token embeddings."""
        return self.prompt_embeddings


def active_prompt(model: nn.Module) -> nn.Module | None:
    """The prompt module of the active adapter, for generation: a prepending one (`embeds()`: (n, d)) or a prefix
    (`is_prefix`, `layer_kv(i)`); None when no prompt adapter is active.

    Raises:
        ConfigError: several prompt adapters are active.
    """
    mods = getattr(model, "prompt_encoder", None)
    if not isinstance(mods, nn.ModuleDict):
        return None
    names = [n for n in active_adapters(model) if n in mods]
    if len(names) > 1:
        raise ConfigError(f"prompt adapters {', '.join(names)} are all active; generation prepends one: "
                          "set_adapter(model, NAME) first")
    return mods[names[0]] if names else None


def virtual_tokens(enc: nn.Module) -> Tensor:
    """The n virtual tokens (n, d) a prepending encoder produces, in eval mode (no dropout), without a graph."""
    was = enc.training
    enc.eval()
    with torch.no_grad():
        out = enc.embeds()
    enc.train(was)
    return out


class PromptOutput(NamedTuple):
    logits: Tensor  # (B, T, vocab): the real tokens' logits, logits[:, t] predicting token t + 1 as usual
    loss: Tensor | None  # mean next-token cross entropy over labels != -100, or None without labels


def _logits(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.logits


def forward_with_prompts(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                         labels: Tensor | None = None, name: str | None = None) -> PromptOutput:
    """Run `model` with its prompt adapter `name`.

    Prepending methods (prompt, ptuning): inputs_embeds = [virtual (B, n, d); embed(input_ids) (B, T, d)], the mask
    gets n leading ones, the labels n leading -100 (PEFT's layout, so the loss equals PEFT's), and the first n logits
    are dropped. Prefix tuning: the prefix enters through every layer's attention hook, the positions of the real
    tokens start at P (as PEFT's prefix in the KV cache); on a transformers model the prefix enters as a filled
    `DynamicCache` and an attention mask with P leading ones (PEFT's way).

    Args:
        input_ids: (B, T); attention_mask: (B, T) 1 = real token; labels: (B, T), -100 = ignored.
    Returns:
        PromptOutput(logits (B, T, vocab), loss or None).
    Raises:
        ConfigError: the model carries no prompt adapter (of that name).
    """
    enc = get_encoder(model, name)
    B, T = input_ids.shape
    if getattr(enc, "is_prefix", False) and not enc.hooked:  # a transformers model: the prefix as a filled cache
        P = enc.num_virtual_tokens
        am = attention_mask if attention_mask is not None else input_ids.new_ones(B, T)
        cache = enc.cache(B, word_embeddings(model).weight.dtype)
        logits = _logits(model(input_ids, attention_mask=torch.cat([am.new_ones(B, P), am], 1), past_key_values=cache))
        full_labels = labels
    elif getattr(enc, "is_prefix", False):
        P = enc.num_virtual_tokens
        if attention_mask is not None:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0) + P
        else:
            pos = torch.arange(P, P + T, device=input_ids.device)[None].expand(B, T)
        logits = _logits(model(input_ids, attention_mask=attention_mask, position_ids=pos))
        full_labels = labels
    else:
        emb = word_embeddings(model)
        x = emb(input_ids)  # (B, T, d)
        virt = enc.embeds().to(x.dtype)  # (n, d)
        n = virt.shape[0]
        x = torch.cat([virt[None].expand(B, -1, -1), x], 1)  # (B, n + T, d)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(B, n), attention_mask], 1)
        full = _logits(model(inputs_embeds=x, attention_mask=attention_mask))  # (B, n + T, V)
        logits = full[:, n:]
        full_labels = None if labels is None else torch.cat([labels.new_full((B, n), -100), labels], 1)
        if labels is not None:  # the first real label is predicted by the last virtual position
            return PromptOutput(logits, mean_lm_loss(full, full_labels))
    return PromptOutput(logits, None if full_labels is None else mean_lm_loss(logits, full_labels))


# ---- initialisation -------------------------------------------------------------------------------------------------
def text_token_ids(text: str, tokenizer, n: int) -> list[int]:
    """The tokens of `text`, repeated or cut to exactly n (PEFT's TEXT init)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError("prompt_tuning_init_text tokenizes to nothing; give a non-empty text")
    return (ids * math.ceil(n / len(ids)))[:n]


@torch.no_grad()
def _init(module: PromptEmbedding, model: nn.Module, cfg: PromptTuningConfig, tokenizer=None) -> None:
    w = module.prompt_embeddings
    if w.is_meta or cfg.inference_mode:
        return
    emb = word_embeddings(model)
    n, kind = w.shape[0], str(cfg.prompt_tuning_init).upper()
    if kind == "RANDOM":
        w.normal_(0.0, 1.0)
        return
    if kind == "TEXT":
        if tokenizer is None:
            from slimtune.models.tokenizer import load_tokenizer

            if not cfg.tokenizer_name_or_path:
                raise ConfigError("prompt_tuning_init TEXT needs tokenizer_name_or_path (a model folder or builtin)")
            tokenizer = load_tokenizer(cfg.tokenizer_name_or_path)
        ids = torch.tensor(text_token_ids(cfg.prompt_tuning_init_text, tokenizer, n), device=w.device)
    else:  # SAMPLE_VOCAB
        ids = torch.randint(0, emb.num_embeddings, (n,), device=w.device)
    w.copy_(emb.weight[ids.to(emb.weight.device)].float())


# ---- method protocol ------------------------------------------------------------------------------------------------
def fill_dims(model: nn.Module, cfg: MethodConfig) -> None:
    """Fill token_dim / num_layers / num_attention_heads from the model's config where unset (PEFT does the same)."""
    mc = getattr(model, "config", None)
    get = (lambda k: getattr(mc, k, None)) if mc is not None else (lambda k: None)
    if cfg.token_dim is None:
        cfg.token_dim = word_embeddings(model).embedding_dim
    if cfg.num_layers is None:
        cfg.num_layers = get("num_hidden_layers")
    if cfg.num_attention_heads is None:
        cfg.num_attention_heads = get("num_attention_heads")


def apply(model: nn.Module, cfg: PromptTuningConfig, name: str = "default", tokenizer=None) -> None:
    """Add n virtual tokens as `model.prompt_encoder[name]`, initialised per cfg.prompt_tuning_init.

    Raises:
        ConfigError: n <= 0, an unknown init, TEXT without a text or tokenizer, a model without token embedding.
    """
    cfg.validate()
    fill_dims(model, cfg)
    emb = word_embeddings(model)
    module = PromptEmbedding(cfg.num_virtual_tokens, cfg.token_dim, device=emb.weight.device)
    _init(module, model, cfg, tokenizer)
    prompt_modules(model)[name] = module


def state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """{'prompt_embeddings': (n, d)}."""
    return {"prompt_embeddings": get_encoder(model, name).prompt_embeddings.detach()}


def parameters(model: nn.Module, name: str = "default") -> list[nn.Parameter]:
    """The parameters of prompt module `name` (prompt, ptuning and prefix alike)."""
    return list(get_encoder(model, name).parameters())


@torch.no_grad()
def load_state_dict(model: nn.Module, sd: dict[str, Tensor], name: str = "default") -> None:
    get_encoder(model, name).prompt_embeddings.copy_(sd["prompt_embeddings"])


def remove(model: nn.Module, name: str = "default", merged: bool = False) -> None:
    """Delete prompt module `name`, and `model.prompt_encoder` once it holds none (`MethodSpec.remove`).

    Raises:
        ConfigError: `merged`: virtual tokens do not fold into weights (use unload or delete_adapter).
    """
    if merged:
        raise ConfigError("prompt, prefix and P-tuning adapters cannot be merged into the weights; use unload or "
                          "delete_adapter")
    mods = prompt_modules(model)
    if name in mods:
        del mods[name]
    if not len(mods):
        del model.prompt_encoder


def shapes(model: nn.Module, cfg: PromptTuningConfig) -> dict[str, tuple[int, ...]]:
    return {"prompt_embeddings": (cfg.num_virtual_tokens, cfg.token_dim or word_embeddings(model).embedding_dim)}


SPEC = register(MethodSpec("prompt", PromptTuningConfig, apply, state_dict, load_state_dict, shapes, parameters,
                           remove))
