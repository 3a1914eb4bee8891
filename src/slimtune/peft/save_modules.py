"""PEFT's `modules_to_save`: a full trainable copy of a module per adapter (e.g. an lm_head or a classifier), swapped
in when the adapter is active; saved as `base_model.model.<path>.<param>`."""
from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from slimtune.peft.base import file_key
from slimtune.peft.layer import AdapterLayer
from slimtune.peft.targets import find_targets, replace_module

# the layer norms of a Llama-family decoder (slimtune's and transformers' names): before attention, before the MLP,
# and the final one. As `modules_to_save` names, which PEFT matches as suffixes of module paths.
NORMS = ("input_layernorm", "post_attention_layernorm", "model.norm")


def present_modules(model: nn.Module, names: tuple[str, ...] | list[str]) -> list[str]:
    """Those of `names` that name a module of `model` (the whole path, or its end after a dot)."""
    paths = [n for n, _ in model.named_modules()]
    return [k for k in names if any(p == k or p.endswith("." + k) for p in paths)]


class ModulesToSave(AdapterLayer):
    """PEFT's `modules_to_save`: a full trainable copy of a module per adapter (e.g. a classification head); the
    active adapter's copy replaces the original in forward. Saved as `base_model.model.<path>.<param>`."""

    adapter_attrs = ("modules_to_save",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.base_layer).train(self.training)

    @property
    def weight(self) -> Tensor:
        """The weight forward uses (the active copy's, else the base's): code reading `embed_tokens.weight` works."""
        return self._current().weight

    def _current(self) -> nn.Module:
        return self.base_layer if self.disabled or not self.active else self.modules_to_save[self.active[0]]

    def forward(self, *args: Any, **kw: Any) -> Any:
        if self.disabled or not self.active:
            return self.base_layer(*args, **kw)
        return self.modules_to_save[self.active[0]](*args, **kw)

    def unloaded(self, merge: bool) -> nn.Module:
        if merge and self.active and not self.disabled:
            return self.modules_to_save[self.active[0]]
        return self.base_layer


def modules_to_save_paths(model: nn.Module, names: list[str] | str | None) -> list[str]:
    """Paths of the modules named (exact or suffix) in `modules_to_save`.

    Raises:
        ConfigError: a name that matches no module.
    """
    if not names:
        return []
    paths: list[str] = []
    for n in [names] if isinstance(names, str) else names:
        paths += [p for p in find_targets(model, [n], linear_only=False) if p not in paths]
    # keep the outermost match only (a suffix can match a module and its children's names never end alike anyway)
    return paths


def add_modules_to_save(model: nn.Module, names: list[str] | str | None, adapter: str) -> None:
    """Wrap each module of `modules_to_save` (once) and give it a trainable copy for `adapter`."""
    for p in modules_to_save_paths(model, names):
        m = model.get_submodule(p)
        if not isinstance(m, ModulesToSave):
            m = ModulesToSave(m)
            replace_module(model, p, m)
        m.add(adapter)
        m.set_active([adapter])


def modules_to_save_state_dict(model: nn.Module, adapter: str) -> dict[str, Tensor]:
    """File key -> live tensor of every `modules_to_save` copy of `adapter`."""
    out: dict[str, Tensor] = {}
    for path, m in model.named_modules():
        if isinstance(m, ModulesToSave) and adapter in m.modules_to_save:
            out.update({file_key(path, k): t.detach() for k, t in m.modules_to_save[adapter].state_dict().items()})
    return out


def modules_to_save_shapes(model: nn.Module, names: list[str] | str | None) -> dict[str, tuple[int, ...]]:
    """File key -> shape of what `add_modules_to_save` would save, without touching the model."""
    out: dict[str, tuple[int, ...]] = {}
    for p in modules_to_save_paths(model, names):
        m = model.get_submodule(p)
        m = m.base_layer if isinstance(m, ModulesToSave) else m
        out.update({file_key(p, k): tuple(t.shape) for k, t in m.state_dict().items()})
    return out
