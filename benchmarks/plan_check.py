"""Does the planner's recommendation run within its budget? For each GPU budget, ask `slimtune.memory.plan` for the
fastest configuration that fits, cap the process at that budget with `torch.cuda.set_per_process_memory_fraction`,
and run three training steps of it (memory_check's build and step: the training loop's numerics).

    python benchmarks/plan_check.py [--shape llama3-8b] [--seq 2048] [--budgets 16,40]

One JSON line per budget: the recommended row, measured max_memory_allocated, and whether it stayed in the budget.
"""
import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from memory_check import TARGETS, build, step  # noqa: E402

from slimtune.memory.plan import plan  # noqa: E402
from slimtune.models.shapes import get_shape  # noqa: E402


def build_qlora_streamed(shape: str, device: torch.device):
    """QLoRA as a user gets it: each block materialised and quantized to NF4 before the next one exists, so the
    16-bit model never sits on the GPU whole (memory_check's build materialises it first, which a 16 GiB cap forbids)."""
    from slimtune.optim.build import make_optimizer
    from slimtune.models.shapes import build_meta
    from slimtune.peft import apply_method, freeze_base
    from slimtune.quant import quantize_model

    model = build_meta(get_shape(shape))
    g = torch.Generator(device=device).manual_seed(0)

    def materialise(mod: torch.nn.Module) -> None:
        mod.to_empty(device=device)
        with torch.no_grad():
            for n, p in mod.named_parameters():
                p.fill_(1.0) if "norm" in n else p.normal_(0, 0.02, generator=g)
        mod.to(torch.bfloat16)

    for mod in (model.model.embed_tokens, model.model.norm, model.lm_head):
        materialise(mod)
    for block in model.model.layers:
        materialise(block)
        quantize_model(block, "nf4", double_quant=True)
    model.requires_grad_(False)
    apply_method(model, {"method": "lora", "r": 16, "lora_alpha": 16, "target_modules": TARGETS})
    freeze_base(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, make_optimizer(params, "adamw", lr=1e-5), params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--budgets", default="16,40", help="GiB, comma-separated")
    a = ap.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    cfg = get_shape(a.shape)
    total = torch.cuda.get_device_properties(dev).total_memory
    for gib in (float(x) for x in a.budgets.split(",")):
        budget = int(gib * 2**30)
        best = next(r for r in plan(cfg, budget, seq=a.seq) if r["fastest"])
        torch.cuda.set_per_process_memory_fraction(budget / total, dev)
        row = {"budget_gib": gib, "recommended": best}
        try:
            if best["method"] == "qlora":
                model, opt, params = build_qlora_streamed(a.shape, dev)
            else:
                model, opt, params = build(a.shape, best["method"], dev, "bf16-mixed", best["offload"])
            model.grad_ckpt = best["grad_ckpt"]
            ids = torch.randint(0, cfg.vocab_size, (best["max_batch"], best["seq"]), device=dev)
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(3):
                step(model, opt, params, ids, dev, best["offload"])
            torch.cuda.synchronize()
            row.update(ran=True, seconds_3_steps=round(time.perf_counter() - t0, 2),
                       measured_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                       predicted_gib=round(best["peak_bytes"] / 2**30, 2))
            row["within_budget"] = row["measured_gib"] <= gib
            del model, opt, params
        except torch.cuda.OutOfMemoryError as e:
            row.update(ran=False, error=str(e).splitlines()[0])
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
