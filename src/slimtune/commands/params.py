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

# CLI option -> config field (the same meaning in every method that has the field)
OPTION_FIELDS = {
    "targets": "target_modules", "rank": "r", "alpha": "lora_alpha", "layers": "layers_to_transform",
    "feedforward": "feedforward_modules", "add_bias": "add_bias", "virtual_tokens": "num_virtual_tokens",
    "encoder": "encoder_reparameterization_type", "encoder_hidden": "encoder_hidden_size",
    "projection": "prefix_projection", "modules": "trainable_modules", "last_k": "last_k",
    "skip_first": "skip_first",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", help="a named shape (see `slimtune shapes`), e.g. gpt3-175b, llama3-8b")
    src.add_argument("--model", help="a model folder (only its config.json is read) or builtin")
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHOD_NAMES)}")
    p.add_argument("--targets", help="modules to adapt: comma-separated names / suffixes, a regex, or all-linear")
    p.add_argument("--rank", type=int, help="LoRA / DoRA rank r, Houlsby bottleneck width")
    p.add_argument("--alpha", type=float, help="LoRA alpha")
    p.add_argument("--layers", help="restrict to these block indices, comma-separated")
    p.add_argument("--feedforward", help="IA3: the targets whose input is scaled (default down_proj)")
    p.add_argument("--add-bias", action="store_true", default=None, help="BitFit: add zero biases where none exist")
    p.add_argument("--virtual-tokens", type=int, help="prompt / prefix / ptuning: number of virtual tokens")
    p.add_argument("--encoder", help="ptuning: MLP or LSTM")
    p.add_argument("--encoder-hidden", type=int, help="ptuning / prefix: prompt encoder width")
    p.add_argument("--projection", action="store_true", default=None, help="prefix: MLP reparameterisation")
    p.add_argument("--modules", help="partial: modules to train, comma-separated (e.g. lm_head,norm)")
    p.add_argument("--last-k", type=int, help="partial: train the last k blocks")
    p.add_argument("--skip-first", type=int, help="partial: train everything but the first N blocks")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def method_dict(args: argparse.Namespace) -> dict[str, Any]:
    """{'method': ..., field: value} from the options given.

    Raises:
        ConfigError: unknown method, an option the method does not take, a malformed --layers.
    """
    from slimtune.errors import ConfigError
    from slimtune.peft import get_method

    spec = get_method(args.method)
    fields = spec.config_cls.field_names()
    d: dict[str, Any] = {"method": spec.name}
    for opt, fld in OPTION_FIELDS.items():
        v = getattr(args, opt, None)
        if v is None:
            continue
        if fld not in fields:
            raise ConfigError(f"--{opt.replace('_', '-')} does not apply to method {spec.name}; its options: "
                              f"{', '.join(fields)}")
        if opt in ("targets", "feedforward", "modules"):
            v = v if v == "all-linear" else _split(v)
        elif opt == "layers":
            try:
                v = [int(x) for x in _split(v)]
            except ValueError:
                raise ConfigError(f"--layers takes comma-separated block indices, got {args.layers!r}") from None
        elif opt == "encoder":
            v = v.upper()
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
