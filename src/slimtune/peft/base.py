"""The protocol every fine-tuning method follows: a small typed config, `apply`, and a state dict in PEFT key naming.

A method module builds one `MethodSpec` and calls `register(spec)` at import; `METHOD_MODULES` lists the modules
imported by `load_methods()`. Layers that hold named adapters subclass `AdapterLayer` (wrap `base_layer`), so that
switching, disabling, deleting, merging and unloading work the same way for every method.
"""
from __future__ import annotations

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
    """

    name: str
    config_cls: type[MethodConfig]
    apply: Callable[[nn.Module, Any, str], None]
    state_dict: Callable[[nn.Module, str], dict[str, Tensor]]
    load_state_dict: Callable[[nn.Module, dict[str, Tensor], str], None]
    shapes: Callable[[nn.Module, Any], dict[str, tuple[int, ...]]] | None = None


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
        raise NotImplementedError(f"{type(self).__name__} cannot merge into its base layer")

    def unmerge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot unmerge")


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
