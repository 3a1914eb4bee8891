"""`slimtune params`: trainable and total parameters of a fine-tuning method on a model, counted without weights.

The model is built on the meta device from a named shape or a folder's config.json, the method is applied and the
base frozen, exactly as training would; nothing is allocated. E.g. the LoRA paper's GPT-3 175B rows (Hu et al. 2021,
Table 4): `slimtune params --shape gpt3-175b --method lora --targets q_proj,v_proj --rank 8` -> 37.7M.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HELP = "count the trainable and total parameters of a fine-tuning method on a model (meta device, no weights)"

METHOD_NAMES = ("lora", "dora", "ia3", "houlsby", "bitfit", "prompt", "prefix", "ptuning", "partial", "full")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from slimtune.peft.base import declared_options

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", help="a named shape (see `slimtune shapes`), e.g. gpt3-175b, llama3-8b")
    src.add_argument("--model", help="a model folder (only its config.json is read) or builtin")
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHOD_NAMES)}")
    for name, o in declared_options("cli").items():  # each method declares its flags (peft.base.option)
        methods = ", ".join(o.fields)
        if o.type in (bool, bool | None):
            p.add_argument(f"--{name}", action="store_true", default=None, help=f"{o.help} ({methods})")
        else:
            p.add_argument(f"--{name}", help=f"{o.help} ({methods})")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def method_dict(args: argparse.Namespace) -> dict[str, Any]:
    """{'method': ..., field: value} from the options given.

    Raises:
        ConfigError: unknown method, an option the method does not take, a value of the wrong type.
    """
    from slimtune.errors import ConfigError
    from slimtune.peft.base import declared_options, get_method
    from slimtune.train.config import coerce

    spec = get_method(args.method)
    d: dict[str, Any] = {"method": spec.name}
    for name, o in declared_options("cli").items():
        v = getattr(args, name.replace("-", "_"), None)
        if v is None:
            continue
        fld = o.fields.get(spec.name)
        if fld is None:
            raise ConfigError(f"--{name} does not apply to method {spec.name}; its options: "
                              f"{', '.join(spec.config_cls.field_names())}")
        if v != "all-linear":
            try:
                v = coerce(v, o.type)
            except ValueError:
                raise ConfigError(f"--{name} {v!r} is not a {o.type}; e.g. --layers takes comma-separated block "
                                  "indices") from None
        d[fld] = v
    if spec.name in ("lora", "dora") and "r" in d and "lora_alpha" not in d:
        d["lora_alpha"] = d["r"]  # alpha does not change the count; keep the scale 1
    return d


def build(args: argparse.Namespace):
    """The model of --shape / --model on the meta device."""
    from slimtune.models.config import ModelConfig
    from slimtune.models.shapes import build_meta, get_shape
    from slimtune.models.tiny import BUILTIN_NAMES, builtin_config

    if args.shape:
        return build_meta(get_shape(args.shape)), args.shape
    if args.model in BUILTIN_NAMES:
        return build_meta(builtin_config()), args.model
    p = Path(args.model)
    return build_meta(ModelConfig.from_file(p / "config.json" if p.is_dir() else p)), args.model


def human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def run(args: argparse.Namespace) -> int:
    from slimtune.peft import apply_method, freeze_base, method_config_from_dict, trainable_report

    cfg = method_config_from_dict(method_dict(args))
    model, source = build(args)
    apply_method(model, cfg)
    freeze_base(model)
    rep = trainable_report(model, print_line=False)
    out = {"model": source, "method": cfg.method, "trainable": int(rep["trainable"]), "total": int(rep["total"]),
           "percent": rep["percent"]}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{source}, {cfg.method}: trainable {out['trainable']:,} ({human(out['trainable'])}) of "
          f"{out['total']:,} ({human(out['total'])}) = {out['percent']:.4f}%")
    return 0
