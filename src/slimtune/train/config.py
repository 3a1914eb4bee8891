"""`TrainConfig`: the one flat, typed config of a fine-tuning run, read from YAML plus `key=value` overrides.

Every value is checked against its field's type when loaded: an unknown key is refused with the closest valid key,
a wrong type with the key, the value and the expected type (one line each, `ConfigError`). The effective config is
written back as YAML beside the outputs.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimtune.errors import ConfigError
from slimtune.kernels import MODES
from slimtune.models.recompute import CKPT_MODES, MLP_TILE
from slimtune.optim.build import OPTIMIZERS
from slimtune.optim.schedules import SCHEDULES
from slimtune.peft.base import DeclaredOption, declared_options
from slimtune.precision.policy import BASE_DTYPES, PRECISIONS
from slimtune.train.keys import INSTEAD, RUN_ALIASES, alias_map, resolve_key, unknown_key_hint

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
# run keys that must match between a checkpoint and the run resuming from it (else the numerics differ); the method
# options that must match are declared by the methods themselves (`option(..., resume=True)`)
RESUME_KEYS = ("model", "method", "method_args", "quant", "data", "data_format", "template", "train_on_prompt",
               "max_length", "packing", "precision", "base_dtype", "batch_size", "grad_accum", "lr", "min_lr",
               "warmup_steps", "warmup_ratio", "schedule", "weight_decay", "betas", "optimizer", "seed", "from_scratch",
               "galore_rank", "galore_update_interval", "galore_scale", "stochastic_rounding",
               "mlp_tile", "ckpt_blocks")  # (the tiles set where LoRA dropout draws its masks)


@dataclass
class TrainConfig:
    """A fine-tuning run. Method options left at None take the method's own default."""

    # ---- model and method
    model: str = "builtin"  # a Hugging Face folder, a hub id, or 'builtin' (the tiny built-in model)
    from_scratch: bool = False  # pre-training: the model's architecture with fresh random weights (seeded by `seed`)
    tokenizer: str | None = None  # default: the model's
    method: str = "lora"  # lora, dora, qlora, ia3, prefix, prompt, houlsby, bitfit, partial, full, ...
    # the methods' flat options (rank, alpha, dropout, targets, use_dora, use_rslora, num_virtual_tokens, ...: see
    # `slimtune.peft.base.declared_options`) are read and written as plain keys; set ones are held here
    options: dict[str, Any] = field(default_factory=dict)
    method_args: dict[str, Any] = field(default_factory=dict)  # any other option of the method's config, verbatim
    quant: str = "nf4"  # base-weight format for qlora
    # ---- data
    data: str | list[str] = ""  # .json / .jsonl / .parquet file(s), a folder of them, a save_to_disk folder, a hub id
    val_data: str | list[str] | None = None  # a separate validation file, or:
    val_fraction: float = 0.0  # share of the records held out for validation (seeded)
    data_format: str = "auto"  # auto or one of slimtune.data.formats.FORMATS (alpaca, messages, prompt_completion ...)
    template: str = "auto"  # auto, tokenizer, alpaca, chatml
    train_on_prompt: bool = False  # loss on every token instead of only the answers
    max_length: int = 1024  # tokens per example (and per packed row)
    packing: bool = True  # several examples per row, no attention across them
    data_limit: int | None = None  # use only the first N records
    skip_bad: bool = False  # leave malformed records out instead of stopping
    # ---- numerics
    precision: str = "auto"  # auto, fp32, bf16-mixed, fp16-mixed, bf16-true
    base_dtype: str = "auto"  # storage of the frozen weights: auto (16-bit under a 16-bit policy), fp32, bf16, fp16
    grad_ckpt: bool | str = False  # true: recompute each block in backward; offload: also keep the block inputs in
    # pinned host memory until their backward (the longest sequences)
    mlp_tile: int = MLP_TILE  # grad_ckpt: the MLP of longer sequences runs in pieces of this many tokens; 0: off
    ckpt_blocks: int | str | None = None  # grad_ckpt: only the first N blocks (the rest keep activations: faster);
    # None: all; auto: the fewest that fit in 85% of the free GPU memory by the estimator (one process)
    host_embedding: bool = False  # the frozen token embedding table in pinned host memory, looked up on the CPU
    offload_activations: bool = False
    kernels: str | bool = "auto"  # fused GPU kernels: auto (on CUDA) or off (the PyTorch reference path, for debugging)
    chunked_loss: bool = True  # the loss from the hidden states in chunks of tokens: never the (B, T, V) logits
    cuda_graph: str | bool = "auto"  # auto: replay each step as a CUDA graph where the run allows it (train/graphed.py)
    # ---- optimization
    batch_size: int = 4  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int | None = None  # optimizer steps; default: `epochs` passes over the data
    epochs: float = 1.0
    lr: float = 2e-4
    min_lr: float = 0.0  # where the decay ends
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # share of the steps to warm up over, rounded up (transformers'); warmup_steps wins
    schedule: str = "cosine"  # cosine, linear, constant (after warmup)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0  # 0 disables clipping
    optimizer: str = "adamw"  # adamw, adamw8bit, sgd, galore, galore8bit
    offload_optimizer: bool = False
    galore_rank: int = 128  # GaLore: rank of the gradient projection of each block matrix
    galore_update_interval: int = 200  # GaLore: steps between recomputing the projections (an SVD per matrix)
    galore_scale: float = 0.25  # GaLore: the projected step is scaled by this (the paper's alpha)
    stochastic_rounding: bool = False  # bf16-true: round each weight update to bf16 stochastically (unbiased)
    # ---- evaluation, checkpoints, logging
    eval_every: int = 0  # steps; 0: only before and after training
    eval_batches: int | None = None  # cap on validation batches per evaluation
    save_every: int = 0  # steps; 0: only at the end (and on Ctrl-C)
    keep_last: int = 2  # training checkpoints kept
    resume: str | None = None  # 'latest' or a checkpoint folder (out_dir/checkpoints/step-N)
    out_dir: str = "out"
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    fsdp_reshard: bool = True  # torchrun: false keeps each block's gathered weights from forward to backward (faster)
    log_every: int = 1  # steps between metrics lines
    log_tensorboard: bool = False
    progress: bool = True  # tqdm progress bar
    plot: bool = True  # loss-curve PNG at the end
    save_final: bool = True  # the adapter (PEFT format) or the full model at the end

    def validate(self) -> None:
        """Check value ranges and choices; raises ConfigError (one line naming the key and the fix)."""
        for key, value in self.to_dict().items():
            check_finite_numbers(key, value)
        choices = {"precision": PRECISIONS, "schedule": SCHEDULES, "optimizer": OPTIMIZERS,
                   "base_dtype": BASE_DTYPES}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        for key, low in (("batch_size", 1), ("grad_accum", 1), ("max_length", 2), ("log_every", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"{key} must be >= {low}, got {getattr(self, key)}")
        for key in ("warmup_steps", "eval_every", "save_every", "keep_last", "lr", "min_lr", "weight_decay",
                    "max_grad_norm", "mlp_tile"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.ckpt_blocks is not None and (self.ckpt_blocks != "auto" and (isinstance(self.ckpt_blocks, str) or
                                             self.ckpt_blocks < 0) or not self.grad_ckpt):
            raise ConfigError(f"ckpt_blocks={self.ckpt_blocks} needs grad_ckpt=true (or offload) and a count >= 0 or "
                              "auto; fix: set grad_ckpt=true, or leave ckpt_blocks out")
        if self.max_steps is None and self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas needs two numbers in [0, 1), e.g. [0.9, 0.999], got {self.betas}")
        for key in ("data_limit", "eval_batches"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1 (or null for no limit), got {getattr(self, key)}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        # YAML reads a bare off / on as false / true
        self.kernels = {False: "off", True: "on"}.get(self.kernels, self.kernels)
        self.cuda_graph = {False: "off", True: "auto"}.get(self.cuda_graph, self.cuda_graph)
        if self.cuda_graph not in ("auto", "off"):
            raise ConfigError(f"cuda_graph={self.cuda_graph!r} is not one of auto, off")
        if self.kernels not in MODES:
            raise ConfigError(f"kernels={self.kernels!r} is not one of {', '.join(MODES)}")
        if self.grad_ckpt not in CKPT_MODES:
            raise ConfigError(f"grad_ckpt={self.grad_ckpt!r} is not one of true, false, offload")
        if not self.data:
            raise ConfigError("no training data: set data=PATH (a .json, .jsonl or .parquet file, a folder of them, or a "
                              "datasets save_to_disk folder)")
        if self.stochastic_rounding and self.precision != "bf16-true":
            raise ConfigError(f"stochastic_rounding rounds bf16 weights (precision=bf16-true), not {self.precision}; "
                              "fix: set precision=bf16-true or stochastic_rounding=false")
        if self.from_scratch and self.method == "qlora":
            raise ConfigError("from_scratch with method=qlora would quantize random weights; fix: method=full, "
                              "relora or lora")

    def __getattr__(self, name: str) -> Any:
        # a flat method option (cfg.rank, cfg.targets): its value, None when unset
        if name != "options" and name in flat_options():
            return self.options.get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """Every key in YAML order: the run's own fields, with the flat method options (None when unset) in the
        place of `options`."""
        own = dataclasses.asdict(self)
        out: dict[str, Any] = {}
        for k, v in own.items():
            if k == "options":
                out.update({name: v.get(name) for name in flat_options()})
            else:
                out[k] = v
        return out


def check_finite_numbers(key: str, value: Any) -> None:
    """Every float in a config value (lists and mappings included) must be finite, and fit a float32 (where the
    optimizer uses it): YAML reads .nan, .inf and 1e400.

    Raises:
        ConfigError: naming the key and the value.
    """
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if isinstance(v, (dict, list, tuple)):
            check_finite_numbers(key, v)
        elif isinstance(v, float) and not abs(v) <= FLOAT32_MAX:  # NaN fails this too
            raise ConfigError(f"{key}={value!r} is not a finite number (of at most {FLOAT32_MAX:.3g}, what float32 "
                              f"holds); fix: give {key} a finite value")


def flat_options() -> dict[str, DeclaredOption]:
    """The methods' flat run keys (rank, targets, ...), from the methods' declarations."""
    return declared_options("flat")


def resume_keys() -> list[str]:
    """Every key a resumed run must keep: the run's and the methods' (`option(..., resume=True)`)."""
    return [*RESUME_KEYS, *(k for k, o in flat_options().items() if o.resume)]


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "options"}
HINTS = typing.get_type_hints(TrainConfig)


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def coerce(value: Any, tp: Any) -> Any:
    """`value` as type `tp` (int, float, bool, str, list[...], dict[...], unions with None); ValueError if not."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and str in args and "," not in value \
                and any(typing.get_origin(a) is list for a in args):
            return value  # list or str: `targets=all-linear` is the keyword, not ['all-linear']; a comma makes a list
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a)
            except ValueError:
                pass
        raise ValueError(_type_name(tp))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError("bool")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError("int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError("float")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError("str")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # key=a,b,c on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(_type_name(tp))
        return [coerce(v, item) for v in value]
    if origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ValueError(_type_name(tp))
    raise ValueError(_type_name(tp))


def _parse_scalar(text: str) -> Any:
    """A command-line value: YAML syntax ([a, b], {k: v}, true, 3, null), else the plain string."""
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else ""
    except (yaml.YAMLError, RecursionError):
        return text


def _key_tables() -> tuple[list[str], dict[str, str], dict[str, dict[str, str | None]]]:
    """(every run key, alias -> key, method -> {field: its flat key or None}) for `train.keys`."""
    from slimtune.peft.base import load_methods

    flat = flat_options()
    aliases = alias_map(RUN_ALIASES, {k: o.aliases for k, o in flat.items()})
    method_fields: dict[str, dict[str, str | None]] = {}
    for name, spec in load_methods().items():
        method_fields[name] = dict.fromkeys(spec.config_cls.field_names())
        for k, o in flat.items():
            if name in o.fields:
                method_fields[name][o.fields[name]] = k
    return [*FIELDS, *flat], aliases, method_fields


def set_key(cfg: TrainConfig, key: str, value: Any, where: str) -> str:
    """Set `key` (a run key, an alias or a dotted form: `train.keys`) on cfg after checking that it exists and that
    the value has its type.

    Returns:
        the key set: the run key, or 'method_args.FIELD'.
    Raises:
        ConfigError: '<where>: unknown key ..., did you mean ...' or '<where>: key=value is not a <type>'.
    """
    flat = flat_options()
    keys, aliases, method_fields = _key_tables()
    found = resolve_key(key, keys, aliases, method_fields)
    if found is None:
        hint = unknown_key_hint(key, keys, aliases, INSTEAD, method_fields)
        raise ConfigError(f"{where}: unknown key '{key}'{hint}")
    name, field_ = found
    if field_ is not None:  # one field of the method's config, verbatim (the method's from_dict checks it)
        cfg.method_args[field_] = value
        return f"method_args.{field_}"
    key = name
    tp = flat[key].type if key in flat else HINTS[key]
    try:
        v = coerce(value, tp)
    except ValueError:
        raise ConfigError(f"{where}: {key}={value!r} is not a {_type_name(tp)}; fix: give {key} a "
                          f"{_type_name(tp)} value (default: {getattr(TrainConfig(), key)!r})") from None
    if key not in flat:
        setattr(cfg, key, v)
    elif v is None:
        cfg.options.pop(key, None)
    else:
        cfg.options[key] = v
    return key


def _flatten(data: dict[str, Any]) -> list[tuple[str, Any]]:
    """YAML items with a mapping under a section name (`optimizer: {lr: 1e-4}`, `lora: {r: 8}`) as dotted keys, one
    level deep; mappings that are a key's value (`method_args: {...}`) stay whole."""
    def admits_dict(tp: Any) -> bool:
        union = typing.get_origin(tp) in (typing.Union, types.UnionType)
        return any(a is dict or typing.get_origin(a) is dict for a in (typing.get_args(tp) if union else (tp,)))

    out: list[tuple[str, Any]] = []
    for k, v in data.items():
        k = str(k)
        if isinstance(v, dict) and not admits_dict(HINTS.get(k)) and not k.startswith("method_args."):
            out += [(f"{k}.{sub}", sv) for sub, sv in v.items()]  # one level: `lora: {rank_pattern: {...}}` stays
        else:
            out.append((k, v))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Build a `TrainConfig` from a YAML file and `key=value` overrides (applied in order, after the file).

    Args:
        path: a YAML file holding one mapping of keys to values, or None for the defaults.
        overrides: strings `key=value`; values in YAML syntax (`targets=[q_proj,v_proj]`, `lr=1e-4`).
    Returns:
        The validated config.
    Raises:
        ConfigError: a missing or malformed file, an unknown key, a wrong type or an out-of-range value.
    """
    import yaml

    cfg = TrainConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found; fix: pass the path of a YAML file (see configs/)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}:{at} not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
        except (RecursionError, UnicodeDecodeError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else "not UTF-8 text"
            raise ConfigError(f"{p}: {why} to read as a config; fix: one 'key: value' per line") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of key: value lines, got a {type(data).__name__}")
        seen: dict[str, str] = {}
        for k, v in _flatten(data):
            name = set_key(cfg, k, v, str(p))
            if seen.setdefault(name, k) != k:
                raise ConfigError(f"{p}: {name} is set twice, as '{seen[name]}' and as '{k}'; fix: keep one")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"command line: '{item}' is not key=value; fix: write e.g. lr=1e-4")
        k, v = item.split("=", 1)
        set_key(cfg, k.strip(), _parse_scalar(v), "command line")
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{path or 'command line'}: {e}") from None
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the effective config as YAML (every key, in field order)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
