"""Read a merge config written in mergekit's YAML format (the subset the methods here need) into one typed dataclass.

A parameter value is what mergekit calls a setting: a number, a gradient (a list of numbers interpolated across the
layers) or a list of `{filter, value}` conditions matched by substring of the tensor name, first match wins.
Unknown keys, missing weights and out-of-range values are refused with one line before any file is read.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimtune.errors import ConfigError

# method -> (global parameters with their defaults, per-model parameters with their defaults; None = required)
METHODS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": ({"normalize": True}, {"weight": None}),
    # mergekit takes `density` for task_arithmetic too and ignores it (no sparsification); so does this
    "task_arithmetic": ({"normalize": False, "lambda": 1.0, "int8_mask": False}, {"weight": None, "density": 1.0}),
    "ties": ({"normalize": True, "lambda": 1.0, "int8_mask": False}, {"weight": None, "density": 1.0}),
    "dare_linear": ({"normalize": False, "rescale": True, "lambda": 1.0, "int8_mask": False},
                    {"weight": None, "density": 1.0}),
    "dare_ties": ({"normalize": False, "rescale": True, "lambda": 1.0, "int8_mask": False},
                  {"weight": None, "density": 1.0}),
    "slerp": ({"t": None}, {}),
}
USES_BASE = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp")
TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source")
LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class ModelEntry:
    model: str  # a model folder, an adapter folder, or mergekit's "BASE+ADAPTER"
    parameters: dict[str, Any] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None  # from mergekit `slices:`; must cover all layers


@dataclass
class MergeConfig:
    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # mergekit's compute dtype; here compute is always fp32 and this is the output dtype
    out_dtype: str | None = None
    source: str = "merge config"  # the file, for messages
    notes: list[str] = field(default_factory=list)

    @property
    def uses_base(self) -> bool:
        return self.merge_method in USES_BASE

    def is_base(self, entry: ModelEntry) -> bool:
        return self.base_model is not None and entry.model == self.base_model

    def value(self, name: str, tensor: str, num_layers: int, model: int | None = None) -> Any:
        """Parameter `name` for one tensor (and one model's entry), as mergekit evaluates it: the model's own setting
        first, then the top-level one, then the method's default. Gradients are read at the tensor's depth."""
        pos = depth(tensor, num_layers)
        if model is not None:
            v = evaluate(self.models[model].parameters.get(name), tensor, pos)
            if v is not None:
                return v
        v = evaluate(self.parameters.get(name), tensor, pos)
        if v is not None:
            return v
        glob, per = METHODS[self.merge_method]
        return per.get(name, glob.get(name))


def depth(tensor: str, num_layers: int) -> float:
    """Where a tensor sits for gradients (mergekit): layer i of L at i / (L - 1), embeddings at 0, the rest at 1."""
    m = LAYER.search(tensor)
    if m:
        return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0
    return 0.0 if "embed_tokens" in tensor else 1.0


def evaluate(setting: Any, tensor: str, pos: float) -> Any:
    """A setting's value for one tensor at depth `pos` in [0, 1]; None when no condition matches."""
    if setting is None or isinstance(setting, (bool, int, float)):
        return setting
    if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        # a gradient: piecewise-linear over len - 1 equal segments of depth
        x = pos * (len(setting) - 1)
        i0 = int(x)
        i1 = min(len(setting) - 1, i0 + 1)
        return (1 - (x - i0)) * setting[i0] + (x - i0) * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or f in tensor:
            return evaluate(cond["value"], tensor, pos)
    return None


def _refuse_unknown(keys: Any, valid: tuple[str, ...] | list[str], where: str, source: str) -> None:
    for k in keys:
        if k not in valid:
            close = difflib.get_close_matches(str(k), list(valid), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
            raise ConfigError(f"{source}: unknown key {k!r} in {where}; {hint}")


def _leaves(setting: Any, where: str, source: str) -> list[Any]:
    """The plain values in a setting (numbers of gradients, values of conditions), checking its form."""
    if setting is None or isinstance(setting, (bool, int, float)):
        return [setting]
    if isinstance(setting, list) and setting:
        if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return list(setting)
        if all(isinstance(e, dict) for e in setting):
            out = []
            for c in setting:
                _refuse_unknown(c, ("filter", "value"), where, source)
                if "value" not in c:
                    raise ConfigError(f"{source}: a condition in {where} has no 'value'")
                out += _leaves(c["value"], where, source)
            return out
    raise ConfigError(f"{source}: {where} must be a number, a list of numbers or a list of {{filter, value}}; "
                      f"got {setting!r}")


def _check_params(params: Any, valid: dict[str, Any], where: str, source: str, other: dict[str, Any]) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: {where} must be a mapping of parameter: value")
    for k, v in params.items():
        if k not in valid and k in other:
            raise ConfigError(f"{source}: parameter {k!r} in {where} is not read there; move it to "
                              f"{'the top-level parameters' if where.startswith('models') else 'each model'}")
        _refuse_unknown([k], list(valid), where, source)
        for x in _leaves(v, f"{where}.{k}", source):
            _check_range(k, x, f"{where}.{k}", source)
    return dict(params)


def _check_range(k: str, x: Any, where: str, source: str) -> None:
    if k in ("normalize", "int8_mask", "rescale"):
        if not isinstance(x, bool):
            raise ConfigError(f"{source}: {where} must be true or false, got {x!r}")
        return
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ConfigError(f"{source}: {where} must be a finite number, got {x!r}")
    if k == "t" and not 0 <= x <= 1:
        raise ConfigError(f"{source}: {where} = {x} is outside [0, 1] (0 gives the base model, 1 the other)")
    if k == "density" and not 0 < x <= 1:
        raise ConfigError(f"{source}: {where} = {x} is outside (0, 1] (the fraction of each delta kept)")


def parse_config(d: Any, source: str = "merge config") -> MergeConfig:
    """Check a loaded mergekit YAML document and return a `MergeConfig`.

    Raises:
        ConfigError: an unknown key (naming the closest valid one), an unknown method, a missing weight or t, a
            value out of range, slices that are not one whole-model slice.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping with merge_method and models")
    _refuse_unknown(d, TOP_KEYS, "the top level", source)
    method = d.get("merge_method")
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), list(METHODS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"supported: {', '.join(METHODS)}"
        raise ConfigError(f"{source}: merge_method {method!r} is not supported; {hint}")
    glob, per = METHODS[method]
    notes = []
    entries = d.get("models")
    if d.get("slices") is not None:
        if entries is not None:
            raise ConfigError(f"{source}: give either models or slices, not both")
        entries = _slices_to_models(d["slices"], source)
        notes.append("slices: one slice over all layers, read as models")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: models must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    models = []
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"model": e}
        if not isinstance(e, dict) or not isinstance(e.get("model"), str):
            raise ConfigError(f"{source}: models[{i}] needs a 'model: PATH' entry")
        _refuse_unknown(e, ("model", "parameters", "layer_range"), f"models[{i}]", source)
        params = _check_params(e.get("parameters"), per, f"models[{i}].parameters", source, glob)
        lr = e.get("layer_range")
        if lr is not None and not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) for x in lr)):
            raise ConfigError(f"{source}: models[{i}].layer_range must be [first, end], got {lr!r}")
        models.append(ModelEntry(e["model"], params, tuple(lr) if lr else None))
    params = _check_params(d.get("parameters"), {**glob, **per}, "parameters", source, {})
    base = d.get("base_model")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{source}: base_model must be a path")
    if method in USES_BASE and base is None:
        raise ConfigError(f"{source}: {method} needs a base_model (the model the deltas are taken from)")
    tok = d.get("tokenizer_source")
    if tok not in (None, "base", base):
        raise ConfigError(f"{source}: tokenizer_source {tok!r} is not supported; the output always takes the "
                          "base model's tokenizer (write tokenizer_source: base or remove it)")
    cfg = MergeConfig(method, models, base, params, d.get("dtype"), d.get("out_dtype"), source, notes)
    if params.get("int8_mask") is not None or any("int8_mask" in m.parameters for m in models):
        notes.append("int8_mask ignored: sign masks are boolean here")
    if method == "task_arithmetic" and ("density" in params or any("density" in m.parameters for m in models)):
        notes.append("density has no effect with task_arithmetic (as in mergekit); use ties or dare_linear to "
                     "sparsify")
    _check_required(cfg)
    return cfg


def _slices_to_models(slices: Any, source: str) -> list[dict]:
    """mergekit's `slices:` with one slice whose sources all cover the same layer range -> a models list."""
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        raise ConfigError(f"{source}: only one slice over all layers is supported (no layer stacking); "
                          "write models: instead")
    _refuse_unknown(slices[0], ("sources",), "slices[0]", source)
    srcs = slices[0].get("sources")
    if not isinstance(srcs, list) or not srcs:
        raise ConfigError(f"{source}: slices[0].sources must be a list of {{model, layer_range}}")
    ranges = {tuple(s.get("layer_range") or ()) for s in srcs if isinstance(s, dict)}
    if len(ranges) != 1:
        raise ConfigError(f"{source}: all sources of slices[0] must have the same layer_range")
    return srcs


def _check_required(cfg: MergeConfig) -> None:
    glob, per = METHODS[cfg.merge_method]
    for k, default in glob.items():
        if default is None and k not in cfg.parameters:
            raise ConfigError(f"{cfg.source}: {cfg.merge_method} needs parameters: {{{k}: ...}}")
    merged = [m for m in cfg.models if not (cfg.uses_base and cfg.is_base(m))]
    if cfg.merge_method == "slerp":
        others = [m for m in cfg.models if not cfg.is_base(m)]
        if len(cfg.models) != 2 or len(others) != 1:
            raise ConfigError(f"{cfg.source}: slerp merges exactly two models, one of them the base_model; got "
                              f"{len(cfg.models)} models with {len(cfg.models) - len(others)} equal to base_model")
        return
    if not merged:
        raise ConfigError(f"{cfg.source}: no models to merge besides the base_model")
    for k, default in per.items():
        if default is None and k not in cfg.parameters:
            missing = [i for i, m in enumerate(cfg.models) if m in merged and k not in m.parameters]
            if missing:
                have = len(merged) - len(missing)
                raise ConfigError(f"{cfg.source}: {have} {k}s for {len(merged)} models: models[{missing[0]}] "
                                  f"({cfg.models[missing[0]].model}) has no {k}; give each model "
                                  f"parameters: {{{k}: ...}}")


def load_config(path: str | Path) -> MergeConfig:
    """Read and check a mergekit YAML file.

    Raises:
        ConfigError: a missing file, invalid YAML, or anything `parse_config` refuses.
    """
    import yaml

    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: merge config not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read; fix: write a plain mergekit config") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a YAML text file ({type(e).__name__})") from None
    return parse_config(d, str(path))
