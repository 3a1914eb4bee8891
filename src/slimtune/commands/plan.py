"""`slimtune plan`: for a GPU memory budget, what each method fits (batch, sequence, checkpointing, offloading)."""
from __future__ import annotations

import argparse
import json

from slimtune.commands.memory import add_model_arguments, gib, resolve_config

HELP = "recommend the fastest fine-tuning setting that fits a GPU memory budget"
CKPT_NAMES = {False: "no", True: "yes", "offload": "offload"}  # grad_ckpt values as the table shows them


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--gpu-memory", required=True, help="the budget, e.g. 24GiB or 80GB")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the longest that fits)")
    p.add_argument("--methods", default="full,lora,qlora")
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--gpus", type=int, default=1, help="FSDP2 over N GPUs: the budget is each GPU's")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from slimtune.memory.plan import parse_size, plan

    budget = parse_size(args.gpu_memory)
    cfg = resolve_config(args)
    rows = plan(cfg, budget, args.seq, tuple(args.methods.split(",")), args.precision, args.optimizer, gpus=args.gpus)
    if args.json:
        print(json.dumps({"gpu_memory_bytes": budget, "rows": rows}))
        return 0
    print(f"budget {gib(budget)}; * = fastest that fits (speed model: slimtune.memory.plan); 'N blk': checkpoint "
          "only the first N blocks (train key ckpt_blocks=N)")
    print(f"  {'method':<7}{'ckpt':<8}{'offload':<13}{'seq':>6}{'batch':>7}{'max seq':>9}{'peak':>12}{'tok/s':>9}")
    for r in rows:
        ck = CKPT_NAMES[r["grad_ckpt"]] if r.get("ckpt_blocks") is None else f"{r['ckpt_blocks']} blk"  # partial
        head = f"{'*' if r['fastest'] else ' '} {r['method']:<7}{ck:<8}" \
               f"{r['offload'] or '-':<13}{r['seq']:>6}"
        if r["fits"]:
            print(f"{head}{r['max_batch']:>7}{r['max_seq_at_batch1']:>9}{gib(r['peak_bytes']):>12}"
                  f"{r['tokens_per_s']:>9.0f}")
        else:
            print(f"{head}   does not fit: {r['reason']}")
    return 0
