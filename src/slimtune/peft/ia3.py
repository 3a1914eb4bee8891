"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): learned vectors that rescale the keys, the values and the FFN intermediate activation, initialised to ones.

Each target linear is wrapped; attention targets scale the layer's output, feedforward targets (down_proj) its input.
File keys and shapes follow PEFT: `<path>.ia3_l` of shape (out, 1), or (1, in) for a feedforward module.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimtune.errors import ConfigError
from slimtune.peft.base import MethodConfig, MethodSpec, file_key, option, register
from slimtune.peft.layer import AdapterLayer
from slimtune.peft.targets import find_targets, matches, replace_module


@dataclass
class IA3Config(MethodConfig):
    """PEFT's IA3Config fields. target_modules / feedforward_modules: names, suffixes, a regex or 'all-linear';
    feedforward_modules must be among the targets (their input is scaled instead of their output)."""

    method = "ia3"
    peft_type = "IA3"
    target_modules: list[str] | str = option(default_factory=lambda: ["k_proj", "v_proj", "down_proj"], flat="targets")
    feedforward_modules: list[str] | str = option(default_factory=lambda: ["down_proj"], cli="feedforward",
                                                  help="IA3: the targets whose input is scaled")
    layers_to_transform: list[int] | int | None = option(None, cli="layers")
    init_ia3_weights: bool = True

    def to_peft_json(self) -> dict:
        d = super().to_peft_json()
        if d.get("layers_to_transform") is None:  # PEFT's IA3Config has no such field: write it only when used
            d.pop("layers_to_transform", None)
        return d

    def validate(self) -> None:
        if not self.target_modules:
            raise ConfigError("ia3: target_modules is empty; name the layers to scale, e.g. k_proj,v_proj,down_proj")


def _features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear-like layer (nn.Linear or anything with in_features / out_features), through wrappers."""
    while isinstance(layer, AdapterLayer) and not hasattr(layer, "in_features"):
        layer = layer.base_layer
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return layer.in_features, layer.out_features
    raise ConfigError(f"ia3 can only wrap linear layers, not {type(layer).__name__}")


def _param_like(layer: nn.Module, shape: tuple[int, ...]) -> nn.Parameter:
    """A parameter of ones on the layer's device, in its dtype when floating point (else fp32: a quantized base)."""
    w = next(iter(layer.parameters()), None)
    dev = w.device if w is not None else torch.device("cpu")
    dt = w.dtype if w is not None and w.is_floating_point() else torch.float32
    return nn.Parameter(torch.ones(shape, device=dev, dtype=dt))


