"""`slimtune shapes`: the named model shapes, with their parameter counts (built on the meta device)."""
from __future__ import annotations

import argparse
import json

HELP = "list the named model shapes and their parameter counts"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="one shape to show in full")
    p.add_argument("--json", action="store_true")


def human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def run(args: argparse.Namespace) -> int:
    from slimtune.models.shapes import SHAPES, build_meta, get_shape

    names = [args.name] if args.name else list(SHAPES)
    rows = []
    for n in names:
        cfg = get_shape(n)
        params = sum(p.numel() for p in build_meta(cfg).parameters())
        rows.append({"name": n, "model_type": cfg.model_type, "layers": cfg.num_hidden_layers,
                     "hidden": cfg.hidden_size, "ffn": cfg.intermediate_size, "heads": cfg.num_attention_heads,
                     "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size, "params": params})
    if args.json:
        print(json.dumps({"shapes": rows}))
        return 0
    print(f"{'name':<14}{'type':<8}{'layers':>7}{'hidden':>8}{'ffn':>8}{'heads':>7}{'kv':>4}{'vocab':>8}{'params':>10}")
    for r in rows:
        print(f"{r['name']:<14}{r['model_type']:<8}{r['layers']:>7}{r['hidden']:>8}{r['ffn']:>8}{r['heads']:>7}"
              f"{r['kv_heads']:>4}{r['vocab']:>8}{human(r['params']):>10}")
    return 0
