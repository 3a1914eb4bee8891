"""Read a merge config written in mergekit's YAML format into one typed dataclass.

`models:` (every model over all layers) and `slices:` (layer stacking: each output slice takes a layer range of
one or more models) are both read; so are `tokenizer:` / `tokenizer_source:` and `chat_template:`. Unknown keys,
missing weights and out-of-range values are refused with one line before any file is read.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimtune.errors import ConfigError
from slimtune.merge.settings import check_params, depth, evaluate, lookup, refuse_unknown  # noqa: F401 (re-export)

REQUIRED = "required"  # as a parameter default: the config must give it


@dataclass(frozen=True)
class Method:
    """One merge method as mergekit 0.1.5 defines it (merge_methods/registry.py and the method files)."""

    family: str  # linear | gta | slerp | nuslerp | model_stock | passthrough
    shared: dict[str, Any]  # parameters read once per tensor -> default
    per_model: dict[str, Any]  # parameters read per input model -> default
    base: str = "ignored"  # required | optional | ignored: the role of base_model
    sparsify: str | None = None  # gta: magnitude | random | outliers | della
    consensus: bool = False  # gta: TIES sign election


def _gta(sparsify: str | None, consensus: bool, normalize: bool, rescale: bool, **extra: float) -> Method:
    """A generalized task arithmetic method: base + lambda * mix(sparsified deltas)."""
    return Method("gta", {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False},
                  {"weight": REQUIRED, "density": 1.0, **extra}, "required", sparsify, consensus)


METHODS: dict[str, Method] = {
    "linear": Method("linear", {"normalize": True}, {"weight": REQUIRED}),
    # mergekit takes `density` for task_arithmetic too and ignores it (no sparsification); so does this
    "task_arithmetic": _gta(None, False, False, False),
    "ties": _gta("magnitude", True, True, False),
    "dare_linear": _gta("random", False, False, True),
    "dare_ties": _gta("random", True, False, True),
    "breadcrumbs": _gta("outliers", False, False, False, gamma=0.01),
    "breadcrumbs_ties": _gta("outliers", True, False, False, gamma=0.01),
    "della": _gta("della", True, True, True, epsilon=0.15),
    "della_linear": _gta("della", False, False, True, epsilon=0.15),
    "slerp": Method("slerp", {"t": REQUIRED}, {}, "required"),
    "nuslerp": Method("nuslerp", {"nuslerp_flatten": True, "nuslerp_row_wise": False}, {"weight": REQUIRED},
                      "optional"),
    "model_stock": Method("model_stock", {"filter_wise": False}, {}, "required"),
    "passthrough": Method("passthrough", {}, {"scale": None}),
}
USES_BASE = tuple(k for k, m in METHODS.items() if m.base == "required")
TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "tokenizer", "chat_template")
CHAT_TEMPLATE_NAMES = ("auto", "chatml")  # mergekit also bundles alpaca, llama3, mistral, exaone (not here)


@dataclass
class ModelEntry:
    model: str  # a model folder, an adapter folder, or mergekit's "BASE+ADAPTER"
    parameters: dict[str, Any] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None  # [first, end) of the model's layers; None = all


@dataclass
class SliceDef:
    """One output slice: its layers are the merge of the sources' layer ranges (all of one length)."""

    sources: list[ModelEntry]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenizerDef:
    """mergekit's `tokenizer:` block: the output vocabulary (`base`, `union` or a model's) and token overrides."""

    source: str = "union"
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)  # token -> {source, force}
    pad_to_multiple_of: int | None = None


@dataclass
class MergeConfig:
    merge_method: str
    models: list[ModelEntry]  # models: as written; for slices: each model once, as first seen
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # mergekit's compute dtype; here compute is always fp32 and this is the output dtype
    out_dtype: str | None = None
    source: str = "merge config"  # the file, for messages
    notes: list[str] = field(default_factory=list)
    slices: list[SliceDef] = field(default_factory=list)  # empty for a models: config
    tokenizer: TokenizerDef | None = None
    chat_template: str | None = None

    @property
    def method(self) -> Method:
        return METHODS[self.merge_method]

    @property
    def uses_base(self) -> bool:
        return self.method.base == "required"

    def is_base(self, entry: ModelEntry) -> bool:
        return self.base_model is not None and entry.model == self.base_model

    def out_slices(self) -> list[SliceDef]:
        """The output as slices; a models: config is one slice over all layers, with the base_model added when the
        method reads it and it is not listed (as mergekit's planner does)."""
        if self.slices:
            return self.slices
        srcs = list(self.models)
        if self.base_model and self.method.base != "ignored" and not any(self.is_base(m) for m in srcs):
            srcs.append(ModelEntry(self.base_model))
        return [SliceDef(srcs)]

    def value(self, name: str, tensor: str, num_layers: int, model: int | None = None) -> Any:
        """Parameter `name` for one tensor of a models: config (and one model's entry), as mergekit evaluates it:
        the model's own setting first, then the top-level one, then the method's default."""
        chain = ([self.models[model].parameters] if model is not None else []) + [self.parameters]
        v = lookup(chain, name, tensor, depth(tensor, num_layers))
        if v is not None:
            return v
        m = self.method
        return m.per_model.get(name, m.shared.get(name))


