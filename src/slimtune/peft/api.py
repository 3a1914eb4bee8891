"""The adapter API: apply a method's adapters to any nn.Module, switch, disable, delete, combine, merge and unload
them, freeze the rest explicitly and count what trains. `slimtune.peft` re-exports all of it.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from slimtune.errors import ConfigError
from slimtune.peft.base import METHODS, MethodConfig, get_method
from slimtune.peft.layer import (AdapterLayer, active_adapters, adapter_layers, layer_parameters, model_adapters,
                                 set_active_adapters)
from slimtune.peft.targets import iter_modules, replace_module


def method_config_from_dict(d: dict[str, Any]) -> MethodConfig:
    """A method config from a plain dict (YAML / JSON / CLI): {'method': 'lora', 'r': 8, ...}, or a PEFT config's
    `to_dict()` ({'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'target_modules': {...}, ...}).

    Raises:
        ConfigError: no 'method' or 'peft_type', an unknown method, unknown option, out-of-range value (rank <= 0
            ...), a PEFT option slimtune does not implement, a task_type other than CAUSAL_LM.
    """
    if isinstance(d, dict) and "method" not in d and "peft_type" in d:
        return peft_config(d)
    if not isinstance(d, dict) or "method" not in d:
        raise ConfigError(f"a fine-tuning config needs a 'method' key (or PEFT's 'peft_type'); known methods: "
                          f"{', '.join(sorted(METHODS))}")
    return get_method(d["method"]).config_cls.from_dict(d)


def peft_config(config: Any) -> MethodConfig:
    """The method config of a `peft.PeftConfig` object (LoraConfig, IA3Config, PromptTuningConfig, ...) or of its
    `to_dict()`: enums read as their values, sets as sorted lists, PEFT's bookkeeping fields ignored, as an
    adapter_config.json is read; target_modules=None takes the method's default (LoRA: q_proj, v_proj, PEFT's
    default for Llama, Mistral and Qwen2).

    Raises:
        ConfigError: a task_type other than CAUSAL_LM, an unsupported peft_type or option.
    """
    from enum import Enum

    from slimtune.peft.base import method_for_peft_type

    raw = config.to_dict() if hasattr(config, "to_dict") and not isinstance(config, dict) else dict(config)
    d = {k: v.value if isinstance(v, Enum) else sorted(v) if isinstance(v, (set, frozenset)) else v
         for k, v in raw.items()}
    if d.get("target_modules") is None:
        d.pop("target_modules", None)  # PEFT then takes its per-architecture default; ours is the same (q, v)
    if d.get("task_type") not in (None, "CAUSAL_LM"):
        raise ConfigError(f"task_type={d['task_type']!r}: slimtune's methods adapt causal language models; use "
                          "task_type='CAUSAL_LM' (or leave it out)")
    return method_for_peft_type(str(d.get("peft_type")), d).config_cls.from_peft_json(d)


def apply_method(model: nn.Module, config: MethodConfig | dict[str, Any] | Any, adapter_name: str = "default",
                 freeze: bool = True) -> nn.Module:
    """Insert adapter `adapter_name` of the configured method into `model` (in place) and make it the active one.

    As PEFT's `get_peft_model`, everything but the new adapter is then frozen (`freeze_base`), so that
    `AdamW(model.parameters())` trains the adapter only (frozen parameters get no gradient).
    Args:
        model: any nn.Module (slimtune's Decoder, a transformers model), on any device including meta.
        config: a method config; a dict for `method_config_from_dict`; or a `peft.PeftConfig` (LoraConfig ...).
        adapter_name: the name to store it under ('default' as PEFT).
        freeze: False leaves every requires_grad flag as it was (the new adapter's parameters train).
    Returns:
        the same model.
    Raises:
        ConfigError: bad config, unknown method, targets matching nothing, a name already in use.
    """
    if isinstance(config, dict):
        cfg = method_config_from_dict(config)
    elif not isinstance(config, MethodConfig) and hasattr(config, "peft_type") and hasattr(config, "to_dict"):
        cfg = peft_config(config)
    else:
        cfg = config
    if not isinstance(cfg, MethodConfig):
        raise ConfigError(f"apply_method needs a method config, a dict or a peft config, got {type(config).__name__}")
    cfg.validate()
    adapters = model_adapters(model)
    if adapter_name in adapters:
        raise ConfigError(f"adapter {adapter_name!r} already exists on this model; delete_adapter it or pick "
                          "another adapter_name")
    get_method(cfg.method).apply(model, cfg, adapter_name)
    adapters[adapter_name] = cfg
    set_active_adapters(model, [adapter_name])
    if freeze:
        freeze_base(model, adapter_name)
    return model


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the active adapter(s): forward applies them, `freeze_base` trains them.

    Raises:
        ConfigError: a name the model does not carry.
    """
    names = [names] if isinstance(names, str) else list(names)
    known = model_adapters(model)
    for n in names:
        if n not in known:
            raise ConfigError(f"no adapter named {n!r}; this model has: {', '.join(known) or '(none)'}")
    set_active_adapters(model, names)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block, every adapter layer computes its base layer only (merged adapters are unmerged first)."""
    layers = [m for _, m in adapter_layers(model)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m.disabled = b


def _unwrap_empty(model: nn.Module) -> None:
    for path, m in adapter_layers(model):
        if not m.adapter_names():
            m.unmerge()
            replace_module(model, path, m.base_layer)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` and everything it added: its parts of adapter layers (layers left without adapters become
    their base layer again), and what its method added elsewhere (prompt encoders, hooks: `MethodSpec.remove`).

    Raises:
        ConfigError: no such adapter.
    """
    adapters = model_adapters(model)
    if name not in adapters:
        raise ConfigError(f"no adapter named {name!r}; this model has: {', '.join(adapters) or '(none)'}")
    spec = get_method(adapters[name].method)
    if spec.remove is not None:
        spec.remove(model, name, False)
    for _, m in adapter_layers(model):
        m.delete(name)
    del adapters[name]
    _unwrap_empty(model)
    set_active_adapters(model, [n for n in active_adapters(model) if n != name])


def _unload(model: nn.Module, merge: bool) -> nn.Module:
    active = active_adapters(model)
    for name, cfg in model_adapters(model).items():  # what methods added outside the layers (prompt encoders ...)
        spec = get_method(cfg.method)
        if spec.remove is not None:
            spec.remove(model, name, merge and name in active)
    outer = [(p, m) for p, m in iter_modules(model) if isinstance(m, AdapterLayer)]  # not those inside others
    for path, m in outer:
        replace_module(model, path, m.unloaded(merge))
    model_adapters(model).clear()
    set_active_adapters(model, [])
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights and remove every adapter layer: a plain model again.

    Raises:
        ConfigError: an active method that cannot merge (e.g. prompt tuning).
    """
    return _unload(model, merge=True)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter layer without merging: the original base model."""
    return _unload(model, merge=False)


def combine_adapters(model: nn.Module, names: list[str], weights: list[float], mode: str = "linear",
                     rank: int | None = None, new_name: str = "combined") -> str:
    """Add a LoRA adapter `new_name` combining `names` with `weights` (see `slimtune.peft.lora.combine` for the
    modes linear, cat and svd); it is added, not activated.

    Raises:
        ConfigError: unknown mode or adapter, DoRA or non-LoRA adapters, a name in use, rank <= 0.
    """
    from slimtune.peft.combine import combine

    adapters = model_adapters(model)
    if new_name in adapters:
        raise ConfigError(f"adapter {new_name!r} already exists on this model; pick another new_name")
    for n in names:
        if n not in adapters:
            raise ConfigError(f"no adapter named {n!r}; this model has: {', '.join(adapters) or '(none)'}")
    adapters[new_name] = combine(model, adapters, list(names), list(weights), mode, rank, new_name)
    set_active_adapters(model, active_adapters(model))
    return new_name


# ---- freezing and counting ------------------------------------------------------------------------------------------
def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The trainable parameters of adapter `name` (as its method defines them)."""
    cfg = model_adapters(model).get(name)
    if cfg is None:
        raise ConfigError(f"no adapter named {name!r}; this model has: {', '.join(model_adapters(model)) or '(none)'}")
    spec = get_method(cfg.method)
    return spec.parameters(model, name) if spec.parameters else layer_parameters(model, name)


def mark_trainable(model: nn.Module, names: str | list[str] | None = None) -> int:
    """Set requires_grad on the parameters of adapters `names` (default: the active ones); returns their count."""
    names = active_adapters(model) if names is None else [names] if isinstance(names, str) else names
    seen: dict[int, nn.Parameter] = {}
    for n in names:
        for p in adapter_parameters(model, n):
            p.requires_grad_(True)
            seen[id(p)] = p
    return sum(p.numel() for p in seen.values())


def freeze_base(model: nn.Module, names: str | list[str] | None = None) -> int:
    """Freeze every parameter, then unfreeze those of adapters `names` (default: the active ones).

    Returns:
        the number of trainable parameters.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    return mark_trainable(model, names)


def trainable_report(model: nn.Module, print_line: bool = True) -> dict[str, float]:
    """{'trainable', 'total', 'percent'} over the model's parameters (shared ones once; a quantized linear's weight
    counted as in * out); prints 'trainable params: ... || all params: ... || trainable%: ...' unless told not to."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():  # quantized weights live in buffers
        if hasattr(m, "dequantize") and isinstance(getattr(m, "in_features", None), int):
            total += m.in_features * m.out_features
    pct = 100.0 * trainable / total if total else 0.0
    if print_line:
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}")
    return {"trainable": trainable, "total": total, "percent": pct}