class IA3Linear(AdapterLayer):
    """y = base(x) * l (attention: l of shape (out, 1) in the file), or y = base(x * l) (feedforward: (1, in)).

    Several named vectors multiply together when several are active. Merging scales the weight rows (output, and the
    bias) or columns (input) by l; unmerging divides them back (exact unless an entry of l is near zero).
    """

    adapter_attrs = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, feedforward: bool) -> None:
        super().__init__(base_layer)
        self.feedforward = feedforward
        self.in_features, self.out_features = _features(base_layer)
        self.ia3_l = nn.ParameterDict()

    def add(self, name: str, init_ones: bool = True) -> None:
        shape = (1, self.in_features) if self.feedforward else (self.out_features, 1)
        p = _param_like(self.base_layer, shape)
        if not init_ones:
            with torch.no_grad():
                p.normal_(1.0, 0.02)
        self.ia3_l[name] = p
        self.active = [*self.active, name] if name not in self.active else self.active

    def _scale(self, names: list[str]) -> Tensor | None:
        """The product of the named vectors, flattened to (in,) or (out,)."""
        s = None
        for n in names:
            if n in self.ia3_l:
                v = self.ia3_l[n].flatten()
                s = v if s is None else s * v
        return s

    def forward(self, x: Tensor, *args, **kw) -> Tensor:
        if self.disabled and self.merged:
            self.unmerge()
        names = [] if self.disabled else [n for n in self.active if n not in self.merged]
        s = self._scale(names)
        if s is None:
            return self.base_layer(x, *args, **kw)
        if self.feedforward:  # scale the intermediate activation, (..., in) * (in,)
            return self.base_layer((x * s).to(x.dtype), *args, **kw)
        y = self.base_layer(x, *args, **kw)
        return (y * s).to(y.dtype)  # (..., out) * (out,)

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Fold the named (default: active) vectors into the base weight: W[o, i] * l[o] or W[o, i] * l[i]."""
        names = [n for n in (names or self.active) if n in self.ia3_l and n not in self.merged]
        s = self._scale(names)
        if s is None:
            return
        self._rescale(s)
        self.merged = [*self.merged, *names]

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide the merged vectors back out of the base weight."""
        s = self._scale(self.merged)
        if s is not None:
            self._rescale(1.0 / s.float())
        self.merged = []

    def _rescale(self, s: Tensor) -> None:
        w, b = getattr(self.base_layer, "weight", None), getattr(self.base_layer, "bias", None)
        if not isinstance(w, Tensor) or not w.is_floating_point():
            raise ConfigError(f"ia3 cannot merge into a {type(self.base_layer).__name__} (a quantized weight); "
                              "keep the adapter unmerged or dequantize the base first")
        if self.feedforward:
            w.copy_((w.float() * s.float()[None, :]).to(w.dtype))
        else:
            w.copy_((w.float() * s.float()[:, None]).to(w.dtype))
            if b is not None:
                b.copy_((b.float() * s.float()).to(b.dtype))


# ---- method protocol ------------------------------------------------------------------------------------------------
def is_feedforward(path: str, feedforward_modules: list[str] | str | None) -> bool:
    """Whether module `path` is among feedforward_modules (names, suffixes, or one regular expression)."""
    ff = [feedforward_modules] if isinstance(feedforward_modules, str) else list(feedforward_modules or [])
    return any(matches(path, t) for t in ff)


def _layers(model: nn.Module, name: str) -> list[tuple[str, IA3Linear]]:
    return [(p.replace(".base_layer", ""), m) for p, m in model.named_modules()
            if isinstance(m, IA3Linear) and name in m.ia3_l]


def apply(model: nn.Module, cfg: IA3Config, name: str = "default") -> None:
    """Wrap every target linear in an IA3Linear holding vector `name` (ones: the model starts unchanged).

    Raises:
        ConfigError: no target matches (listing the linear layers that exist); a non-linear target.
    """
    cfg.validate()
    paths = find_targets(model, cfg.target_modules, cfg.layers_to_transform)
    for path in paths:
        layer = model.get_submodule(path)
        if not isinstance(layer, IA3Linear):
            layer = IA3Linear(layer, feedforward=is_feedforward(path, cfg.feedforward_modules))
            replace_module(model, path, layer)
        layer.add(name, cfg.init_ia3_weights)


def state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """{'base_model.model.<path>.ia3_l': (out, 1) or (1, in)} for adapter `name`."""
    return {file_key(p, "ia3_l"): m.ia3_l[name].detach() for p, m in _layers(model, name)}


@torch.no_grad()
def load_state_dict(model: nn.Module, sd: dict[str, Tensor], name: str = "default") -> None:
    for p, m in _layers(model, name):
        m.ia3_l[name].copy_(sd[file_key(p, "ia3_l")])


def shapes(model: nn.Module, cfg: IA3Config) -> dict[str, tuple[int, ...]]:
    out = {}
    for path in find_targets(model, cfg.target_modules, cfg.layers_to_transform):
        layer = model.get_submodule(path)
        layer = layer.base_layer if isinstance(layer, IA3Linear) else layer
        i, o = _features(layer)
        out[file_key(path, "ia3_l")] = (1, i) if is_feedforward(path, cfg.feedforward_modules) else (o, 1)
    return out


SPEC = register(MethodSpec("ia3", IA3Config, apply, state_dict, load_state_dict, shapes))
