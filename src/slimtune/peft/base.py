"""The protocol every fine-tuning method follows: a small typed config, `apply`, and a state dict in PEFT key naming.

A method module builds one `MethodSpec` and calls `register(spec)` at import; `METHOD_MODULES` lists the modules
imported by `load_methods()`. Layers that hold named adapters subclass `AdapterLayer` (wrap `base_layer`), so that
switching, disabling, deleting, merging and unloading work the same way for every method.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from slimtune.errors import ConfigError

# Modules that define methods; each calls `register(...)` at import. Add a new method by adding its module here.
METHOD_MODULES: list[str] = [
    "slimtune.peft.lora",
    "slimtune.peft.ia3",
    "slimtune.peft.bitfit",
    "slimtune.peft.houlsby",
    "slimtune.peft.prompt",
    "slimtune.peft.prefix",
    "slimtune.peft.ptuning",
    "slimtune.peft.partial",
    "slimtune.peft.qat",
]

FILE_PREFIX = "base_model.model."  # PEFT's prefix of a module path inside adapter_model.safetensors


@dataclass
class MethodConfig:
    """Base of every method's config: flat typed fields; `method` (slimtune's name) and `peft_type` (PEFT's, or None
    where PEFT has no such method) are class constants."""

    method: ClassVar[str] = ""
    peft_type: ClassVar[str | None] = None

    def validate(self) -> None:
        """Raise ConfigError (one line) on an out-of-range value; subclasses extend it."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
        """Strict construction from user input (YAML, CLI): unknown keys raise ConfigError listing the known ones."""
        d = {k: v for k, v in d.items() if k not in ("method", "peft_type")}
        unknown = [k for k in d if k not in cls.field_names()]
        if unknown:
            raise ConfigError(f"unknown {cls.method} option {unknown[0]!r}; known options: "
                              f"{', '.join(cls.field_names())}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def to_peft_json(self) -> dict[str, Any]:
        """The adapter_config.json fields of this method (PEFT names and meanings), `peft_type` included."""
        d = dataclasses.asdict(self)
        d["peft_type"] = self.peft_type
        return d

    @classmethod
    def from_peft_json(cls, d: dict[str, Any]) -> "MethodConfig":
        """From an adapter_config.json: fields this config knows are read, PEFT's bookkeeping fields are ignored."""
        known = set(cls.field_names())
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.validate()
        return cfg


@dataclass
class MethodSpec:
    """What the registry knows about one method.

    apply(model, cfg, name): insert adapter `name` (the model is modified in place; nothing is frozen).
    state_dict(model, name): that adapter's tensors, keyed as in PEFT's adapter_model.safetensors.
    load_state_dict(model, sd, name): copy such tensors into an applied adapter (shapes already validated).
    shapes(model, cfg): the file keys and shapes `apply` would create, computed without touching the model; used to
        validate a file before anything is modified (and to count parameters).
    parameters(model, name): the trainable parameters of adapter `name` (what `freeze_base` leaves trainable);
        default: every parameter held under `name` by an AdapterLayer.

    A `state_dict` that returns the live tensors (`p.detach()`, sharing storage) may leave `load_state_dict` as None:
    loading then copies each file tensor into them.
    """

    name: str
    config_cls: type[MethodConfig]
    apply: Callable[[nn.Module, Any, str], None]
    state_dict: Callable[[nn.Module, str], dict[str, Tensor]]
    load_state_dict: Callable[[nn.Module, dict[str, Tensor], str], None] | None = None
    shapes: Callable[[nn.Module, Any], dict[str, tuple[int, ...]]] | None = None
    parameters: Callable[[nn.Module, str], list[nn.Parameter]] | None = None


METHODS: dict[str, MethodSpec] = {}
_loaded = False


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (called by each method module at import)."""
    METHODS[spec.name] = spec
    return spec


def load_methods() -> dict[str, MethodSpec]:
    """Import every module of METHOD_MODULES once (one not written yet is skipped) and return the registry."""
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in METHOD_MODULES:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name != mod:  # a missing dependency inside an existing module is a real error
                    raise
    return METHODS


def get_method(name: str) -> MethodSpec:
    """The registered method `name` ('lora', 'dora', 'ia3', ...).

    Raises:
        ConfigError: unknown name, listing the known ones.
    """
    methods = load_methods()
    key = str(name).lower()
    if key not in methods:
        raise ConfigError(f"unknown fine-tuning method {name!r}; known methods: {', '.join(sorted(methods))}")
    return methods[key]


def method_for_peft_type(peft_type: str, d: dict[str, Any] | None = None) -> MethodSpec:
    """The method that reads an adapter_config.json of this `peft_type` (e.g. 'LORA' -> lora).

    Raises:
        ConfigError: no registered method has this peft_type.
    """
    methods = load_methods()
    d = d or {}
    if d.get("slimtune_method") in methods:
        return methods[d["slimtune_method"]]
    for spec in methods.values():
        if spec.config_cls.peft_type == peft_type:
            return spec
    known = sorted({s.config_cls.peft_type for s in methods.values() if s.config_cls.peft_type})
    raise ConfigError(f"adapter peft_type {peft_type!r} is not supported; supported: {', '.join(known)}")


def check_rank(r: int, what: str = "r") -> None:
    """Raise ConfigError unless r is a positive integer."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {r!r}")


# ---- adapter layers -------------------------------------------------------------------------------------------------
class AdapterLayer(nn.Module):
    """A layer that wraps `base_layer` and holds named adapters in the ModuleDicts / ParameterDicts listed in
    `adapter_attrs` (e.g. ('lora_A', 'lora_B')). `active` names the adapters used in forward; `disabled` bypasses
    all of them; `merged` lists adapters folded into the base weight."""

    adapter_attrs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.training = base_layer.training  # new layers follow the model's mode (eval stays eval: no dropout)
        self.active: list[str] = []
        self.disabled = False
        self.merged: list[str] = []

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


class ModulesToSave(AdapterLayer):
    """PEFT's `modules_to_save`: a full trainable copy of a module per adapter (e.g. a classification head); the
    active adapter's copy replaces the original in forward. Saved as `base_model.model.<path>.<param>`."""

    adapter_attrs = ("modules_to_save",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.base_layer).train(self.training)

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
    from slimtune.peft.targets import find_targets

    paths: list[str] = []
    for n in [names] if isinstance(names, str) else names:
        paths += [p for p in find_targets(model, [n], linear_only=False) if p not in paths]
    # keep the outermost match only (a suffix can match a module and its children's names never end alike anyway)
    return paths


def add_modules_to_save(model: nn.Module, names: list[str] | str | None, adapter: str) -> None:
    """Wrap each module of `modules_to_save` (once) and give it a trainable copy for `adapter`."""
    from slimtune.peft.targets import replace_module

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


def file_key(path: str, suffix: str) -> str:
    """PEFT's file key of a tensor: 'base_model.model.' + module path + '.' + suffix."""
    return f"{FILE_PREFIX}{path}.{suffix}" if path else f"{FILE_PREFIX}{suffix}"


# ---- the adapters a model carries -----------------------------------------------------------------------------------
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
