"""Parameter settings of a mergekit config: their forms, their checks, and their value for one tensor.

A setting is a number (or bool), a gradient (a list of numbers interpolated over a slice's layers) or a list of
`{filter, value}` conditions matched by substring of the tensor name, first match wins. Settings are looked up in a
chain of scopes (the model's entry, its slice, the top level), the first that gives a value wins (mergekit 0.1.5,
parameter_resolver.py).
"""
from __future__ import annotations

import difflib
import math
import re
from typing import Any

from slimtune.errors import ConfigError

LAYER = re.compile(r"\.layers\.(\d+)\.")
BOOL_PARAMS = ("normalize", "int8_mask", "rescale", "filter_wise", "nuslerp_flatten", "nuslerp_row_wise")


def layer_of(tensor: str) -> int | None:
    """The decoder layer index in a tensor name (`model.layers.7.mlp...` -> 7), None outside the layers."""
    m = LAYER.search(tensor)
    return int(m.group(1)) if m else None


def depth(tensor: str, num_layers: int) -> float:
    """Where a tensor sits for gradients when one slice covers all `num_layers` layers (mergekit's plan.py):
    layer i at i / (L - 1) (1 for a single layer); every tensor outside the layers (embeddings, final norm,
    lm_head) at 0, since mergekit plans them with the config reader's initial t = 0."""
    i = layer_of(tensor)
    if i is None:
        return 0.0
    return i / (num_layers - 1) if num_layers > 1 else 1.0


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


def lookup(chain: list[dict[str, Any] | None], name: str, tensor: str, pos: float) -> Any:
    """The first value of parameter `name` that the scopes of `chain` give for `tensor` (None when none does)."""
    for scope in chain:
        if scope and name in scope:
            v = evaluate(scope[name], tensor, pos)
            if v is not None:
                return v
    return None


def refuse_unknown(keys: Any, valid: tuple[str, ...] | list[str], where: str, source: str) -> None:
    """Raise a ConfigError naming the closest valid key for the first key of `keys` not in `valid`."""
    for k in keys:
        if k not in valid:
            close = difflib.get_close_matches(str(k), list(valid), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid) or 'none'}"
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
                refuse_unknown(c, ("filter", "value"), where, source)
                if "value" not in c:
                    raise ConfigError(f"{source}: a condition in {where} has no 'value'")
                out += _leaves(c["value"], where, source)
            return out
    if isinstance(setting, dict) and "value" in setting:  # one condition written without the list
        return _leaves([setting], where, source)
    raise ConfigError(f"{source}: {where} must be a number, a list of numbers or a list of {{filter, value}}; "
                      f"got {setting!r}")


def check_value(k: str, x: Any, where: str, source: str) -> None:
    """Range checks that hold whatever the tensor: t in [0, 1], density in (0, 1], gamma / epsilon in [0, 1)."""
    if k in BOOL_PARAMS:
        if not isinstance(x, bool):
            raise ConfigError(f"{source}: {where} must be true or false, got {x!r}")
        return
    if x is None and k == "scale":  # passthrough: no scaling
        return
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ConfigError(f"{source}: {where} must be a finite number, got {x!r}")
    if k == "t" and not 0 <= x <= 1:
        raise ConfigError(f"{source}: {where} = {x} is outside [0, 1] (0 gives the base model, 1 the other)")
    if k == "density" and not 0 < x <= 1:
        raise ConfigError(f"{source}: {where} = {x} is outside (0, 1] (the fraction of each delta kept)")
    if k in ("gamma", "epsilon") and not 0 <= x < 1:
        raise ConfigError(f"{source}: {where} = {x} is outside [0, 1)")


def check_params(params: Any, valid: dict[str, Any], where: str, source: str, other: dict[str, Any]) -> dict:
    """A checked copy of one scope's `parameters:` mapping.

    Args:
        params: the mapping as loaded from YAML (None for none).
        valid: the parameters read in this scope (name -> default).
        where: its place in the config, for messages.
        other: parameters valid elsewhere but not here (named in the message).
    Raises:
        ConfigError: not a mapping, an unknown or misplaced name, a value of the wrong form or out of range.
    """
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: {where} must be a mapping of parameter: value")
    for k, v in params.items():
        if k not in valid and k in other:
            to = "the top-level parameters" if where.startswith(("models", "slices")) else "each model"
            raise ConfigError(f"{source}: parameter {k!r} in {where} is not read there; move it to {to}")
        refuse_unknown([k], list(valid), where, source)
        for x in _leaves(v, f"{where}.{k}", source):
            check_value(k, x, f"{where}.{k}", source)
    return {k: ([v] if isinstance(v, dict) else v) for k, v in params.items()}
