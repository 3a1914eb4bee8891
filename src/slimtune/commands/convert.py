"""`slimtune convert`: re-save a checkpoint in another dtype or shard size, through the precision guard."""
from __future__ import annotations

import argparse
import json

HELP = "re-save a Hugging Face checkpoint in another dtype / shard size (refuses casts that overflow)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder (or 'builtin')")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--dtype", default="auto", help="bf16, fp16, fp32 or auto (keep)")
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
    p.add_argument("--force", action="store_true", help="cast even if the precision guard refuses")
    p.add_argument("--trust-pickle", action="store_true",
                   help="UNSAFE: read a pytorch_model*.bin (pickle) folder, new or legacy format, and write it as "
                        "safetensors. Loading a pickle from an untrusted source can run code: torch's weights-only "
                        "unpickler limits what is built, but it has had escapes; use only for files you trust")
    p.add_argument("--json", action="store_true")


def parse_size(s: str, flag: str = "--max-shard-size") -> int:
    """'5GB', '500MB', '24GiB', '1000' -> bytes.

    Raises:
        ConfigError: not a size, or not a positive finite one (naming the flag).
    """
    import math

    from slimtune.errors import ConfigError

    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = s.strip().upper()
    n = None
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            try:
                n = float(t[:-len(u)]) * units[u]
            except ValueError:
                pass
            break
    if n is None and t.isdigit():
        n = float(t)
    if n is None:
        raise ConfigError(f"{flag} {s!r} is not a size; write e.g. 5GB, 500MB or 24GiB")
    if not math.isfinite(n) or n < 1:
        raise ConfigError(f"{flag} {s!r} must be a positive size, e.g. 5GB")
    return int(n)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from slimtune.models.load import load_model
    from slimtune.models.save import save_model
    from slimtune.models.tiny import BUILTIN_NAMES, builtin_tokenizer

    # load in the checkpoint's own dtype; the cast happens (guarded) while saving
    size = parse_size(args.max_shard_size)
    model, cfg = load_model(args.model, trust_pickle=args.trust_pickle)
    builtin = str(args.model) in BUILTIN_NAMES
    out = save_model(model, args.out, dtype=None if args.dtype == "auto" else args.dtype,
                     max_shard_size=size, force=args.force,
                     tokenizer=builtin_tokenizer() if builtin else None,
                     tokenizer_dir=None if builtin else Path(args.model))
    files = sorted(p.name for p in Path(out).iterdir())
    if args.json:
        print(json.dumps({"out": str(out), "files": files}))
    else:
        print(f"wrote {out}: {', '.join(files)}")
    return 0
