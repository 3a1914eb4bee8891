"""LoRA and full fine-tuning of the llama3-1b shape (random weights, built on the meta device, then to_empty + init
on CUDA) for 20 steps in bf16-mixed at sequence 2048, through slimtune's training step (the one the loop runs).

    python benchmarks/train_1b.py [--shape llama3-1b] [--seq 2048] [--batch 1] [--steps 20] [--modes lora,full]
    python benchmarks/train_1b.py --shape tiny --seq 64 --steps 3          # CPU smoke run

Prints one JSON line per mode: tokens/s, peak memory (max_memory_allocated), MFU with the formula of
../shared/bench/hf_baseline.py (frozen base: 4N + 6Lsd FLOPs per token; full fine-tuning adds the weight gradients:
6N + 6Lsd; N = matmul weights with lm_head, over the H100's 989 TFLOP/s dense bf16), first and last loss.
"""
import argparse
import json
import time

import torch
from decode_8b import materialise  # random normal(0, 0.02) weights on the device, norms at 1


def matmul_weights(cfg) -> int:
    d, L, f, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    q = cfg.num_attention_heads * cfg.head_dim
    return L * (2 * d * q + 2 * d * kv + 3 * d * f) + d * V


def run(mode: str, a, device: torch.device) -> dict:
    from slimtune.models.shapes import build_meta, get_shape
    from slimtune.peft import apply_method, freeze_base
    from slimtune.train import load_config
    from slimtune.train.build import build_optimizer
    from slimtune.train.step import train_step
    from slimtune.precision.policy import apply_precision, resolve_precision

    mcfg = get_shape(a.shape)
    full = mode == "full"
    prec = resolve_precision(a.precision, device, full=full)
    model = materialise(build_meta(mcfg).to(prec.weight_dtype if full else prec.frozen_dtype), device)
    if not full:
        apply_method(model, {"method": "lora", "r": a.rank, "lora_alpha": a.rank, "target_modules": "all-linear"})
        freeze_base(model)
    apply_precision(model, prec)
    model.grad_ckpt = not a.no_gc
    model.train()
    tcfg = load_config(None, ["data=random", f"method={mode}", "lr=1e-4", "weight_decay=0.0"])
    opt = build_optimizer(model, tcfg)
    scaler = prec.make_scaler(device.type)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, mcfg.vocab_size, (a.batch, a.seq), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = []
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            sync()
            t0 = time.perf_counter()
        losses.append(train_step(model, [batch], opt, scaler, prec, device, 1.0, params)["loss"])
    sync()
    dt = time.perf_counter() - t0
    tok_s = a.batch * a.seq * a.steps / dt
    N, L, d = matmul_weights(mcfg), mcfg.num_hidden_layers, mcfg.hidden_size
    flops_tok = (6 if full else 4) * N + 6 * L * a.seq * d
    res = dict(stack="slimtune", shape=a.shape, mode=mode, precision=prec.name, seq=a.seq, batch=a.batch,
               rank=a.rank if not full else None, grad_ckpt=not a.no_gc, tokens_per_s=round(tok_s, 1),
               step_s=round(dt / a.steps, 4),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
               mfu=round(tok_s * flops_tok / 989e12, 4) if device.type == "cuda" else None,
               trainable=sum(p.numel() for p in params), loss_first=round(losses[0], 3),
               loss_last=round(losses[-1], 3),
               device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__)
    del model, opt, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--precision", default="bf16-mixed")
    ap.add_argument("--no-gc", action="store_true", help="no activation checkpointing")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for mode in a.modes.split(","):
        print(json.dumps(run(mode, a, device)), flush=True)


if __name__ == "__main__":
    main()
