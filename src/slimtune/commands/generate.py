"""`slimtune generate`: load a model (a Hugging Face folder, or the built-in tiny one) and generate, streaming."""
from __future__ import annotations

import argparse
import json
import sys

HELP = "generate text from a model folder or the built-in tiny model, with a KV cache"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin", help="model folder, hub id, or 'builtin' (default)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch (left-padded)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bf16, fp16 or fp32")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--adapter", help="a PEFT-format adapter folder to apply")
    p.add_argument("--force", action="store_true", help="cast even if the precision guard refuses")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")


def run(args: argparse.Namespace) -> int:
    import torch

    from slimtune.models.load import load_model
    from slimtune.models.tokenizer import load_tokenizer
    from slimtune.generate import SamplingConfig, generate_text
    from slimtune.models.tiny import BUILTIN_NAMES

    from slimtune.train.build import pick_device

    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    prompts = args.prompt or (["Give three tips for staying healthy."])
    sc = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop_strings=args.stop,
                        seed=args.seed)
    sc.validate()  # the flags, before the model loads
    model, cfg = load_model(args.model, dtype=args.dtype, device=device, force=args.force)
    if args.adapter:
        from slimtune.peft import load_adapter

        load_adapter(model, args.adapter)
    tok = load_tokenizer(args.model)
    builtin = str(args.model) in BUILTIN_NAMES
    if args.json:
        res = generate_text(model, tok, prompts, sc, chat=args.chat, system=args.system)
        print(json.dumps({"model": str(args.model), "prompts": prompts, **res}))
        return 0
    if builtin:
        print("(the built-in model is tiny and has random weights: expect noise; pass --model DIR for a real one)",
              file=sys.stderr)
    print(prompts[0], end="" if not args.chat else "\n", flush=True)

    def stream(piece: str) -> None:
        print(piece, end="", flush=True)

    res = generate_text(model, tok, prompts, sc, chat=args.chat, system=args.system, stream=stream)
    print()
    for p, o in list(zip(prompts, res["outputs"]))[1:]:
        print(f"--- {p}\n{o}")
    print(f"[{res['new_tokens']} tokens in {res['seconds']:.2f} s, {res['tokens_per_s']:.1f} tokens/s]",
          file=sys.stderr)
    return 0
