"""`slimtune merge-adapter`: fold a PEFT-format LoRA / DoRA adapter into its base model and save a plain Hugging Face
checkpoint (loadable by transformers and vLLM without PEFT)."""
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
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from slimtune.checkpoint import load_model, save_model
    from slimtune.models.tiny import BUILTIN_NAMES, builtin_tokenizer
    from slimtune.peft import load_adapter, merge_and_unload

    # merge in fp32 (adapters are fp32), then save in the base's dtype unless told otherwise
    model, cfg = load_model(args.model, dtype=torch.float32)
    load_adapter(model, args.adapter)
    merge_and_unload(model)
    dtype = args.dtype
    if dtype == "auto":  # the dtype config.json declares (load_model was told fp32)
        declared = (cfg.hf or {}).get("dtype") or (cfg.hf or {}).get("torch_dtype") or "float32"
        dtype = getattr(torch, str(declared), torch.float32)
    builtin = str(args.model) in BUILTIN_NAMES
    out = save_model(model, args.out, dtype=dtype, force=args.force,
                     tokenizer=builtin_tokenizer() if builtin else None,
                     tokenizer_dir=None if builtin else Path(args.model))
    if args.json:
        print(json.dumps({"out": str(out), "dtype": str(dtype)[6:]}))
    else:
        print(f"merged {args.adapter} into {args.model} -> {out}")
    return 0
