"""The `slimtune` console command: one subcommand per module, each with `add_arguments(parser)` and `run(args)`.

Every subcommand that reports numbers takes `--json` and then prints exactly one JSON object. A `SlimtuneError`, an
error of the operating system (disk full, permission denied) and a usage error each become one line on stderr and exit
code 2 (the full help only with --help).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

# under torchrun, a process that does not report an error waits this long before it exits (`main`)
SILENT_RANK_GRACE_S = 5.0
# subcommand name -> module holding `HELP`, `add_arguments(p)` and `run(args) -> int | None`
COMMANDS: dict[str, str] = {
    "quickstart": "slimtune.commands.quickstart",
    "finetune": "slimtune.commands.finetune",
    "generate": "slimtune.commands.generate",
    "shapes": "slimtune.commands.shapes",
    "convert": "slimtune.commands.convert",
    "formats": "slimtune.commands.formats",
    "params": "slimtune.commands.params",
    "merge": "slimtune.commands.merge",
    "merge-adapter": "slimtune.commands.adapter",
    "memory": "slimtune.commands.memory",
    "plan": "slimtune.commands.plan",
    "quantize": "slimtune.commands.quantize",
    "serve": "slimtune.commands.serve",
}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage block first); subcommand parsers
    are made of this class too."""

    def error(self, message: str):
        line = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {line}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="slimtune", description="Fine-tune LLMs on the GPU you have.")
    from slimtune import __version__
    parser.add_argument("--version", action="version", version=f"slimtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in COMMANDS.items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _extra=getattr(mod, "EXTRA_POSITIONALS", None))
    return parser


def main(argv: list[str] | None = None) -> int:
    from slimtune.errors import SlimtuneError, StorageError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # positionals after a flag (`finetune cfg.yaml --json lr=1e-4`) join the command's list that takes them
    stray = [a for a in extra if a.startswith("-") or not getattr(args, "_extra", None)]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        getattr(args, args._extra).extend(extra)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        code = args._run(args)
    except SlimtuneError as e:
        # under torchrun every process raises it: rank 0 prints it, or the rank that `train.distributed.agreed` names
        if getattr(e, "report", os.environ.get("RANK", "0") == "0"):
            print(f"slimtune {args.command}: error: {e}", file=sys.stderr)
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # torchrun stops the whole job at the first process that exits: a silent one waits, so that the line of
            # the reporting process (raising the same error about now) gets out first
            time.sleep(SILENT_RANK_GRACE_S)
        return 2
    except OSError as e:  # the disk or the permissions, not a bug: one line naming the path
        print(f"slimtune {args.command}: error: {StorageError.from_os(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slimtune {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
