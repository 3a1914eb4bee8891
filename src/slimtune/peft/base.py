"""The protocol every fine-tuning method follows: a small typed config whose fields carry their user-facing facts
(`option`), `apply`, and a state dict in PEFT key naming.

A method module builds one `MethodSpec` and calls `register(spec)` at import; `METHOD_MODULES` lists the modules
imported by `load_methods()`. A config field declared with `option(..., flat="rank", cli="rank", resume=True,
help=...)` becomes, with no other edit, the run key `rank=...` of `slimtune finetune`, the flag `--rank` of
`slimtune params`, and a value a resumed run must keep (`declared_options()` is the table all of them read).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
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
    "slimtune.peft.longlora",
    "slimtune.peft.relora",
]

FILE_PREFIX = "base_model.model."  # PEFT's prefix of a module path inside adapter_model.safetensors


def option(default: Any = MISSING, *, default_factory: Any = MISSING, flat: str | None = None,
           cli: str | None = None, resume: bool = True, help: str = "", aliases: tuple[str, ...] = ()) -> Any:
    """A method config field with its user-facing facts (dataclasses.field metadata).

    Args:
        flat: the key of a run's flat config (`slimtune finetune ... rank=8`) that sets this field; None: only
            through `method_args`. Several methods may share a flat key (each sets its own field).
        cli: the `slimtune params` flag (`--cli`); default: the flat key; None with no flat key: no flag.
        resume: a run resumed from a checkpoint must keep this value (it changes the numerics).
        help: one line for --help.
        aliases: other names of the flat key that a run accepts (PEFT's, torchtune's, axolotl's: `lora_r`,
            `lora_rank` for `rank`); they are read as the flat key and never written back.
    """
    md = {"flat": flat, "cli": cli or (flat.replace("_", "-") if flat else None), "resume": resume, "help": help,
          "aliases": tuple(aliases)}
    return field(default=default, default_factory=default_factory, metadata={"slimtune": md})


@dataclass(frozen=True)
class DeclaredOption:
    """One user-facing name of method fields (a flat run key, or a `slimtune params` flag): the fields' type (made
    optional), help, whether resume must keep it, {method: field name} of the methods it sets, and the other names
    (aliases) a run accepts for it."""

    name: str
    type: Any
    help: str
    resume: bool
    fields: dict[str, str]
    aliases: tuple[str, ...] = ()


def _optional(tp: Any) -> Any:
    """`tp | None` (unchanged when it already admits None)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
        return tp
    return tp | None


def declared_options(kind: str = "flat") -> dict[str, DeclaredOption]:
    """name -> DeclaredOption for every `option(..., flat=...)` (kind 'flat') or `option(..., cli=...)` (kind 'cli')
    of every registered method, in registration and field order. The first method declaring a name gives its type
    and help; the aliases of every method declaring it are joined.

    Raises:
        ConfigError: one alias declared for two different names (a declaration bug).
    """
    out: dict[str, DeclaredOption] = {}
    for spec in load_methods().values():
        hints = typing.get_type_hints(spec.config_cls)
        for f in dataclasses.fields(spec.config_cls):
            key = (f.metadata.get("slimtune") or {}).get(kind)
            if not key:
                continue
            md, have = f.metadata["slimtune"], out.get(key)
            fields = {**(have.fields if have else {}), spec.name: f.name}
            mine = md.get("aliases", ()) if kind == "flat" else ()  # aliases name run keys, not params flags
            aliases = tuple(dict.fromkeys((*(have.aliases if have else ()), *mine)))
            out[key] = DeclaredOption(key, have.type if have else _optional(hints[f.name]),
                                      have.help if have else md["help"], md["resume"], fields, aliases)
    owner: dict[str, str] = {}
    for key, o in out.items():
        for a in o.aliases:
            other = a if a in out else owner.setdefault(a, key)
            if other != key:
                raise ConfigError(f"option alias {a!r} of {key!r} is already the name of {other!r}")
    return out


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
        check_field_types(cls, d)
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
        d = {k: v for k, v in d.items() if k in known}
        check_field_types(cls, d)
        cfg = cls(**d)
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
    remove(model, name, merged): undo what `apply` added outside AdapterLayers (prompt encoders, attention hooks,
        added biases, config changes), for `delete_adapter` and `unload`; `merged`: the adapter is being folded into
        the weights (`merge_and_unload`), so what it changed in the model stays (raise ConfigError if it cannot merge).

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
    remove: Callable[[nn.Module, str, bool], None] | None = None


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


def _conforms(v: Any, tp: Any) -> bool:
    """Whether JSON / YAML value v has annotated type tp (floats finite; lists may come as tuples)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(v, a) for a in args)
    if tp is type(None):
        return v is None
    if tp in (bool, str):
        return isinstance(v, tp)
    if tp in (int, float):
        ok = isinstance(v, (int, float) if tp is float else int) and not isinstance(v, bool)
        return ok and math.isfinite(v)
    if origin is list:
        return isinstance(v, (list, tuple)) and all(_conforms(x, args[0]) for x in v)
    if origin is dict:
        return isinstance(v, dict) and all(_conforms(k, args[0]) and _conforms(x, args[1]) for k, x in v.items())
    return True  # a type this check does not know: the config's own validate() decides


def check_field_types(cls: type, d: dict[str, Any]) -> None:
    """Every value in `d` given for a field of config class `cls` must have the field's annotated type.

    Raises:
        ConfigError: naming the field, the value and the type it needs (a NaN or inf float included).
    """
    hints = typing.get_type_hints(cls)
    for k, v in d.items():
        if k in hints and not _conforms(v, hints[k]):
            want = str(hints[k]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise ConfigError(f"{k} = {v!r} does not have type {want}{' (finite)' if 'float' in want else ''}")


def check_rank(r: int, what: str = "r") -> None:
    """Raise ConfigError unless r is a positive integer."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {r!r}")


def file_key(path: str, suffix: str) -> str:
    """PEFT's file key of a tensor: 'base_model.model.' + module path + '.' + suffix."""
    return f"{FILE_PREFIX}{path}.{suffix}" if path else f"{FILE_PREFIX}{suffix}"
