"""`slimtune formats`: the numeric formats table (bits, layout, range, precision), computed from the bit layouts."""
from __future__ import annotations

import argparse
import json

HELP = "show the numeric formats (fp32 ... ternary): bits, layout, range, epsilon, decimal digits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _g(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def run(args: argparse.Namespace) -> int:
    from slimtune.precision.formats import FORMATS

    if args.json:
        print(json.dumps({"formats": [f.as_dict() for f in FORMATS.values()]}))
        return 0
    print(f"{'format':<10}{'bits':>6}{'s/e/m':>9}{'max':>12}{'min normal':>12}{'min subnorm':>13}{'eps':>11}"
          f"{'digits':>8}  note")
    for f in FORMATS.values():
        layout = f"{f.sign}/{f.exponent}/{f.mantissa}" if f.kind == "float" else f.kind
        bits = f"{f.bits:.2f}" if f.bits != int(f.bits) else str(int(f.bits))
        print(f"{f.name:<10}{bits:>6}{layout:>9}{_g(f.max):>12}{_g(f.min_normal):>12}{_g(f.min_subnormal):>13}"
              f"{_g(f.eps):>11}{f.decimal_digits:>8.2f}  {f.note}")
    return 0
