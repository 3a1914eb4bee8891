"""`slimtune quickstart`: the whole job in one command, offline, on the CPU, in well under two minutes: LoRA
fine-tuning of the built-in tiny model on the bundled Alpaca sample, validation loss before and after, the adapter
(PEFT format), metrics, loss plot and one generated answer, then the command that does the same on real model and data.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "fine-tune the built-in tiny model with LoRA on bundled data (offline, CPU, under a minute) to see the workflow"
PROMPT = "Give three tips for staying healthy."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    p.add_argument("--out", default="quickstart-out", help="output folder (default ./quickstart-out)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--json", action="store_true", help="print one JSON summary object instead of the story")


def quickstart_overrides(steps: int, out: str, device: str) -> list[str]:
    """The `slimtune finetune` keys the quickstart runs with (also printed, so it can be rerun by hand)."""
    from slimtune.data import sample_path

    return [f"data={sample_path()}", "model=builtin", "method=lora", "rank=16", "alpha=32", "targets=all-linear",
            "val_fraction=0.05", "max_length=192", "batch_size=4", "lr=3e-3", "warmup_steps=5",
            f"max_steps={steps}", f"out_dir={out}", f"device={device}", "precision=auto"]


def run(args: argparse.Namespace) -> int:
    from slimtune.generate import SamplingConfig, generate_text
    from slimtune.train.config import load_config
    from slimtune.train.loop import train

    say = (lambda s: None) if args.json else print
    cfg = load_config(None, quickstart_overrides(args.steps, args.out, args.device))
    cfg.progress = not args.json
    say("slimtune quickstart: LoRA fine-tuning of the BUILT-IN TINY MODEL (3.1M parameters, random initial weights, "
        "byte-level tokenizer) on 1,000 bundled Alpaca examples. It is a toy that shows the whole workflow offline "
        "in under a minute on two cores; its answers will be gibberish-like. Nothing is downloaded.")
    s = train(cfg, log=say)
    model, tok = s.pop("model"), s.pop("tokenizer")
    model.eval()
    sc = SamplingConfig(max_new_tokens=80, temperature=0.8, top_k=8, seed=0)  # top-k: no stray bytes
    res = generate_text(model, tok, [PROMPT], sc, chat=True)
    answer = res["outputs"][0]
    out = Path(cfg.out_dir)
    sample = out / "sample_answer.txt"
    sample.write_text(f"prompt: {PROMPT}\nanswer: {answer}\n")
    before = s["val_before"]["val_loss"] if s["val_before"] else None
    after = s["val_after"]["val_loss"] if s["val_after"] else None
    if args.json:
        s.update(sample_answer=answer, sample=str(sample))
        print(json.dumps(s))
        return 0
    print()
    print(f"validation loss: {before:.4f} before -> {after:.4f} after {s['steps']} steps "
          f"({s['tokens_per_s']:,.0f} tokens/s on {s['device']})")
    print(f"sample answer to {PROMPT!r}: {answer!r}")
    print(f"outputs in {out}/: adapter/ (PEFT format), metrics.jsonl, loss.png, sample_answer.txt, config.yaml, "
          "checkpoints/")
    print()
    print("Now the same on your own model and data (a Hugging Face model folder or hub id; JSON/JSONL/Parquet "
          "records in alpaca, chat-messages or text format):")
    print("  slimtune finetune configs/lora.yaml model=meta-llama/Llama-3.1-8B data=my.jsonl")
    return 0
