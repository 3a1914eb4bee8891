"""Measured peak GPU memory of a training step against `slimtune.memory.estimate`, for a list of configurations.

Each configuration builds slimtune's Decoder on the meta device, materialises random weights on the GPU (to_empty +
normal init), applies the method (LoRA via slimtune.peft, QLoRA = slimtune.quant NF4 + LoRA), runs two warm-up steps
(so the optimizer state exists), resets the peak counter and measures one step (forward, loss as
slimtune.data.causal_lm_loss in fp32, backward, clip, optimizer step, zero_grad) with torch.cuda.max_memory_allocated.
Prints a table (estimate, measured, ratio, tokens/s) and one JSON line per configuration.

    python benchmarks/memory_check.py                     # the H100 list (>= 8 configurations)
    python benchmarks/memory_check.py --only llama3-8b    # a subset (substring of the name)
    python benchmarks/memory_check.py --device cpu        # smoke test on a tiny shape (no memory figures)
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from slimtune.memory.estimate import estimate
from slimtune.train.offload import offload_activations
from slimtune.optim.build import make_optimizer
from slimtune.models.shapes import build_meta, get_shape

# (shape, method, batch, seq, grad_ckpt, offload)
CONFIGS = [
    ("llama3-1b", "full", 1, 512, False, None), ("llama3-1b", "full", 1, 2048, True, None),
    ("llama3-1b", "lora", 2, 2048, False, None), ("llama3-1b", "qlora", 2, 2048, True, None),
    ("llama3-8b", "lora", 1, 2048, True, None), ("llama3-8b", "lora", 1, 2048, False, None),
    ("llama3-8b", "lora", 1, 512, False, None), ("llama3-8b", "qlora", 1, 2048, True, None),
    ("llama3-8b", "qlora", 1, 2048, False, None), ("llama3-8b", "qlora", 4, 2048, True, None),
    ("llama3-8b", "lora", 1, 2048, False, "activations"), ("llama3-1b", "full", 1, 2048, True, "optimizer"),
]
CPU_CONFIGS = [("tiny", m, 2, 64, ck, off) for m, ck, off in
               (("full", False, None), ("lora", True, None), ("qlora", False, None), ("lora", False, "activations"),
                ("full", False, "optimizer"))]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: str, method: str, device: torch.device, precision: str, offload: str | None):
    """The model on `device` with random weights in the dtypes the training loop would use, and its optimizer."""
    from slimtune.models.decoder import Decoder

    cfg = get_shape(shape)
    model: Decoder = build_meta(cfg)
    full = method == "full"
    # bf16-mixed: trainable base weights fp32 (16-bit when the fp32 master lives on the CPU), frozen ones bf16
    dtype = torch.float32 if full and offload != "optimizer" else torch.bfloat16
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty replaces each Parameter: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.fill_(1.0) if "norm" in n else p.normal_(0, 0.02)
    model.to(dtype)
    if not full:
        model.requires_grad_(False)
        if method == "qlora":
            from slimtune.quant import quantize_model
            quantize_model(model, "nf4", double_quant=True)
        from slimtune.peft import apply_method, freeze_base
        apply_method(model, {"method": "lora", "r": 16, "lora_alpha": 16, "target_modules": TARGETS})
        freeze_base(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, "adamw", lr=1e-5, offload=offload == "optimizer")
    return model, opt, params


def step(model, opt, params, ids, device, offload: str | None) -> float:
    """One step as slimtune.train.loop.train_step does it; returns the loss."""
    from slimtune.train.loss import causal_lm_loss

    ctx = offload_activations(model) if offload == "activations" else torch.autograd.graph.saved_tensors_hooks(
        lambda t: t, lambda t: t)
    with ctx:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(ids)
        loss_sum, count = causal_lm_loss(logits, ids)
        del logits
    loss = loss_sum / count
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def run_one(c, device: torch.device) -> dict:
    shape, method, batch, seq, ck, off = c
    cfg = get_shape(shape)
    e = estimate(cfg, method, "bf16-mixed", "adamw", batch, seq, ck, offload=off, lora_rank=16,
                 device=device.type)
    row = {"shape": shape, "method": method, "batch": batch, "seq": seq, "grad_ckpt": ck, "offload": off,
           "estimate_bytes": e["total_bytes"], "estimate_phase": e["peak_phase"], "dominant": e["dominant"]}
    model, opt, params = build(shape, method, device, "bf16-mixed", off)
    model.grad_ckpt = ck
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    for _ in range(2):
        step(model, opt, params, ids, device, off)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    loss = step(model, opt, params, ids, device, off)
    if device.type == "cuda":
        torch.cuda.synchronize()
        row.update(measured_bytes=torch.cuda.max_memory_allocated(), resident_before_bytes=base)
        row["ratio"] = row["measured_bytes"] / row["estimate_bytes"]
    row.update(seconds=time.perf_counter() - t0, loss=loss)
    row["tokens_per_s"] = batch * seq / row["seconds"]
    del model, opt, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", default=None, help="run configurations whose shape/method contains this")
    args = ap.parse_args()
    device = torch.device(args.device)
    configs = CONFIGS if device.type == "cuda" else CPU_CONFIGS
    if args.only:
        configs = [c for c in configs if args.only in f"{c[0]} {c[1]} {c[5]}"]
    rows = []
    for c in configs:
        try:
            rows.append(run_one(c, device))
        except torch.cuda.OutOfMemoryError as err:
            rows.append({"shape": c[0], "method": c[1], "batch": c[2], "seq": c[3], "grad_ckpt": c[4],
                         "offload": c[5], "error": f"OOM: {str(err).splitlines()[0]}"})
            gc.collect()
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    gib = lambda x: f"{x / 2**30:8.2f}"  # noqa: E731
    print(f"\n{'shape':<11}{'method':<7}{'B':>3}{'seq':>6} {'ckpt':<5}{'offload':<12}{'est GiB':>9}{'meas GiB':>9}"
          f"{'ratio':>7}{'tok/s':>9}  peak phase")
    for r in rows:
        head = f"{r['shape']:<11}{r['method']:<7}{r['batch']:>3}{r['seq']:>6} {'yes' if r['grad_ckpt'] else 'no':<5}" \
               f"{r['offload'] or '-':<12}"
        if "error" in r:
            print(head + r["error"])
            continue
        meas = gib(r["measured_bytes"]) if "measured_bytes" in r else "       -"
        ratio = f"{r['ratio']:7.3f}" if "ratio" in r else "      -"
        print(f"{head}{gib(r['estimate_bytes']):>9}{meas:>9}{ratio}{r['tokens_per_s']:>9.0f}  {r['estimate_phase']}")


if __name__ == "__main__":
    main()
