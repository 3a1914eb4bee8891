"""Which modules of a model a method adapts: by exact name, name suffix ('q_proj'), regular expression or 'all-linear'
(every linear layer except the output head), optionally restricted to layer indices. Works on any nn.Module, on the
meta device too; modules already wrapped by an adapter count by their original name.
"""
from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from slimtune.errors import ConfigError
from slimtune.peft.layer import AdapterLayer

ALL_LINEAR = "all-linear"
OUTPUT_HEADS = ("lm_head", "embed_out", "output", "score")  # never part of 'all-linear'
LAYER_CONTAINERS = ("layers", "h", "block", "blocks", "layer")  # PEFT's common layer containers  # ...<container>.<index>.<rest>


def is_linear(m: nn.Module) -> bool:
    """An nn.Linear, or any layer with `in_features`/`out_features` (a quantized linear), or an adapter wrapping one."""
    if isinstance(m, AdapterLayer):
        return is_linear(m.base_layer)
    if isinstance(m, nn.Linear):
        return True
    return isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int) \
        and not isinstance(m, (nn.Embedding, nn.Conv1d, nn.Conv2d))


def iter_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """named_modules() that stops at adapter layers: a wrapped `q_proj` is yielded once, as `q_proj`."""
    yield prefix, model
    if isinstance(model, AdapterLayer):
        return
    for name, child in model.named_children():
        yield from iter_modules(child, f"{prefix}.{name}" if prefix else name)


def linear_names(model: nn.Module) -> list[str]:
    """Full paths of every linear layer (adapter wrappers counted as the layer they wrap)."""
    return [n for n, m in iter_modules(model) if n and is_linear(m)]


def layer_index(name: str, layers_pattern: str | list[str] | None = None) -> int | None:
    """The block index in a module path ('model.layers.3.self_attn.q_proj' -> 3), or None outside the blocks."""
    pats = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or LAYER_CONTAINERS)
    for p in pats:
        m = re.search(rf"(?:^|\.){re.escape(p)}\.(\d+)(?:\.|$)", name)
        if m:
            return int(m.group(1))
    return None


def _is_plain(s: str) -> bool:
    """A name or dotted path (no regular-expression syntax)."""
    return re.fullmatch(r"[A-Za-z0-9_.\-]+", s) is not None


def matches(name: str, target: str) -> bool:
    """True when module path `name` is `target`, ends with '.' + target, or (target not plain) fully matches it as
    a regular expression."""
    if name == target or name.endswith("." + target):
        return True
    if _is_plain(target):
        return False
    try:
        return re.fullmatch(target, name) is not None
    except re.error as e:
        raise ConfigError(f"target_modules: {target!r} is not a valid regular expression ({e})") from None


def _suffixes(names: list[str]) -> str:
    """A short listing of module names: their last components, deduplicated in order."""
    return ", ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names)) or "(none)"


def find_targets(model: nn.Module, target_modules: str | list[str] | tuple[str, ...],
                 layers_to_transform: int | list[int] | None = None,
                 layers_pattern: str | list[str] | None = None,
                 exclude_modules: str | list[str] | None = None, linear_only: bool = True,
                 strict: bool = True) -> list[str]:
    """Paths of the modules to adapt, in model order.

    Args:
        model: any nn.Module (a slimtune Decoder, a transformers model, on any device including meta).
        target_modules: 'all-linear'; a list of exact names or suffixes ('q_proj', 'self_attn.q_proj') or regular
            expressions; or one string: a regular expression matched against the full path (PEFT's meaning), also
            accepted as a single name or suffix, or a comma-separated list of names.
        layers_to_transform: keep only modules inside these block indices.
        layers_pattern: the name of the block container ('layers', 'h', ...), default: the common ones.
        exclude_modules: names / suffixes / regular expressions to leave out.
        linear_only: match only linear layers (LoRA); False lets a method target other modules by name.
        strict: every listed name must match something (catches typos); False (configs read from adapter files, as
            PEFT) only requires that something matches.
    Returns:
        the module paths, deduplicated.
    Raises:
        ConfigError: nothing matches (or one listed name matches nothing), listing the linear module names present.
    """
    candidates = [(n, m) for n, m in iter_modules(model) if n]
    linear = [n for n, m in candidates if is_linear(m)]
    pool = linear if linear_only else [n for n, _ in candidates]
    if isinstance(target_modules, str) and target_modules != ALL_LINEAR and "," in target_modules \
            and _is_plain(target_modules.replace(",", "").replace(" ", "")):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    if target_modules == ALL_LINEAR or (isinstance(target_modules, (list, tuple)) and ALL_LINEAR in target_modules):
        heads = _output_heads(model)
        chosen = [n for n in linear if n.rsplit(".", 1)[-1] not in OUTPUT_HEADS and n not in heads]
        listed = []
    else:
        listed = [target_modules] if isinstance(target_modules, str) else list(target_modules or [])
        if not listed:
            raise ConfigError(f"target_modules is empty; linear modules here: {_suffixes(linear)}")
        chosen = []
        for t in listed:
            hit = [n for n in pool if matches(n, t)]
            if not hit and strict:
                raise ConfigError(f"target module {t!r} matches no {'linear ' if linear_only else ''}module of "
                                  f"{type(model).__name__}; linear modules here: {_suffixes(linear)}")
            chosen += hit
        chosen = [n for n in pool if n in set(chosen)]  # model order, deduplicated
    if exclude_modules:
        ex = [exclude_modules] if isinstance(exclude_modules, str) else list(exclude_modules)
        chosen = [n for n in chosen if not any(matches(n, e) for e in ex)]
    if layers_to_transform is not None:
        keep = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        chosen = [n for n in chosen if layer_index(n, layers_pattern) in keep]
    if not chosen:
        where = f" in layers {layers_to_transform}" if layers_to_transform is not None else ""
        raise ConfigError(f"target_modules {target_modules!r}{where} selects no module of {type(model).__name__}; "
                          f"linear modules here: {_suffixes(linear)}")
    return chosen


def _output_heads(model: nn.Module) -> set[str]:
    """Paths of the output embedding (transformers' get_output_embeddings), if the model says."""
    get = getattr(model, "get_output_embeddings", None)
    if get is None:
        return set()
    try:
        head = get()
    except Exception:  # some models raise NotImplementedError
        return set()
    return {n for n, m in model.named_modules() if head is not None and m is head}


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at `path` in place of the module there."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def short_names(paths: list[str]) -> list[str]:
    """The deduplicated last components of module paths (what PEFT writes as target_modules after 'all-linear')."""
    return list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in paths))
