"""`slimtune finetune CONFIG.yaml [key=value ...]`: run a fine-tuning described by one flat YAML config, with
command-line overrides; the effective config, metrics, loss plot, checkpoints and the result land in out_dir."""
from __future__ import annotations

import argparse
import json

HELP = "fine-tune a model: slimtune finetune CONFIG.yaml [key=value ...] (keys: see configs/*.yaml)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="a YAML config (see configs/); may be left out when every key is given "
                                             "as key=value")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a config key, e.g. lr=1e-4 "
                                                                       "targets=[q_proj,v_proj] resume=latest")
    p.add_argument("--json", action="store_true", help="print one JSON summary object at the end")


def run(args: argparse.Namespace) -> int:
    from slimtune.train.config import load_config
    from slimtune.train.loop import train

    overrides = list(args.overrides)
    path = args.config
    if path is not None and "=" in path and not path.endswith((".yaml", ".yml")):
        path, overrides = None, [path] + overrides  # no file: everything on the command line
    cfg = load_config(path, overrides)
    log = (lambda s: None) if args.json else print
    if args.json:
        cfg.progress = False
    summary = train(cfg, log=log)
    summary.pop("model", None)
    summary.pop("tokenizer", None)
    if args.json:
        print(json.dumps(summary))
    return 130 if summary["interrupted"] else 0
