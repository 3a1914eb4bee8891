"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual tokens produced by a prompt encoder, an MLP or a
bidirectional LSTM followed by an MLP, from n trainable input embeddings; prepended to the input like prompt tuning.

After training only the produced embeddings matter: `fold` replaces the encoder by them, and the file holds them as
PEFT's `prompt_embeddings` (n, d), which loads as plain virtual tokens (PEFT does the same in inference mode).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimtune.errors import ConfigError
from slimtune.peft.base import MethodConfig, MethodSpec, check_rank, option, register
from slimtune.peft.prompt import (PromptEmbedding, fill_dims, get_encoder, parameters, prompt_modules, remove,
                                  word_embeddings)

ENCODERS = ("MLP", "LSTM")


@dataclass
class PTuningConfig(MethodConfig):
    """PEFT's PromptEncoderConfig fields: num_virtual_tokens n, encoder_reparameterization_type MLP or LSTM,
    encoder_hidden_size (default: the model width), encoder_num_layers (LSTM layers), encoder_dropout."""

    method = "ptuning"
    peft_type = "P_TUNING"
    num_virtual_tokens: int = option(20, flat="num_virtual_tokens", cli="virtual-tokens",
                                     help="number of virtual tokens")
    encoder_reparameterization_type: str = option("MLP", cli="encoder", help="ptuning: MLP or LSTM")
    encoder_hidden_size: int | None = option(None, cli="encoder-hidden", help="prompt encoder width")
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int = 1
    task_type: str = "CAUSAL_LM"

    def __post_init__(self) -> None:
        self.encoder_reparameterization_type = str(self.encoder_reparameterization_type).upper()  # PEFT's spelling

    def validate(self) -> None:
        check_rank(self.num_virtual_tokens, "num_virtual_tokens")
        if str(self.encoder_reparameterization_type).upper() not in ENCODERS:
            raise ConfigError(f"encoder_reparameterization_type {self.encoder_reparameterization_type!r} is unknown; "
                              f"choose MLP or LSTM")
        if self.encoder_hidden_size is not None:
            check_rank(self.encoder_hidden_size, "encoder_hidden_size")
        check_rank(self.encoder_num_layers, "encoder_num_layers")


class PromptEncoder(nn.Module):
    """embedding (n, d) -> MLP: Linear(d, h), ReLU, Linear(h, h), ReLU, Linear(h, d); or LSTM: a bidirectional LSTM
    of width h, then Linear(2h, 2h), ReLU, Linear(2h, d). Output: the n virtual tokens (n, d)."""

    def __init__(self, n: int, d: int, h: int, kind: str, lstm_layers: int, dropout: float,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.embedding = nn.Embedding(n, d, device=device)
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(d, h, num_layers=lstm_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True, device=device)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, device=device), nn.ReLU(),
                                          nn.Linear(2 * h, d, device=device))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h, device=device), nn.ReLU(), nn.Linear(h, h, device=device),
                                          nn.ReLU(), nn.Linear(h, d, device=device))

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.num_embeddings

    def embeds(self) -> Tensor:
        x = self.embedding.weight  # (n, d)
        if self.kind == "LSTM":
            x = self.lstm_head(x[None])[0][0]  # (n, 2h): one sequence of n virtual tokens
        return self.mlp_head(x)  # (n, d)


# ---- method protocol ------------------------------------------------------------------------------------------------
def apply(model: nn.Module, cfg: PTuningConfig, name: str = "default") -> None:
    """Add a prompt encoder as `model.prompt_encoder[name]` (trainable: its embedding and heads).

    Raises:
        ConfigError: a bad option; a model without token embedding.
    """
    cfg.validate()
    fill_dims(model, cfg)
    d = cfg.token_dim
    h = cfg.encoder_hidden_size or d
    dev = word_embeddings(model).weight.device
    enc = PromptEncoder(cfg.num_virtual_tokens, d, h, str(cfg.encoder_reparameterization_type).upper(),
                        cfg.encoder_num_layers, cfg.encoder_dropout, device=dev)
    prompt_modules(model)[name] = enc


@torch.no_grad()
def fold(model: nn.Module, name: str = "default") -> None:
    """Replace encoder `name` by the virtual tokens it produces now (a PromptEmbedding); a no-op once folded."""
    enc = get_encoder(model, name)
    if isinstance(enc, PromptEmbedding):
        return
    was = enc.training
    enc.eval()  # no dropout in the produced tokens
    out = enc.embeds().float()
    enc.train(was)
    plain = PromptEmbedding(*out.shape, device=out.device)
    plain.prompt_embeddings.copy_(out)
    prompt_modules(model)[name] = plain


def state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """{'prompt_embeddings': (n, d)}: the produced tokens (a detached copy while the encoder is not folded)."""
    enc = get_encoder(model, name)
    if isinstance(enc, PromptEmbedding):
        return {"prompt_embeddings": enc.prompt_embeddings.detach()}
    with torch.no_grad():
        was = enc.training
        enc.eval()
        out = enc.embeds().float()
        enc.train(was)
    return {"prompt_embeddings": out}


@torch.no_grad()
def load_state_dict(model: nn.Module, sd: dict[str, Tensor], name: str = "default") -> None:
    """Load produced tokens: the encoder `name` becomes plain virtual tokens holding them."""
    t = sd["prompt_embeddings"]
    plain = PromptEmbedding(*t.shape, device=word_embeddings(model).weight.device)
    plain.prompt_embeddings.copy_(t)
    prompt_modules(model)[name] = plain


def shapes(model: nn.Module, cfg: PTuningConfig) -> dict[str, tuple[int, ...]]:
    return {"prompt_embeddings": (cfg.num_virtual_tokens, cfg.token_dim or word_embeddings(model).embedding_dim)}


SPEC = register(MethodSpec("ptuning", PTuningConfig, apply, state_dict, load_state_dict, shapes, parameters,
                           remove))
