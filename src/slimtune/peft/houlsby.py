"""Houlsby bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"): after the
attention output projection and after the MLP of every block, y + up(act(down(y))) with a residual.

The up-projection starts at zero, so the adapted model starts equal to the base. Both projections carry biases, which
is how the LoRA paper counts adapters (Hu et al. 2021, Table 4: GPT-3 r = 1 -> 7.1M, r = 64 -> 304.4M, i.e.
2 x 96 x (2 d r + r + d)). As the paper (section 2.1: "we also train the layer normalization parameters per task"),
the layer norms train too (`train_norms`): a trainable copy of each per adapter, as PEFT's modules_to_save. PEFT has
no such method: files carry peft_type "HOULSBY" and load in slimtune only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.errors import ConfigError
from slimtune.peft.base import MethodConfig, MethodSpec, check_rank, file_key, option, register
from slimtune.peft.layer import AdapterLayer
from slimtune.peft.save_modules import (NORMS, add_modules_to_save, modules_to_save_shapes, modules_to_save_state_dict,
                                        present_modules)
from slimtune.peft.targets import find_targets, replace_module

ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


@dataclass
class HoulsbyConfig(MethodConfig):
    """r: bottleneck width; target_modules: the layers whose output gets an adapter (the attention output and the
    MLP output projections); non_linearity: relu, gelu, silu or tanh."""

    method = "houlsby"
    peft_type = "HOULSBY"
    r: int = option(8, flat="rank", help="Houlsby bottleneck width")
    target_modules: list[str] | str = option(default_factory=lambda: ["o_proj", "down_proj"], flat="targets")
    layers_to_transform: list[int] | int | None = option(None, cli="layers")
    non_linearity: str = "relu"
    train_norms: bool = option(True, cli="train-norms", help="houlsby: train the layer norms too (as the paper)")

    def validate(self) -> None:
        check_rank(self.r, "houlsby r")
        if self.non_linearity not in ACTS:
            raise ConfigError(f"houlsby non_linearity {self.non_linearity!r} is unknown; choose one of "
                              f"{', '.join(ACTS)}")

    @classmethod
    def from_peft_json(cls, d: dict) -> "HoulsbyConfig":
        """A file written before the layer norms trained has no train_norms and no norm tensors: read it so."""
        return super().from_peft_json({"train_norms": False, **d})

    def norms(self, model: nn.Module) -> list[str]:
        """The norm modules this adapter trains copies of."""
        return present_modules(model, NORMS) if self.train_norms else []


def _out_features(layer: nn.Module) -> int:
    while isinstance(layer, AdapterLayer) and not hasattr(layer, "out_features"):
        layer = layer.base_layer
    if hasattr(layer, "out_features"):
        return layer.out_features
    raise ConfigError(f"houlsby adapters wrap linear layers, not {type(layer).__name__}")


class HoulsbyLayer(AdapterLayer):
    """y = base(x); y + up(act(down(y))) for each active adapter, in order.

    down: Linear(d, r) (PyTorch's default Kaiming-uniform init), up: Linear(r, d) zero-initialised.
    """

    adapter_attrs = ("adapter_down", "adapter_up")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.out_features = _out_features(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.acts: dict[str, str] = {}

    def add(self, name: str, r: int, act: str) -> None:
        w = next(iter(self.base_layer.parameters()), None)
        dev = w.device if w is not None else None
        dt = w.dtype if w is not None and w.is_floating_point() else torch.float32
        d = self.out_features
        self.adapter_down[name] = nn.Linear(d, r, bias=True, device=dev, dtype=dt)
        self.adapter_up[name] = nn.Linear(r, d, bias=True, device=dev, dtype=dt)
        if not self.adapter_up[name].weight.is_meta:
            nn.init.zeros_(self.adapter_up[name].weight)
            nn.init.zeros_(self.adapter_up[name].bias)
        self.acts[name] = act
        if name not in self.active:
            self.active = [*self.active, name]

    def delete(self, name: str) -> None:
        super().delete(name)
        self.acts.pop(name, None)

    def forward(self, x: Tensor, *args, **kw) -> Tensor:
        y = self.base_layer(x, *args, **kw)
        if self.disabled:
            return y
        for n in self.active:
            down, up = self.adapter_down[n], self.adapter_up[n]
            h = ACTS[self.acts[n]](down(y.to(down.weight.dtype)))  # (..., r)
            y = y + up(h).to(y.dtype)  # residual around the bottleneck
        return y


# ---- method protocol ------------------------------------------------------------------------------------------------
_PARTS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")


def _layers(model: nn.Module, name: str) -> list[tuple[str, HoulsbyLayer]]:
    return [(p.replace(".base_layer", ""), m) for p, m in model.named_modules()
            if isinstance(m, HoulsbyLayer) and name in m.adapter_down]


def apply(model: nn.Module, cfg: HoulsbyConfig, name: str = "default") -> None:
    """Wrap every target layer in a HoulsbyLayer with bottleneck adapter `name` (identity at the start).

    Raises:
        ConfigError: r <= 0, an unknown nonlinearity, no target matches, a non-linear target.
    """
    cfg.validate()
    for path in find_targets(model, cfg.target_modules, cfg.layers_to_transform):
        layer = model.get_submodule(path)
        if not isinstance(layer, HoulsbyLayer):
            layer = HoulsbyLayer(layer)
            replace_module(model, path, layer)
        layer.add(name, cfg.r, cfg.non_linearity)
    add_modules_to_save(model, cfg.norms(model), name)


def state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """Keys 'base_model.model.<path>.adapter_down.weight' (r, d), '.bias' (r,), 'adapter_up.weight' (d, r), '.bias';
    and the norms' copies '<norm path>.weight' (d,); live tensors (loading copies into them)."""
    out = {}
    for p, m in _layers(model, name):
        for part in _PARTS:
            mod, t = part.split(".")
            out[file_key(p, part)] = getattr(getattr(m, mod)[name], t).detach()
    out.update(modules_to_save_state_dict(model, name))
    return out


def shapes(model: nn.Module, cfg: HoulsbyConfig) -> dict[str, tuple[int, ...]]:
    out = {}
    for path in find_targets(model, cfg.target_modules, cfg.layers_to_transform):
        layer = model.get_submodule(path)
        d = _out_features(layer.base_layer if isinstance(layer, HoulsbyLayer) else layer)
        r = cfg.r
        out.update({file_key(path, "adapter_down.weight"): (r, d), file_key(path, "adapter_down.bias"): (r,),
                    file_key(path, "adapter_up.weight"): (d, r), file_key(path, "adapter_up.bias"): (d,)})
    out.update(modules_to_save_shapes(model, cfg.norms(model)))
    return out


SPEC = register(MethodSpec("houlsby", HoulsbyConfig, apply, state_dict, shapes=shapes))
