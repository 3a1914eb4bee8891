"""W8A8 on the GPU (issue 18): the `torch._int_mm` path of slimtune's w8a8 format (int8 weights per output channel,
int8 activations per token, int32 accumulation) against bf16 `F.linear`, on the linear shapes of Llama-3-8B, for a
range of token counts: time (CUDA events, median), and the relative error of each against the fp32 product of the
same (unquantized) weights, for Gaussian activations and for activations with outlier channels (as LLMs have).

    PYTHONPATH=src python benchmarks/w8a8.py             # one GPU, about a minute
    PYTHONPATH=src python benchmarks/w8a8.py --cpu       # a smoke test of the same code, small shapes

Rows: `bf16` (F.linear), `w8a8` (the whole layer: per-token quantization of x, _int_mm, scaling: what
`QuantLinear(fmt="w8a8")` runs), `int_mm` (torch._int_mm alone on already-quantized operands). JSON lines on stdout
and in $OUT/w8a8.jsonl, then a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.quant.codecs.int8 import int8_matmul
from slimtune.quant.linear import QuantLinear

SHAPES_8B = {"q_proj / o_proj": (4096, 4096), "k_proj / v_proj": (1024, 4096), "gate_proj / up_proj": (14336, 4096),
             "down_proj": (4096, 14336)}  # name -> (out, in)
SHAPES_CPU = {"small": (256, 512), "wide": (512, 256)}


def timed(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of fn() over `reps` calls (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def activations(M: int, K: int, outliers: bool, g: torch.Generator, device) -> torch.Tensor:
    """(M, K) bf16: N(0, 1), or with 1% of the channels 20x larger (the outlier features of LLM activations)."""
    x = torch.randn(M, K, generator=g)
    if outliers:
        x[:, torch.randperm(K, generator=g)[: max(1, K // 100)]] *= 20
    return x.to(device, torch.bfloat16)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def measure(name: str, N: int, K: int, M: int, device: torch.device, reps: int) -> list[dict]:
    g = torch.Generator().manual_seed(N * 7 + K + M)
    lin = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * K ** -0.5)
    w32 = lin.weight.detach().to(device)
    wb = w32.to(torch.bfloat16)
    q = QuantLinear.from_linear(lin, "w8a8", device=device)
    rows = []
    for outliers in (False, True):
        x = activations(M, K, outliers, g, device)
        ref = x.float() @ w32.t()  # the unquantized weights in fp32
        with torch.no_grad():
            err_b, err_q = rel_err(F.linear(x, wb), ref), rel_err(q(x), ref)
        rows.append({"shape": name, "N": N, "K": K, "M": M, "activations": "outliers" if outliers else "gaussian",
                     "err_bf16": round(err_b, 6), "err_w8a8": round(err_q, 6)})
    x = activations(M, K, False, g, device)
    xq = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8).to(device)
    with torch.no_grad():
        t_b = timed(lambda: F.linear(x, wb), device, reps)
        t_q = timed(lambda: q(x), device, reps)
        t_i = timed(lambda: int8_matmul(xq, q.weight), device, reps)
    flops = 2 * M * N * K
    for r in rows:
        r.update(ms_bf16=round(t_b, 4), ms_w8a8=round(t_q, 4), ms_int_mm=round(t_i, 4),
                 speedup_w8a8=round(t_b / t_q, 3), speedup_int_mm=round(t_b / t_i, 3),
                 tflops_bf16=round(flops / t_b / 1e9, 1), tops_int_mm=round(flops / t_i / 1e9, 1))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="small shapes on the CPU (a smoke test)")
    ap.add_argument("--tokens", default="32,128,512,2048,8192", help="token counts M (each > 16: _int_mm's rule)")
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args(argv)
    device = torch.device("cpu" if a.cpu or not torch.cuda.is_available() else "cuda")
    shapes = SHAPES_CPU if device.type == "cpu" else SHAPES_8B
    tokens = [32, 64] if a.cpu else [int(t) for t in a.tokens.split(",")]
    out = os.environ.get("OUT")
    rows = []
    for name, (N, K) in shapes.items():
        for M in tokens:
            for r in measure(name, N, K, M, device, 5 if a.cpu else a.reps):
                r["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
                rows.append(r)
                print(json.dumps(r), flush=True)
                if out:
                    with open(Path(out) / "w8a8.jsonl", "a") as f:
                        f.write(json.dumps(r) + "\n")
    print("| shape (out x in) | tokens | bf16 ms | w8a8 ms | _int_mm ms | w8a8 / bf16 speed-up | error bf16 | "
          "error w8a8 (gaussian) | error w8a8 (outliers) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for gauss, outl in zip(rows[::2], rows[1::2]):
        print(f"| {gauss['shape']} ({gauss['N']} x {gauss['K']}) | {gauss['M']} | {gauss['ms_bf16']} | "
              f"{gauss['ms_w8a8']} | {gauss['ms_int_mm']} | {gauss['speedup_w8a8']} | {gauss['err_bf16']} | "
              f"{gauss['err_w8a8']} | {outl['err_w8a8']} |")
    return rows


if __name__ == "__main__":
    main()
