"""BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models"): only the bias terms train, every weight stays frozen.

Llama-family models have no biases at all; there `add_bias=True` gives the target linear layers zero biases first, so
the adapted model starts equal to the base. PEFT has no such method: files carry peft_type "BITFIT" and the bias
tensors under their module paths ('base_model.model.<path>.bias').
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimtune.errors import ConfigError
from slimtune.peft.base import MethodConfig, MethodSpec, file_key, option, register
from slimtune.peft.layer import AdapterLayer
from slimtune.peft.targets import find_targets

_ADDED = "slimtune_bitfit_added"  # model.__dict__[_ADDED][adapter] = paths of the linears add_bias gave a bias


@dataclass
class BitFitConfig(MethodConfig):
    """add_bias: give the target linear layers that have no bias a zero one (needed for Llama, Mistral, Qwen3);
    target_modules / layers_to_transform: which linear layers get one (default every linear but the output head).
    Biases already in the model always train."""

    method = "bitfit"
    peft_type = "BITFIT"
    add_bias: bool = option(False, cli="add-bias", help="BitFit: add zero biases where none exist")
    target_modules: list[str] | str = option("all-linear", flat="targets")
    layers_to_transform: list[int] | int | None = option(None, cli="layers")


def _unwrap(m: nn.Module) -> nn.Module:
    while isinstance(m, AdapterLayer):
        m = m.base_layer
    return m


def _bias_paths(model: nn.Module) -> list[str]:
    """Module paths (adapter wrappers skipped) of every module that holds a `bias` parameter, in model order."""
    out, inside = [], _adapter_paths(model)
    for path, mod in model.named_modules():
        if isinstance(mod, AdapterLayer) or path.startswith("prompt_encoder"):
            continue
        if isinstance(getattr(mod, "bias", None), nn.Parameter) and not any(path.startswith(p + ".") for p in inside):
            out.append(path)
    return out


def _adapter_paths(model: nn.Module) -> list[str]:
    """Paths of the parts adapters add (their own biases are not the base model's): e.g. '...adapter_up'."""
    out = []
    for path, mod in model.named_modules():
        if isinstance(mod, AdapterLayer):
            out += [f"{path}.{a}" for a in mod.adapter_attrs]
    return out


def _public(path: str) -> str:
    """The module path as the unwrapped model names it ('x.q_proj.base_layer' -> 'x.q_proj')."""
    return path.replace(".base_layer", "")


def _missing(model: nn.Module, cfg: BitFitConfig) -> list[str]:
    """Target linear layers without a bias (those add_bias would give one)."""
    paths = find_targets(model, cfg.target_modules, cfg.layers_to_transform)
    return [p for p in paths if getattr(_unwrap(model.get_submodule(p)), "bias", None) is None]


def apply(model: nn.Module, cfg: BitFitConfig, name: str = "default") -> None:
    """Select the model's biases as adapter `name`; with add_bias, first give bias-less target linears zero biases.

    Raises:
        ConfigError: the model has no bias at all and add_bias is False; a target that matches nothing.
    """
    if cfg.add_bias:
        added = model.__dict__.setdefault(_ADDED, {}).setdefault(name, [])
        for p in _missing(model, cfg):
            lin = _unwrap(model.get_submodule(p))
            w = lin.weight
            dt = w.dtype if w.is_floating_point() else torch.float32
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, device=w.device, dtype=dt))
            added.append(p)
    if not _bias_paths(model):
        raise ConfigError(f"bitfit: {type(model).__name__} has no bias terms (Llama-family models have none); "
                          "set add_bias=True (--add-bias) to give its linear layers zero biases and train those")


def remove(model: nn.Module, name: str = "default", merged: bool = False) -> None:
    """Take away the biases `add_bias` gave (`MethodSpec.remove`), unless `merged`: then the trained biases stay.
    Biases the model had train in place, so they keep their trained values either way."""
    for p in model.__dict__.get(_ADDED, {}).pop(name, []):
        if not merged:
            _unwrap(model.get_submodule(p)).bias = None


def state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """{'base_model.model.<module path>.bias': the bias Parameter} for every bias of the model."""
    return {file_key(_public(p), "bias"): model.get_submodule(p).bias.detach() for p in _bias_paths(model)}


def parameters(model: nn.Module, name: str = "default") -> list[nn.Parameter]:
    """The bias parameters (what trains)."""
    return [model.get_submodule(p).bias for p in _bias_paths(model)]


@torch.no_grad()
def load_state_dict(model: nn.Module, sd: dict[str, Tensor], name: str = "default") -> None:
    for p in _bias_paths(model):
        model.get_submodule(p).bias.copy_(sd[file_key(_public(p), "bias")])


def shapes(model: nn.Module, cfg: BitFitConfig) -> dict[str, tuple[int, ...]]:
    out = {file_key(_public(p), "bias"): tuple(model.get_submodule(p).bias.shape) for p in _bias_paths(model)}
    if cfg.add_bias:
        for p in _missing(model, cfg):
            out[file_key(p, "bias")] = (_unwrap(model.get_submodule(p)).out_features,)
    if not out:
        raise ConfigError(f"bitfit: {type(model).__name__} has no bias terms; set add_bias=True (--add-bias)")
    return out


SPEC = register(MethodSpec("bitfit", BitFitConfig, apply, state_dict, load_state_dict, shapes, parameters, remove))
