"""Adapter folders in the Hugging Face PEFT format: `adapter_config.json` (PEFT's field names and meanings) and
`adapter_model.safetensors` (keys `base_model.model.<module path>.lora_A.weight` ...). Loading validates every name
and shape against the model before anything is modified, so a wrong base never leaves a half-applied adapter.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.errors import CheckpointError, ConfigError
from slimtune.io.jsonfile import read_json
from slimtune.io.safetensors import write_safetensors
from slimtune.precision.guard import check_finite
from slimtune.peft.base import FILE_PREFIX, MethodConfig, get_method, method_for_peft_type
from slimtune.peft.layer import active_adapters, model_adapters, set_active_adapters

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _base_name(model: nn.Module) -> str | None:
    """The model's folder or hub id, when it knows it (transformers' name_or_path, slimtune's config.json copy)."""
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None)
    if not name and isinstance(getattr(cfg, "hf", None), dict):
        name = cfg.hf.get("_name_or_path")
    return name or None


def adapter_json(model: nn.Module, cfg: MethodConfig, name: str,
                 base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The adapter_config.json of adapter `name`: the method's fields plus PEFT's bookkeeping ones."""
    from slimtune.peft.targets import ALL_LINEAR, short_names

    d = cfg.to_peft_json()
    if d.get("target_modules") == ALL_LINEAR:  # as PEFT does after injecting: the names actually adapted
        paths = [k[len(FILE_PREFIX):].rsplit(".", 2)[0] for k in get_method(cfg.method).state_dict(model, name)
                 if k.endswith("lora_A.weight")]
        d["target_modules"] = short_names(paths) or d["target_modules"]
    if isinstance(d.get("target_modules"), (set, tuple)):
        d["target_modules"] = sorted(d["target_modules"])
    d.setdefault("task_type", "CAUSAL_LM")
    d["base_model_name_or_path"] = base_model_name_or_path or _base_name(model)
    d.setdefault("inference_mode", True)
    d.setdefault("revision", None)
    if cfg.peft_type is None:
        d["slimtune_method"] = cfg.method
    return d


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str | None = None,
                 base_model_name_or_path: str | None = None, state: dict[str, Tensor] | None = None) -> Path:
    """Write adapter `adapter_name` (default: the active one) as `path/adapter_config.json` +
    `path/adapter_model.safetensors`; each file is written under a temporary name and renamed, and other files in
    the folder are left alone. `state`: the adapter's tensors already gathered (a model sharded over several
    processes), instead of the model's own.

    Returns:
        the folder.
    Raises:
        ConfigError: the model carries no such adapter.
    """
    adapters = model_adapters(model)
    if adapter_name is None:
        act = active_adapters(model)
        adapter_name = act[0] if act else next(iter(adapters), "default")
    if adapter_name not in adapters:
        raise ConfigError(f"no adapter named {adapter_name!r} to save; this model has: "
                          f"{', '.join(adapters) or '(none; call apply_method first)'}")
    cfg = adapters[adapter_name]
    if state is None:
        state = get_method(cfg.method).state_dict(model, adapter_name)
    sd = {k: t.detach().to("cpu").contiguous() for k, t in state.items()}
    for k, t in sd.items():
        check_finite(k, t, fix="nothing was written; the adapter's weights are damaged (a diverged run?)")
    meta = adapter_json(model, cfg, adapter_name, base_model_name_or_path)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_c = folder / f".{WEIGHTS_NAME}.tmp-{os.getpid()}", folder / f".{CONFIG_NAME}.tmp-{os.getpid()}"
    try:
        write_safetensors(sd, tmp_w)
        tmp_c.write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp_w, folder / WEIGHTS_NAME)
        os.replace(tmp_c, folder / CONFIG_NAME)
    finally:
        tmp_w.unlink(missing_ok=True)
        tmp_c.unlink(missing_ok=True)
    return folder


def read_adapter_config(path: str | Path) -> tuple[str, MethodConfig, dict[str, Any]]:
    """(method name, config, raw json) of an adapter folder.

    Raises:
        CheckpointError: missing folder or file, unreadable JSON, an unsupported peft_type or option.
    """
    folder = Path(path)
    f = folder / CONFIG_NAME
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: adapter folder not found; pass a folder holding {CONFIG_NAME} and "
                              f"{WEIGHTS_NAME}")
    if not f.exists():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME}; this is not a PEFT adapter folder")
    d = read_json(f, fix="copy it again from where the adapter was trained")
    if "peft_type" not in d:
        raise CheckpointError(f"{f}: no peft_type field; this is not a PEFT adapter config")
    try:
        spec = method_for_peft_type(d["peft_type"], d)
        cfg = spec.config_cls.from_peft_json(d)
    except ConfigError as e:
        raise CheckpointError(f"{f}: {e}") from None
    except TypeError as e:  # a field of the wrong type
        raise CheckpointError(f"{f}: malformed field ({e})") from None
    return spec.name, cfg, d


def _file_shapes(f: Path) -> dict[str, tuple[int, ...]]:
    from slimtune.io.safetensors import read_safetensors_header

    header, _ = read_safetensors_header(f)
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if k.endswith("lora_magnitude_vector.weight"):  # older PEFT wrote DoRA's magnitude with '.weight'
            k = k[: -len(".weight")]
        out[k] = tuple(v["shape"])
    return out


def check_adapter(model: nn.Module, path: str | Path) -> tuple[str, MethodConfig, Path]:
    """Check an adapter folder against `model` without touching it: every tensor name and shape in the weights file
    against what the method would create (methods without `shapes` are checked only when loaded).

    Returns:
        (method name, config, weights file).
    Raises:
        CheckpointError: missing or malformed files; the adapter does not fit this model (names the first
            mismatching tensor and both shapes, or the missing module).
    """
    method, cfg, _ = read_adapter_config(path)
    folder = Path(path)
    wfile = folder / WEIGHTS_NAME
    if not wfile.exists():
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} (only safetensors adapters are read; convert an "
                              "adapter_model.bin with PEFT first)")
    spec = get_method(method)
    have = _file_shapes(wfile)
    if spec.shapes is not None:
        try:
            want = spec.shapes(model, cfg)
        except ConfigError as e:
            raise CheckpointError(f"{folder}: adapter does not fit {type(model).__name__}: {e}") from None
        for k, s in have.items():
            if k not in want:
                raise CheckpointError(f"{wfile}: tensor {k} {s} has no place in this model (is the adapter for "
                                      "another base model?)")
            if s != want[k]:
                raise CheckpointError(f"{wfile}: tensor {k} has shape {s}, this model needs {want[k]} (the adapter "
                                      "was trained on another base model or config)")
        missing = [k for k in want if k not in have]
        if missing:
            raise CheckpointError(f"{wfile}: tensor {missing[0]} {want[missing[0]]} is missing ({len(missing)} "
                                  "missing in all); the file is incomplete or for another config")
    return method, cfg, wfile


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default", activate: bool = True) -> str:
    """Read a PEFT adapter folder into `model` as adapter `adapter_name` (made active unless `activate=False`).

    Every tensor name and shape is checked against what the method would create on this model before the model is
    touched (`check_adapter`). Nothing is frozen or unfrozen.
    Returns:
        the adapter name.
    Raises:
        CheckpointError: missing or malformed files; the adapter does not fit this model (names the first
            mismatching tensor and both shapes, or the missing module).
        ConfigError: `adapter_name` already in use.
    """
    from safetensors.torch import load_file

    if adapter_name in model_adapters(model):
        raise ConfigError(f"adapter {adapter_name!r} already exists on this model; pass another adapter_name")
    method, cfg, wfile = check_adapter(model, path)
    spec = get_method(method)
    sd = {(k[:-7] if k.endswith("lora_magnitude_vector.weight") else k): t for k, t in load_file(str(wfile)).items()}
    for k, t in sd.items():
        check_finite(k, t, str(wfile))
    prev_active = active_adapters(model)
    spec.apply(model, cfg, adapter_name)
    model_adapters(model)[adapter_name] = cfg
    try:
        _copy_in(model, spec, sd, adapter_name, wfile)
    except CheckpointError:
        from slimtune.peft.api import delete_adapter  # undo: a method without `shapes` is checked only now

        delete_adapter(model, adapter_name)
        set_active_adapters(model, prev_active)
        raise
    set_active_adapters(model, [adapter_name] if activate else prev_active)
    return adapter_name


@torch.no_grad()
def _copy_in(model: nn.Module, spec, sd: dict[str, Tensor], name: str, wfile: Path) -> None:
    if spec.load_state_dict is not None:
        spec.load_state_dict(model, sd, name)
        return
    live = spec.state_dict(model, name)
    for k, t in sd.items():
        if k not in live:
            raise CheckpointError(f"{wfile}: tensor {k} {tuple(t.shape)} has no place in this model")
        if tuple(live[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{wfile}: tensor {k} has shape {tuple(t.shape)}, this model needs "
                                  f"{tuple(live[k].shape)}")
    missing = [k for k in live if k not in sd]
    if missing:
        raise CheckpointError(f"{wfile}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    for k, t in sd.items():
        live[k].copy_(t.to(device=live[k].device, dtype=live[k].dtype))
