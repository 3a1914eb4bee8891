"""Benchmark: quantize an 8B-shape model's linear weights to NF4 + double quantization, layer by layer, on the GPU.

Random bf16 weights (std 0.02) are drawn on the device one matrix at a time, checked by the precision guard,
quantized to NF4 (block 64, double quant) and the 16-bit matrix freed; the 16-bit embeddings and head stay. Reports
the quantization seconds (guard + quantize, synchronized, weight generation excluded), the packed size against the
16-bit size, the GPU peak memory against packed size + 16-bit embeddings/head (target: within 5%), and the time of
one dequantize pass over all layers to bf16.

    python benchmarks/quant_nf4_8b.py                 # 8B shape, CUDA (the H100 check: < 30 s, peak within 5%)
    python benchmarks/quant_nf4_8b.py --shape tiny    # smoke test, runs on CPU

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from slimtune.precision.guard import scan_weight
from slimtune.quant.linear import QuantLinear

SHAPES = {  # d, layers, ffn, heads, kv heads, vocab
    "8b": (4096, 32, 14336, 32, 8, 128256),
    "tiny": (256, 2, 688, 4, 2, 320),
}


def linear_shapes(d: int, ffn: int, nh: int, nkv: int) -> list[tuple[str, int, int]]:
    """(name, out, in) of one decoder layer's linears (Llama layout)."""
    hd = d // nh
    return [("q_proj", nh * hd, d), ("k_proj", nkv * hd, d), ("v_proj", nkv * hd, d), ("o_proj", d, nh * hd),
            ("gate_proj", ffn, d), ("up_proj", ffn, d), ("down_proj", d, ffn)]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--no-double-quant", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    d, n_layers, ffn, nh, nkv, vocab = SHAPES[args.shape]
    dq = not args.no_double_quant
    g = torch.Generator(device=dev).manual_seed(0)

    # warm-up: CUDA context, kernels and code tables, outside the timing and the memory accounting
    QuantLinear.from_weight(torch.randn(256, 256, device=dev, dtype=torch.bfloat16), None, "nf4", args.block, dq)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0

    embed = torch.randn(vocab, d, device=dev, dtype=torch.bfloat16, generator=g) * 0.02
    head = torch.randn(vocab, d, device=dev, dtype=torch.bfloat16, generator=g) * 0.02
    layers: list[QuantLinear] = []
    quant_s, n_params, t_all = 0.0, 0, time.perf_counter()
    for i in range(n_layers):
        for name, out_f, in_f in linear_shapes(d, ffn, nh, nkv):
            w = torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16, generator=g).mul_(0.02)
            sync(dev)
            t0 = time.perf_counter()
            scan_weight(f"model.layers.{i}.{name}.weight", w, "nf4")
            layers.append(QuantLinear.from_weight(w, None, "nf4", args.block, dq, f"model.layers.{i}.{name}.weight"))
            sync(dev)
            quant_s += time.perf_counter() - t0
            n_params += w.numel()
            del w
    wall_s = time.perf_counter() - t_all

    packed = sum(q.nbytes() for q in layers)
    embed_head = (embed.numel() + head.numel()) * 2
    expected = packed + embed_head
    rec = {"bench": "quant_nf4_8b", "shape": args.shape, "device": str(dev),
           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None, "torch": torch.__version__,
           "block": args.block, "double_quant": dq, "linear_params": n_params, "quantize_s": round(quant_s, 3),
           "wall_s_with_weight_generation": round(wall_s, 3), "packed_bytes": packed,
           "bits_per_param": round(packed * 8 / n_params, 4), "bf16_linear_bytes": n_params * 2,
           "size_ratio_vs_bf16": round(packed / (n_params * 2), 4), "embed_head_bf16_bytes": embed_head,
           "expected_bytes": expected}
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
        resident = torch.cuda.memory_allocated(dev) - base
        rec.update(peak_bytes=peak, resident_bytes=resident, peak_over_expected=round(peak / expected, 4),
                   resident_over_expected=round(resident / expected, 4), peak_within_5pct=peak <= 1.05 * expected)
    rec["under_30s"] = quant_s < 30
    # one dequantize pass over every layer to bf16 (what a QLoRA forward costs on top of the matmuls), timed after
    # the memory figures so its temporaries do not count
    sync(dev)
    t0 = time.perf_counter()
    for q in layers:
        q.dequantize(torch.bfloat16)
    sync(dev)
    rec["dequantize_all_s"] = round(time.perf_counter() - t0, 3)
    rec["dequantize_GBps_out"] = round(n_params * 2 / rec["dequantize_all_s"] / 1e9, 1) if rec["dequantize_all_s"] else None
    print(f"{args.shape}: {n_params / 1e9:.2f}B linear params -> NF4{'+DQ' if dq else ''} in {quant_s:.2f} s; "
          f"{packed / 2**30:.3f} GiB packed vs {n_params * 2 / 2**30:.3f} GiB bf16 "
          f"({rec['bits_per_param']} bits/param)")
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
