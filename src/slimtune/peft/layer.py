"""`AdapterLayer`: a layer that wraps `base_layer` and holds named adapters, so that switching, disabling, deleting,
merging and unloading work the same way for every method; and the record of the adapters a model carries."""
from __future__ import annotations

from typing import ClassVar

from torch import nn

from slimtune.errors import ConfigError
from slimtune.peft.base import MethodConfig


BASE = "base_layer."


def _base_names_out(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: the base layer's entries under the layer's own names (`q_proj.weight`, not
    `q_proj.base_layer.weight`), so that the state dict of a model with adapters (what transformers' save_pretrained
    writes) holds the base weights where the plain model has them; the adapters' entries keep their names."""
    inner = prefix + BASE
    for k in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + k[len(inner):]] = state_dict.pop(k)


def _base_names_in(module: nn.Module, state_dict: dict, prefix: str, *_: object) -> None:
    """load_state_dict pre-hook, the inverse: entries under the layer's own names go to `base_layer` (entries already
    named `base_layer.*` load as they are)."""
    own = set(module._modules) | set(module._parameters) | set(module._buffers)
    for k in [k for k in state_dict if k.startswith(prefix)]:
        if k[len(prefix):].split(".", 1)[0] not in own:
            state_dict[prefix + BASE + k[len(prefix):]] = state_dict.pop(k)


class AdapterLayer(nn.Module):
    """A layer that wraps `base_layer` and holds named adapters in the ModuleDicts / ParameterDicts listed in
    `adapter_attrs` (e.g. ('lora_A', 'lora_B')). `active` names the adapters used in forward; `disabled` bypasses
    all of them; `merged` lists adapters folded into the base weight. In `state_dict()` the base layer's entries
    carry the wrapped layer's own names (`_base_names_out`); `load_state_dict` takes either naming."""

    adapter_attrs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.training = base_layer.training  # new layers follow the model's mode (eval stays eval: no dropout)
        self.active: list[str] = []
        self.disabled = False
        self.merged: list[str] = []
        self.register_state_dict_post_hook(_base_names_out)
        self.register_load_state_dict_pre_hook(_base_names_in)

    def adapter_names(self) -> list[str]:
        names: dict[str, None] = {}
        for a in self.adapter_attrs:
            names.update(dict.fromkeys(getattr(self, a).keys()))
        return list(names)

    def set_active(self, names: list[str]) -> None:
        self.active = [n for n in names if n in self.adapter_names()]

    def delete(self, name: str) -> None:
        """Remove adapter `name` (unmerging everything first if it was merged)."""
        if name in self.merged:
            self.unmerge()
        for a in self.adapter_attrs:
            d = getattr(self, a)
            if name in d:
                del d[name]
        self.active = [n for n in self.active if n != name]

    def merge(self, names: list[str] | None = None) -> None:
        raise ConfigError(f"{type(self).__name__} adapters cannot be merged into the base layer; use unload instead")

    def unmerge(self) -> None:
        """Undo `merge` (a no-op where nothing is merged)."""

    def unloaded(self, merge: bool) -> nn.Module:
        """The plain module to put back in this layer's place: the base layer, with the active adapters folded into
        it when `merge`."""
        if merge and self.active and not self.disabled:
            self.merge(self.active)
        else:
            self.unmerge()
        return self.base_layer


def layer_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Every parameter that an AdapterLayer holds under adapter `name` (the default `MethodSpec.parameters`)."""
    out: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, AdapterLayer):
            for a in m.adapter_attrs:
                d = getattr(m, a)
                if name in d:
                    v = d[name]
                    out += [v] if isinstance(v, nn.Parameter) else list(v.parameters())
    return out


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """(path, layer) for every AdapterLayer in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def model_adapters(model: nn.Module) -> dict[str, MethodConfig]:
    """name -> config of every adapter applied to `model` (kept as a plain attribute, `slimtune_adapters`)."""
    d = model.__dict__.get("slimtune_adapters")
    if d is None:
        d = {}
        model.__dict__["slimtune_adapters"] = d
    return d


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the adapters in use (what forward applies and `freeze_base` leaves trainable)."""
    return list(model.__dict__.get("slimtune_active", []))


def set_active_adapters(model: nn.Module, names: list[str]) -> None:
    """Record the active adapters and tell every AdapterLayer (a layer without one of them uses none)."""
    model.__dict__["slimtune_active"] = list(names)
    for _, layer in adapter_layers(model):
        layer.set_active(list(names))
