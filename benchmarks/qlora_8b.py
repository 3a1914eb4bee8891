"""Benchmark: QLoRA through slimtune on the Llama-3-8B shape at sequence 2048, beside `hf_baseline.py --mode qlora`.

Random bf16 weights (std 0.02; norms 1) are written once as a Hugging Face checkpoint (shard per layer) to --workdir,
then loaded with `load_model(..., quantize="nf4", device="cuda")` (NF4 + double quant, each weight quantized on the
GPU as it is read). LoRA r=16 alpha=16 on q,k,v,o,gate,up,down, gradient checkpointing, torch AdamW (fused, as the
training loop builds it), bf16-mixed, the training loop's own `train_step` (loss: `slimtune.data.causal_lm_loss`).
3 warm-up + 10 timed steps; tokens/s, peak memory (max_memory_allocated) and MFU exactly as hf_baseline.py:
tokens/s x (4 N + 6 L s d) / 989e12, N = matmul weights incl. lm_head.

    python benchmarks/qlora_8b.py --batch 1 && python benchmarks/qlora_8b.py --batch 4   # H100
    python ../shared/bench/hf_baseline.py --shape llama3-8b --mode qlora --batch 1         # the same call, beside
    python benchmarks/qlora_8b.py --shape tiny                                               # CPU smoke test

One JSON line per run (also appended to --out/results.jsonl).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

SHAPES = {"llama3-8b": "llama3-8b", "tiny": "tiny"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_random_checkpoint(cfg, folder: Path, device: str, seed: int = 0) -> Path:
    """A bf16 HF checkpoint with normal(0, 0.02) matrices and unit norms, one shard per layer (written once)."""
    from slimtune.io.safetensors import write_shards

    marker = folder / ".complete"
    if marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(seed)
    d, f, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hd = cfg.head_dim or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()

    ones = lambda n: torch.ones(n, dtype=torch.bfloat16)
    shards = [{"model.embed_tokens.weight": rnd(V, d)}]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": rnd(q, d), p + "self_attn.k_proj.weight": rnd(kv, d),
                       p + "self_attn.v_proj.weight": rnd(kv, d), p + "self_attn.o_proj.weight": rnd(d, q),
                       p + "mlp.gate_proj.weight": rnd(f, d), p + "mlp.up_proj.weight": rnd(f, d),
                       p + "mlp.down_proj.weight": rnd(d, f), p + "input_layernorm.weight": ones(d),
                       p + "post_attention_layernorm.weight": ones(d)})
    shards.append({"model.norm.weight": ones(d), "lm_head.weight": rnd(V, d)})
    write_shards(shards, folder)
    (folder / "config.json").write_text(json.dumps(cfg.replace(dtype="bfloat16").to_hf(), indent=2))
    marker.touch()
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    ap.add_argument("--seq", type=int, default=None, help="default 2048 (tiny: 128)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-gc", action="store_true")
    ap.add_argument("--workdir", default="/tmp/slimtune_qlora_model")
    ap.add_argument("--model", help="an existing bf16 HF checkpoint of the shape instead (e.g. the one hf_baseline.py "
                                    "wrote to /tmp/anchor_model), to save writing a second copy")
    ap.add_argument("--out", default="/tmp", help="folder for results.jsonl")
    a = ap.parse_args()

    from slimtune.models.load import load_model
    from slimtune.models.shapes import get_shape
    from slimtune.peft import apply_method, freeze_base
    from slimtune.quant.linear import QuantLinear
    from slimtune.train.step import train_step
    from slimtune.precision.policy import apply_precision, resolve_precision

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seq = a.seq or (2048 if a.shape != "tiny" else 128)
    cfg = get_shape(SHAPES[a.shape])
    folder = Path(a.model) if a.model else write_random_checkpoint(cfg, Path(a.workdir) / a.shape, dev.type)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    prec = resolve_precision("bf16-mixed" if dev.type == "cuda" else "fp32", dev)
    t0 = time.perf_counter()
    model, cfg = load_model(folder, dtype=torch.bfloat16, device=dev, quantize="nf4")
    if dev.type == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    packed = sum(m.nbytes() for m in model.modules() if isinstance(m, QuantLinear))
    loaded_gib = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    apply_method(model, {"method": "lora", "r": a.rank, "lora_alpha": a.rank, "target_modules": TARGETS})
    freeze_base(model)
    apply_precision(model, prec)  # LoRA fp32, frozen non-quantized weights (embeddings, norms, head) stay bf16
    model.grad_ckpt = not a.no_gc
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda")

    d, L, f, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    kv = d * cfg.num_key_value_heads // cfg.num_attention_heads
    n_base = L * (2 * d * d + 2 * d * kv + 3 * d * f) + d * V  # matmul weights incl. lm_head (as hf_baseline.py)
    flops_tok = 4 * n_base + 6 * L * seq * d
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, V, (a.batch, seq), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = []
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
        losses.append(train_step(model, [batch], opt, None, prec, dev, 0.0, params)["loss"])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t1
    tok_s = a.batch * seq * a.steps / dt
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    res = dict(stack="slimtune", shape=a.shape, mode="qlora", seq=seq, batch=a.batch, rank=a.rank,
               grad_ckpt=not a.no_gc, tokens_per_s=round(tok_s, 1), step_s=round(dt / a.steps, 4),
               peak_gib=None if peak is None else round(peak, 2),
               mfu=round(tok_s * flops_tok / 989e12, 4) if dev.type == "cuda" else None,
               trainable=sum(p.numel() for p in params), load_s=round(load_s, 1),
               loaded_gib=None if loaded_gib is None else round(loaded_gib, 2), packed_gib=round(packed / 2**30, 3),
               loss_first=round(losses[0], 3), loss_last=round(losses[-1], 3),
               device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__)
    print(json.dumps(res))
    with open(os.path.join(a.out, "results.jsonl"), "a") as fh:
        fh.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
