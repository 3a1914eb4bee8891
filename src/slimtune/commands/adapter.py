"""`slimtune merge-adapter`: fold a PEFT-format LoRA / DoRA adapter into its base model and save a plain Hugging Face
checkpoint (loadable by transformers and vLLM without PEFT). A QLoRA adapter (`--qlora`, or detected) is merged into
the dequantized quantized base instead (`slimtune.quant.qlora`), and the logit difference is reported."""
from __future__ import annotations

import argparse
import json

HELP = "merge a LoRA / DoRA adapter folder into its base model and save a Hugging Face checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model folder (or 'builtin')")
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--dtype", default="auto", help="dtype of the saved weights: bf16, fp16, fp32 or auto (the base's)")
    p.add_argument("--force", action="store_true", help="cast even if the precision guard refuses")
    p.add_argument("--qlora", action="store_true",
                   help="the adapter was trained on a quantized base (QLoRA): merge into the DEQUANTIZED base and "
                        "report the logit difference (auto-detected from the adapter / its training config)")
    p.add_argument("--quant", help="with --qlora: the base format it trained on (default: detected, else nf4)")
    p.add_argument("--device", default="cpu", help="with --qlora: where to load, merge and check (cpu, cuda)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from slimtune.io.hub import resolve
    from slimtune.models.config import read_config_json
    from slimtune.models.load import load_model
    from slimtune.models.save import save_model
    from slimtune.models.tiny import BUILTIN_NAMES, builtin_tokenizer
    from slimtune.peft import load_adapter, merge_and_unload
    from slimtune.precision.formats import declared_float
    from slimtune.quant.qlora import detect_quant, merge_qlora

    if args.qlora or args.quant or detect_quant(args.adapter):
        from slimtune.train.build import pick_device

        rep = merge_qlora(args.model, args.adapter, args.out, dtype="bf16" if args.dtype == "auto" else args.dtype,
                          quant=args.quant, device=pick_device(args.device))
        if args.json:
            print(json.dumps(rep.to_dict()))
        else:
            print(f"merged QLoRA adapter {args.adapter} ({rep.quant} base, {rep.layers} layers) -> {rep.out} "
                  f"({rep.dtype})")
            print(f"note: {rep.note}")
            print(f"max |logit diff| vs the unmerged QLoRA model on a fixed probe batch: {rep.max_abs_logit_diff:.4g} "
                  f"(max |logit| {rep.max_abs_logit:.4g})")
        return 0
    # merge in fp32 (adapters are fp32), then save in the base's dtype unless told otherwise
    model, cfg = load_model(args.model, dtype=torch.float32)
    load_adapter(model, args.adapter)
    merge_and_unload(model)
    dtype = args.dtype
    if dtype == "auto":  # the float dtype config.json declares (load_model was told fp32)
        hf = getattr(cfg, "hf", None)
        if hf is None:  # a transformers model (the fallback): its folder's config.json
            hf = read_config_json(resolve(args.model) / "config.json")
        declared = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        dtype = declared_float(declared)
    builtin = str(args.model) in BUILTIN_NAMES
    out = save_model(model, args.out, dtype=dtype, force=args.force,
                     tokenizer=builtin_tokenizer() if builtin else None,
                     tokenizer_dir=None if builtin else Path(args.model))
    if args.json:
        print(json.dumps({"out": str(out), "dtype": str(dtype)[6:]}))
    else:
        print(f"merged {args.adapter} into {args.model} -> {out}")
    return 0