def _entry(e: Any, where: str, source: str, per: dict, glob: dict, in_slice: bool) -> ModelEntry:
    if isinstance(e, str):
        e = {"model": e}
    if not isinstance(e, dict) or not isinstance(e.get("model"), str):
        raise ConfigError(f"{source}: {where} needs a 'model: PATH' entry")
    if "layer_range" in e and not in_slice:
        raise ConfigError(f"{source}: {where}.layer_range is only read in slices: sources; models: merge all layers")
    refuse_unknown(e, ("model", "parameters", "layer_range"), where, source)
    params = check_params(e.get("parameters"), per, f"{where}.parameters", source, glob)
    lr = e.get("layer_range")
    if lr is None and in_slice:
        raise ConfigError(f"{source}: {where} needs layer_range: [first, end]")
    if lr is not None and not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) for x in lr)
                               and 0 <= lr[0] < lr[1]):
        raise ConfigError(f"{source}: {where}.layer_range must be [first, end] with 0 <= first < end, got {lr!r}")
    return ModelEntry(e["model"], params, tuple(lr) if lr else None)


def _slices(slices: Any, source: str, per: dict, glob: dict) -> list[SliceDef]:
    if not isinstance(slices, list) or not slices:
        raise ConfigError(f"{source}: slices must be a non-empty list of {{sources: [{{model, layer_range}}]}}")
    out = []
    for s, d in enumerate(slices):
        where = f"slices[{s}]"
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: {where} must be a mapping with sources")
        for k in ("base_model", "residual_weight"):
            if k in d:
                raise ConfigError(f"{source}: {where}.{k} is not supported; set base_model at the top level")
        refuse_unknown(d, ("sources", "parameters"), where, source)
        srcs = d.get("sources")
        if not isinstance(srcs, list) or not srcs:
            raise ConfigError(f"{source}: {where}.sources must be a list of {{model, layer_range}}")
        entries = [_entry(e, f"{where}.sources[{j}]", source, per, glob, True) for j, e in enumerate(srcs)]
        lengths = {e.layer_range[1] - e.layer_range[0] for e in entries}
        if len(lengths) != 1:
            raise ConfigError(f"{source}: the sources of {where} cover {sorted(lengths)} layers; all sources of one "
                              "slice must have the same number of layers")
        out.append(SliceDef(entries, check_params(d.get("parameters"), {**glob, **per}, f"{where}.parameters",
                                                  source, {})))
    return out


def _tokenizer(d: dict, base: str | None, source: str) -> TokenizerDef | None:
    """tokenizer_source: X is mergekit's short form of tokenizer: {source: X}."""
    if d.get("tokenizer_source") is not None and d.get("tokenizer") is not None:
        raise ConfigError(f"{source}: give tokenizer_source or tokenizer, not both")
    if d.get("tokenizer_source") is not None:
        t = d["tokenizer_source"]
        if not isinstance(t, str):
            raise ConfigError(f"{source}: tokenizer_source must be base, union or a model path")
        return TokenizerDef("base" if t == base else t)
    t = d.get("tokenizer")
    if t is None:
        return None
    if not isinstance(t, dict):
        raise ConfigError(f"{source}: tokenizer must be a mapping with source, tokens, pad_to_multiple_of")
    refuse_unknown(t, ("source", "tokens", "pad_to_multiple_of"), "tokenizer", source)
    src = t.get("source", "union")
    pad = t.get("pad_to_multiple_of")
    if not isinstance(src, str):
        raise ConfigError(f"{source}: tokenizer.source must be base, union or a model path")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise ConfigError(f"{source}: tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}")
    tokens = t.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise ConfigError(f"{source}: tokenizer.tokens must map each token to {{source: ..., force: ...}}")
    for tok, spec in tokens.items():
        _check_token(str(tok), spec, source)
    return TokenizerDef(src, {str(k): dict(v or {}) for k, v in tokens.items()}, pad)


def _check_token(tok: str, spec: Any, source: str) -> None:
    where = f"tokenizer.tokens[{tok!r}]"
    if spec is None:
        return
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: {where} must be a mapping with source and force")
    refuse_unknown(spec, ("source", "force"), where, source)
    if not isinstance(spec.get("force", False), bool):
        raise ConfigError(f"{source}: {where}.force must be true or false")
    s = spec.get("source")
    if s is None or isinstance(s, str):
        return
    if not isinstance(s, dict) or s.get("kind") not in ("zero", "model_token"):
        raise ConfigError(f"{source}: {where}.source must be a model path, {{kind: zero}} or {{kind: model_token, "
                          "model: PATH, token: TEXT | token_id: N}}")
    if s["kind"] == "model_token":
        refuse_unknown(s, ("kind", "model", "token", "token_id"), f"{where}.source", source)
        if not isinstance(s.get("model"), str) or (("token" in s) == ("token_id" in s)):
            raise ConfigError(f"{source}: {where}.source needs model and exactly one of token or token_id")


