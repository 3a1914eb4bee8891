"""Checks on a Hugging Face `config.json` before anything is built from it: each shape field a positive integer, the
attention heads divisible into KV groups, each float finite and positive, the token ids integers, `torch_dtype` a float
type. A bad field is one line naming the file, the key, the value and the fix (not a ZeroDivisionError or a torch
TypeError three calls later)."""
from __future__ import annotations

import math
from typing import Any

from slimtune.errors import CheckpointError
from slimtune.precision.formats import float_named

REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
POSITIVE_FLOATS = ("rms_norm_eps", "layer_norm_eps", "rope_theta")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
FIX = "fix it to match the checkpoint (copy config.json again from the model's source)"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_hf_config(d: Any, source: str) -> None:
    """Refuse a config.json dict whose fields cannot describe a model.

    Raises:
        CheckpointError: "<source>: <key> = <value> <what is wrong>; fix: ...".
    """
    if not isinstance(d, dict):
        raise CheckpointError(f"{source}: holds a {type(d).__name__}, not a JSON object of model settings; {FIX}")

    def bad(key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{source}: {key} = {d.get(key)!r} {why}; {FIX}")

    for k in REQUIRED_INTS + OPTIONAL_INTS:
        v = d.get(k)
        if v is None and k in OPTIONAL_INTS:
            continue
        if v is None:
            raise CheckpointError(f"{source}: required key {k!r} is missing; {FIX}")
        if not _is_int(v) or v < 1:
            raise bad(k, "is not a positive integer")
    heads, kv = d["num_attention_heads"], d.get("num_key_value_heads") or d["num_attention_heads"]
    if heads % kv:
        raise bad("num_key_value_heads", f"does not divide num_attention_heads = {heads}")
    if d.get("head_dim") is None and d["hidden_size"] % heads:
        raise bad("hidden_size", f"is not a multiple of num_attention_heads = {heads} (and no head_dim is given)")
    for k in POSITIVE_FLOATS:
        v = d.get(k)
        if v is not None and not (_is_num(v) and math.isfinite(v) and v > 0):
            raise bad(k, "is not a finite positive number")
    for k in ("rope_scaling", "rope_parameters"):
        rope = d.get(k)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise bad(k, "is not an object")
        for name, v in rope.items():
            if _is_num(v) and not (math.isfinite(v) and v > 0):
                raise CheckpointError(f"{source}: {k}.{name} = {v!r} is not a finite positive number; {FIX}")
    for k in TOKEN_IDS:
        v = d.get(k)
        ids = v if isinstance(v, list) else [v]
        if v is not None and not all(_is_int(i) and i >= 0 for i in ids):
            raise bad(k, "is not a token id (a non-negative integer, or a list of them for eos_token_id)")
    for k in ("torch_dtype", "dtype"):
        v = d.get(k)
        if v not in (None, "auto") and (not isinstance(v, str) or float_named(v) is None):
            raise bad(k, "is not a float type of stored weights (float32, bfloat16 or float16)")
    if not isinstance(d.get("tie_word_embeddings", False), bool):
        raise bad("tie_word_embeddings", "is not true or false")
