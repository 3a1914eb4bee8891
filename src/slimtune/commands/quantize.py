"""`slimtune quantize`: post-training quantization of a checkpoint (int8, int4, nf4, fp4, fp8, w8a8, or a mixed
int2/3/4/8 budget with --bits), with size, weight error and perplexity before / after; the output folder loads with
`slimtune generate --model DIR`."""
from __future__ import annotations

import argparse
import json

HELP = "quantize a model (int8|int4|nf4|fp4|fp8|w8a8, or --bits B for a mixed budget) and report size / error / ppl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder, hub id, or 'builtin'")
    p.add_argument("--format", help="int8, int4, nf4, fp4, fp8 or w8a8 (weight-only but w8a8)")
    p.add_argument("--group", type=int, help="group / block size of int4, nf4, fp4 and of --bits layers (default 64)")
    p.add_argument("--bits", type=float, help="mixed budget: average code bits per weight (2..8), layers get 2, 3, 4 "
                                              "or 8 bits by their measured sensitivity")
    p.add_argument("--adapter", help="a qat / bitnet training result (adapter folder): convert the trained layers to "
                                     "their real quantized format instead of quantizing after training")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--eval", help="text or instruction file for perplexity and calibration (default: the bundled "
                                  "Alpaca sample)")
    p.add_argument("--eval-limit", type=int, default=200, help="records read from the eval file (default 200)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per evaluation row (default 256)")
    p.add_argument("--calib-rows", type=int, default=8, help="rows of calibration data for --bits sensitivities")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity measurement")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def run(args: argparse.Namespace) -> int:
    from slimtune.quant.ptq import quantize_checkpoint
    from slimtune.train.build import pick_device

    args.device = pick_device(args.device)
    if args.adapter:
        return _export_trained(args)
    rep = quantize_checkpoint(args.model, args.out, args.format, args.group, args.bits, args.eval, args.eval_limit,
                              args.max_length, not args.no_eval, args.device,
                              calib_rows=args.calib_rows)
    if args.json:
        print(json.dumps(rep))
        return 0
    print(f"quantized {rep['layers']} linear layers of {rep['model']} to {rep['format']} -> {rep['out']} "
          f"({rep['seconds']:.1f} s)")
    print(f"size: {_mib(rep['bytes_before'])} -> {_mib(rep['bytes_after'])} "
          f"({rep['bytes_before'] / rep['bytes_after']:.2f}x smaller)")
    print(f"bits per quantized weight: {rep['bits_codes']:.3f} codes + {rep['bits_overhead']:.3f} scales/zeros")
    print(f"weight relative error ||W - Q(W)|| / ||W||: {rep['weight_rel_error']:.4f} overall, "
          f"{rep['max_layer_rel_error']:.4f} worst layer")
    if "ppl_before" in rep:
        print(f"perplexity on {rep['eval_rows']} held-out rows: {rep['ppl_before']:.3f} -> {rep['ppl_after']:.3f} "
              f"({rep['ppl_change']:+.3f})")
    if "allocation" in rep:
        print(f"mixed budget {rep['bits_target']:g} bits: achieved {rep['bits_codes']:.4f} "
              f"({'exact' if rep['exact'] else 'closest below: exact is not reachable with these layer sizes'})")
        print(f"{'layer':<40} {'params':>10} {'bits':>4} {'d loss @2':>10} {'@3':>9} {'@4':>9} {'@8':>9} {'rel err':>8}")
        for r in rep["allocation"]:
            s = r["sensitivity"]
            print(f"{r['layer']:<40} {r['params']:>10,} {r['bits']:>4} {s['2']:>10.4f} {s['3']:>9.4f} {s['4']:>9.4f} "
                  f"{s['8']:>9.5f} {r['rel_error']:>8.4f}")
    for o in rep["outliers"]:
        print(f"warning: {o}")
    return 0


def _export_trained(args: argparse.Namespace) -> int:
    """MODEL + a qat / bitnet adapter -> a quantized checkpoint with the formats the layers trained for."""
    from slimtune.models.fallback import require_decoder
    from slimtune.models.load import load_model
    from slimtune.models.tokenizer import load_tokenizer
    from slimtune.errors import ConfigError
    from slimtune.peft import load_adapter, model_adapters
    from slimtune.peft.qat import export_quantized

    if args.format or args.bits:
        raise ConfigError("quantize --adapter: the format is the one the adapter trained for; drop --format / --bits")
    model, _ = load_model(args.model, device=args.device)
    require_decoder(model, "quantize --adapter")
    name = load_adapter(model, args.adapter)
    method = model_adapters(model)[name].method
    if method not in ("qat", "bitnet"):
        raise ConfigError(f"quantize --adapter: {args.adapter} is a {method} adapter; only qat / bitnet results "
                          "convert (merge LoRA adapters with slimtune merge-adapter, then quantize)")
    out = export_quantized(model, args.out, tokenizer=load_tokenizer(args.model))
    fmts = sorted({m.fmt for m in model.modules() if hasattr(m, "fmt")})
    if args.json:
        print(json.dumps({"out": str(out), "method": method, "formats": fmts}))
    else:
        print(f"converted the {method}-trained layers ({', '.join(fmts)}) -> {out}")
    return 0
