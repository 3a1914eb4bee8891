"""`slimtune finetune CONFIG.yaml [key=value ...]`: run a fine-tuning described by one flat YAML config, with
command-line overrides; the effective config, metrics, loss plot, checkpoints and the result land in out_dir.
Started by torchrun (or with `--nproc-per-node N`), each process runs its FSDP2 shard (`slimtune.train.dist_run`)."""
from __future__ import annotations

import argparse
import json

HELP = "fine-tune a model: slimtune finetune CONFIG.yaml [key=value ...] (keys: see configs/*.yaml)"
EXTRA_POSITIONALS = "overrides"  # key=value items may also follow the flags (`cfg.yaml --json lr=1e-4`)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="a YAML config (see configs/); may be left out when every key is given "
                                             "as key=value")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override a config key, e.g. lr=1e-4 targets=[q_proj,v_proj] resume=latest; also the "
                        "torchtune / axolotl / transformers names (learning_rate=, lora_r=) and dotted keys "
                        "(optimizer.lr=, lora.r=); anywhere on the line")
    p.add_argument("--config", dest="config_file", metavar="FILE", help="the YAML config, as a flag (torchtune's "
                                                                        "spelling)")
    p.add_argument("--json", action="store_true", help="print one JSON summary object at the end")
    p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="run on N processes of this machine with FSDP2 (one per GPU; gloo on the CPU), as torchrun "
                        "--standalone --nproc-per-node N would")


def run(args: argparse.Namespace) -> int:
    from slimtune.errors import ConfigError
    from slimtune.train.config import load_config
    from slimtune.train.distributed import check_distributed, torchrun_env
    from slimtune.train.loop import train

    overrides = list(args.overrides)
    path = args.config
    if path is not None and "=" in path and not path.endswith((".yaml", ".yml")):
        path, overrides = None, [path] + overrides  # no file: everything on the command line
    if args.config_file is not None:
        if path is not None:
            raise ConfigError(f"two config files ({path} and --config {args.config_file}); fix: give one")
        path = args.config_file
    cfg = load_config(path, overrides)
    env = torchrun_env()
    if args.nproc_per_node is not None:
        if env is not None:
            raise ConfigError("--nproc-per-node is for a plain start; under torchrun the processes already run")
        if args.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
        check_distributed(cfg, args.nproc_per_node, args.nproc_per_node)  # one line here, before any worker starts
        from slimtune.train.launch import launch

        return launch(args.nproc_per_node, ["finetune", *([path] if path else []), *overrides,
                                            *(["--json"] if args.json else [])])
    log = (lambda s: None) if args.json else print
    if args.json:
        cfg.progress = False
    if env is not None:
        from slimtune.train.dist_run import train_distributed

        summary = train_distributed(cfg, log=log)
    else:
        summary = train(cfg, log=log)
    summary.pop("model", None)
    summary.pop("tokenizer", None)
    if args.json and (env is None or env.main):
        print(json.dumps(summary))
    return 130 if summary["interrupted"] else 0