def _chat_template(t: Any, source: str) -> str | None:
    if t is None:
        return None
    if not isinstance(t, str):
        raise ConfigError(f"{source}: chat_template must be auto, chatml or a Jinja template string")
    if t in CHAT_TEMPLATE_NAMES or ("{" in t and len(t) >= 20):  # mergekit's test for an inline template
        return t
    if t in ("alpaca", "llama3", "mistral", "exaone"):
        raise ConfigError(f"{source}: chat_template {t!r} is one of mergekit's bundled templates, which slimtune "
                          "does not ship; paste the Jinja text, or use auto or chatml")
    raise ConfigError(f"{source}: chat_template {t!r} is not a template; use auto, chatml or a Jinja string")


def parse_config(d: Any, source: str = "merge config") -> MergeConfig:
    """Check a loaded mergekit YAML document and return a `MergeConfig`.

    Raises:
        ConfigError: an unknown key (naming the closest valid one), an unknown method, a missing weight or t, a
            value out of range, slices of unequal length, a bad tokenizer or chat_template setting.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping with merge_method and models")
    if "modules" in d:
        raise ConfigError(f"{source}: modules: (multi-module models) is not supported; write models: or slices:")
    refuse_unknown(d, TOP_KEYS, "the top level", source)
    name = d.get("merge_method")
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), list(METHODS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"supported: {', '.join(METHODS)}"
        raise ConfigError(f"{source}: merge_method {name!r} is not supported; {hint}")
    method = METHODS[name]
    glob, per = method.shared, method.per_model
    base = d.get("base_model")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{source}: base_model must be a path")
    if method.base == "required" and base is None:
        raise ConfigError(f"{source}: {name} needs a base_model (the model the deltas are taken from)")
    slices: list[SliceDef] = []
    if d.get("slices") is not None:
        if d.get("models") is not None:
            raise ConfigError(f"{source}: give either models or slices, not both")
        slices = _slices(d["slices"], source, per, glob)
        models: list[ModelEntry] = []
        for s in slices:
            models += [e for e in s.sources if all(e.model != m.model for m in models)]
    else:
        entries = d.get("models")
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{source}: models must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
        models = [_entry(e, f"models[{i}]", source, per, glob, False) for i, e in enumerate(entries)]
    params = check_params(d.get("parameters"), {**glob, **per}, "parameters", source, {})
    cfg = MergeConfig(name, models, base, params, d.get("dtype"), d.get("out_dtype"), source, [], slices,
                      _tokenizer(d, base, source), _chat_template(d.get("chat_template"), source))
    everywhere = [params] + [s.parameters for s in slices] + [e.parameters for s in cfg.out_slices()
                                                               for e in s.sources]
    if any("int8_mask" in p for p in everywhere):
        cfg.notes.append("int8_mask ignored: sign masks are boolean here")
    if name == "task_arithmetic" and any("density" in p for p in everywhere):
        cfg.notes.append("density has no effect with task_arithmetic (as in mergekit); use ties or dare_linear to "
                         "sparsify")
    _check_inputs(cfg)
    return cfg


def _check_inputs(cfg: MergeConfig) -> None:
    """Per slice: the number of models the method merges, the base present, every required parameter given."""
    m, src = cfg.method, cfg.source
    for s, sl in enumerate(cfg.out_slices()):
        label = (lambda j: f"models[{j}]") if not cfg.slices else (lambda j, s=s: f"slices[{s}].sources[{j}]")
        for k, default in m.shared.items():
            if default is REQUIRED and k not in cfg.parameters and k not in sl.parameters:
                raise ConfigError(f"{src}: {cfg.merge_method} needs parameters: {{{k}: ...}}")
        has_base = any(cfg.is_base(e) for e in sl.sources)
        others = [j for j, e in enumerate(sl.sources) if not (m.base != "ignored" and cfg.is_base(e))]
        where = "" if not cfg.slices else f" in slices[{s}]"
        if m.base == "required" and not has_base:
            raise ConfigError(f"{src}: base_model {cfg.base_model} is not among the sources{where}; {cfg.merge_method}"
                              " takes its deltas from it, so list it in every slice")
        need = {"slerp": (1, 1, "slerp merges the base_model with exactly one other model"),
                "nuslerp": (2, 2, "nuslerp merges exactly two models (besides an optional base_model)"),
                "model_stock": (2, None, "model_stock needs at least two models besides the base_model"),
                "passthrough": (1, 1, "passthrough takes exactly one model per slice (and no other base_model)")}
        lo, hi, msg = need.get(m.family, (1, None, "no models to merge besides the base_model"))
        n = len(others) if m.family != "passthrough" else len(sl.sources)
        if n < lo or (hi is not None and n > hi):
            raise ConfigError(f"{src}: {msg}; got {n}{where}")
        for k, default in m.per_model.items():
            if default is not REQUIRED or k in cfg.parameters or k in sl.parameters:
                continue
            missing = [j for j in others if k not in sl.sources[j].parameters]
            if missing:
                j = missing[0]
                raise ConfigError(f"{src}: {len(others) - len(missing)} {k}s for {len(others)} models: "
                                  f"{label(j)} ({sl.sources[j].model}) has no {k}; give each model "
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
