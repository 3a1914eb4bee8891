"""Partial and full fine-tuning: nothing is wrapped or added, these methods only choose which of the model's own
parameters train: named modules, the last k blocks, everything but the first N blocks, or (full) everything.

Files hold the chosen tensors under their module paths ('base_model.model.<path>.weight'); PEFT has no such method
(peft_type "PARTIAL" / "FULL"). Tied parameters (lm_head and the embedding) are listed once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimtune.errors import ConfigError
from slimtune.peft.base import FILE_PREFIX, MethodConfig, MethodSpec, option, register
from slimtune.peft.targets import find_targets, layer_index

_KEY = "slimtune_partial"  # model.__dict__[_KEY][adapter name] = the chosen parameter names


@dataclass
class PartialConfig(MethodConfig):
    """Train the union of: `trainable_modules` (names, suffixes or regular expressions of any modules, e.g.
    'lm_head', 'norm', 'layers.3'), the last `last_k` blocks, and every parameter outside the first `skip_first`
    blocks (the embeddings, later blocks, final norm and head). At least one must be set."""

    method = "partial"
    peft_type = "PARTIAL"
    trainable_modules: list[str] | str | None = option(None, cli="modules", help="modules to train (e.g. lm_head,norm)")
    last_k: int | None = option(None, cli="last-k", help="train the last k blocks")
    skip_first: int | None = option(None, cli="skip-first", help="train everything but the first N blocks")

    def validate(self) -> None:
        if not self.trainable_modules and self.last_k is None and self.skip_first is None:
            raise ConfigError("partial fine-tuning needs trainable_modules, last_k or skip_first (what to train)")
        for k in ("last_k", "skip_first"):
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(f"partial {k} must be an integer >= 0, got {v!r}")


@dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning: every parameter trains."""

    method = "full"
    peft_type = "FULL"


def _public(name: str) -> str:
    return name.replace(".base_layer", "")


def _base_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The model's own named parameters (those of adapters and prompt encoders excluded), tied ones once."""
    from slimtune.peft.layer import adapter_layers

    skip = {id(p) for _, m in adapter_layers(model) for a in m.adapter_attrs for p in getattr(m, a).parameters()}
    enc = getattr(model, "prompt_encoder", None)
    if isinstance(enc, nn.Module):
        skip |= {id(p) for p in enc.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in skip]


def select(model: nn.Module, cfg: PartialConfig | FullConfig) -> list[str]:
    """Names of the parameters the config trains, in model order.

    Raises:
        ConfigError: a module name that matches nothing; last_k / skip_first on a model without numbered blocks or
            beyond its depth.
    """
    params = _base_parameters(model)
    if isinstance(cfg, FullConfig):
        return [n for n, _ in params]
    chosen: set[str] = set()
    if cfg.trainable_modules:
        mods = find_targets(model, cfg.trainable_modules, linear_only=False)
        chosen |= {n for n, _ in params if any(_public(n).startswith(m + ".") for m in mods)}
    if cfg.last_k is not None or cfg.skip_first is not None:
        idx = {n: layer_index(n) for n, _ in params}
        L = max((i for i in idx.values() if i is not None), default=-1) + 1
        if L == 0:
            raise ConfigError(f"{type(model).__name__} has no numbered blocks (model.layers.N); name the modules "
                              "to train with trainable_modules instead")
        for k in ("last_k", "skip_first"):
            v = getattr(cfg, k)
            if v is not None and v > L:
                raise ConfigError(f"partial {k}={v} but the model has only {L} blocks")
        if cfg.last_k is not None:
            chosen |= {n for n, i in idx.items() if i is not None and i >= L - cfg.last_k}
        if cfg.skip_first is not None:
            chosen |= {n for n, i in idx.items() if i is None or i >= cfg.skip_first}
    if not chosen:
        raise ConfigError("partial fine-tuning selects no parameter; check trainable_modules / last_k / skip_first")
    return [n for n, _ in params if n in chosen]


def apply(model: nn.Module, cfg: PartialConfig | FullConfig, name: str = "default") -> None:
    """Record which parameters adapter `name` trains (nothing is wrapped; `freeze_base` sets requires_grad).

    Raises:
        ConfigError: as `select`.
    """
    cfg.validate()
    model.__dict__.setdefault(_KEY, {})[name] = select(model, cfg)


def _chosen(model: nn.Module, name: str) -> list[tuple[str, nn.Parameter]]:
    names = model.__dict__.get(_KEY, {}).get(name)
    if names is None:
        raise ConfigError(f"no partial / full adapter named {name!r} on this model")
    params = dict(model.named_parameters())
    return [(n, params[n]) for n in names]


def parameters(model: nn.Module, name: str = "default") -> list[nn.Parameter]:
    return [p for _, p in _chosen(model, name)]


def state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """{'base_model.model.<parameter name>': live tensor} of the chosen parameters."""
    return {FILE_PREFIX + _public(n): p.detach() for n, p in _chosen(model, name)}


@torch.no_grad()
def load_state_dict(model: nn.Module, sd: dict[str, Tensor], name: str = "default") -> None:
    for n, p in _chosen(model, name):
        p.copy_(sd[FILE_PREFIX + _public(n)])


def remove(model: nn.Module, name: str = "default", merged: bool = False) -> None:
    """Forget adapter `name`'s selection (`MethodSpec.remove`; the parameters trained in place keep their values)."""
    model.__dict__.get(_KEY, {}).pop(name, None)


def shapes(model: nn.Module, cfg: PartialConfig | FullConfig) -> dict[str, tuple[int, ...]]:
    params = dict(_base_parameters(model))
    return {FILE_PREFIX + _public(n): tuple(params[n].shape) for n in select(model, cfg)}


SPEC = register(MethodSpec("partial", PartialConfig, apply, state_dict, load_state_dict, shapes, parameters, remove))
FULL = register(MethodSpec("full", FullConfig, apply, state_dict, load_state_dict, shapes, parameters, remove))
