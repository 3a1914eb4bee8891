"""`slimtune merge CONFIG.yaml OUT_DIR`: merge checkpoints or LoRA adapters as a mergekit-style config says."""
from __future__ import annotations

import argparse
import json
import sys

HELP = "merge models or LoRA adapters (linear, task_arithmetic, ties, dare_*, slerp) from a mergekit YAML config"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="merge config in mergekit's YAML format (merge_method, base_model, models, ...)")
    p.add_argument("out", help="output folder (written atomically; replaced if it exists, never an input folder)")
    p.add_argument("--seed", type=int, default=0, help="DARE's random seed (default 0)")
    p.add_argument("--shard-size", default="5GB", help="safetensors shard size, e.g. 5GB, 500MB")
    p.add_argument("--adapter-rank", type=int, default=None,
                   help="write the merge of LoRA adapters back as one LoRA adapter of this rank (by SVD)")
    p.add_argument("--json", action="store_true", help="print one JSON object, no progress bar")


def run(args: argparse.Namespace) -> int:
    from slimtune.commands.convert import parse_size
    from slimtune.merge import load_config, merge

    from slimtune.errors import ConfigError

    size = parse_size(args.shard_size, "--shard-size")
    if args.adapter_rank is not None and args.adapter_rank < 1:
        raise ConfigError(f"--adapter-rank must be at least 1, got {args.adapter_rank}")
    cfg = load_config(args.config)
    r = merge(cfg, args.out, seed=args.seed, shard_size=size, adapter_rank=args.adapter_rank,
              progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(r))
    else:
        for n in r["notes"]:
            print(f"note: {n}", file=sys.stderr)
        print(f"merged {r['models']} models ({r['method']}) into {r['out']}: {r['tensors']} tensors, "
              f"{r['bytes'] / 1e9:.2f} GB in {r['seconds']} s")
    return 0
