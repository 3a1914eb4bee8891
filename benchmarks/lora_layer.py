"""Forward + backward of one LoRA-adapted linear layer, slimtune's `LoraLinear` beside PEFT's `lora.Linear` on the
same bf16 base weight (fp32 adapters in both, as PEFT's default autocast_adapter_dtype), for the Llama-3-8B shapes.

    python benchmarks/lora_layer.py [--tokens 8192] [--r 16] [--dora]        # GPU
    python benchmarks/lora_layer.py --tiny                                    # CPU smoke test

Prints one JSON line per shape: milliseconds per forward+backward and peak extra memory (CUDA) for each, and the
max |difference| of the outputs and of the input gradients.
"""
import argparse
import json
import time

import torch
from torch import nn


def bench(layer: nn.Module, x: torch.Tensor, iters: int) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    cuda = x.device.type == "cuda"
    for _ in range(3):  # warm up
        x.grad = None
        layer(x).float().square().mean().backward()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    t = time.perf_counter()
    for _ in range(iters):
        x.grad = None
        y = layer(x)
        y.float().square().mean().backward()
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / iters * 1e3
    peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20 if cuda else 0.0
    return ms, peak, y.detach(), x.grad.detach().clone()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dora", action="store_true")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="small shapes on CPU (smoke test)")
    args = ap.parse_args()
    import peft

    from slimtune.peft.lora import LoraLinear

    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    shapes = [(64, 64), (64, 160)] if args.tiny else [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
    tokens = 64 if args.tiny else args.tokens
    dtype = torch.bfloat16
    for d_in, d_out in shapes:
        torch.manual_seed(0)
        base = nn.Linear(d_in, d_out, bias=False, device=dev, dtype=dtype).requires_grad_(False)
        ours = LoraLinear(base)
        ours.add("default", args.r, 2 * args.r, dora=args.dora)
        ours.set_active(["default"])
        holder = nn.Module()
        holder.proj = base
        pm = peft.get_peft_model(holder, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=["proj"],
                                                         use_dora=args.dora))
        theirs = pm.base_model.model.proj
        A, B = torch.randn(args.r, d_in) * 0.02, torch.randn(d_out, args.r) * 0.02
        with torch.no_grad():
            for m in (ours, theirs):
                m.lora_A["default"].weight.copy_(A)
                m.lora_B["default"].weight.copy_(B)
            for n, p in theirs.named_parameters():
                if "lora_" in n:
                    p.data = p.data.float()
        x = torch.randn(tokens, d_in, device=dev, dtype=dtype, requires_grad=True)
        ms_o, mem_o, y_o, g_o = bench(ours, x, args.iters)
        ms_t, mem_t, y_t, g_t = bench(theirs, x, args.iters)
        print(json.dumps({"shape": [d_in, d_out], "tokens": tokens, "r": args.r, "dora": args.dora,
                          "device": str(dev), "slimtune_ms": round(ms_o, 3), "peft_ms": round(ms_t, 3),
                          "slimtune_peak_mib": round(mem_o, 1), "peft_peak_mib": round(mem_t, 1),
                          "max_diff_out": (y_o.float() - y_t.float()).abs().max().item(),
                          "max_diff_grad": (g_o.float() - g_t.float()).abs().max().item()}))


if __name__ == "__main__":
    main()
