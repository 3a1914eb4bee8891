"""Benchmark: QLoRA (or LoRA on a bf16 base) through slimtune on the Llama-3-8B shape, measured as
`../shared/bench/hf_baseline.py` measures transformers + PEFT (+ bitsandbytes), so the two can run side by side.

Random bf16 weights (std 0.02; norms 1) are written once as a Hugging Face checkpoint (shard per layer) to --workdir
(or --model reuses the baseline's /tmp/anchor_model), then loaded with `load_model(..., quantize="nf4")` (NF4 + double
quant, each weight quantized on the GPU as it is read) or in bf16 (--mode lora). LoRA r=16 alpha=16 on
q,k,v,o,gate,up,down, torch AdamW (fused), bf16-mixed, gradient checkpointing (--ckpt true | offload | false), the
training loop's own `train_step`, fused kernels on or off (--kernels). 3 warm-up + 10 timed steps; tokens/s, peak
memory (max_memory_allocated) and MFU exactly as hf_baseline.py: tokens/s x (4 N + 6 L s d) / 989e12, N = matmul
weights incl. lm_head. --profile adds one profiled step: kernel launches, GPU busy time and the top kernels.

    python benchmarks/qlora_8b.py --model /tmp/anchor_model --batch 1 [--mode lora] [--kernels off] [--profile]
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

SHAPES = {"llama3-8b": "llama3-8b", "llama3-1b": "llama3-1b", "tiny": "tiny"}
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

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    shards = [{"model.embed_tokens.weight": rnd(V, d)}]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": rnd(q, d), p + "self_attn.k_proj.weight": rnd(kv, d),
                       p + "self_attn.v_proj.weight": rnd(kv, d), p + "self_attn.o_proj.weight": rnd(d, q),
                       p + "mlp.gate_proj.weight": rnd(f, d), p + "mlp.up_proj.weight": rnd(f, d),
                       p + "mlp.down_proj.weight": rnd(d, f), p + "input_layernorm.weight": ones(d),
                       p + "post_attention_layernorm.weight": ones(d)})
    shards.append({"model.norm.weight": ones(d)} if cfg.tie_word_embeddings else
                  {"model.norm.weight": ones(d), "lm_head.weight": rnd(V, d)})
    write_shards(shards, folder)
    (folder / "config.json").write_text(json.dumps(cfg.replace(dtype="bfloat16").to_hf(), indent=2))
    marker.touch()
    return folder


def profile_step(step, dev: torch.device) -> dict:
    """One profiled step: CUDA kernel launches, their summed and merged (busy) time against the step's wall time, and
    the five kernels that take the most time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    torch.cuda.synchronize() if dev.type == "cuda" else None
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        step()
        torch.cuda.synchronize() if dev.type == "cuda" else None
    wall = time.perf_counter() - t0
    evs = prof.events()
    kern = [e for e in evs if e.device_type.name == "CUDA"] if dev.type == "cuda" else []
    api = sum(1 for e in evs if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
                                          "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync"))
    spans = sorted((e.time_range.start, e.time_range.end) for e in kern)
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:  # merge overlapping kernel intervals (us)
        if cur_e is None or s > cur_e:
            busy += 0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += 0 if cur_e is None else cur_e - cur_s
    by_name: dict[str, float] = {}
    for e in kern:
        by_name[e.name] = by_name.get(e.name, 0.0) + (e.time_range.end - e.time_range.start)
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    return {"launches": len(kern), "cpu_launch_calls": api, "kernel_ms": round(sum(by_name.values()) / 1e3, 1), "busy_ms": round(busy / 1e3, 1),
            "wall_ms": round(wall * 1e3, 1), "idle_frac": round(1 - busy / 1e3 / (wall * 1e3), 3) if kern else None,
            "top": [(n[:60], round(t / 1e3, 1)) for n, t in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    ap.add_argument("--mode", choices=["qlora", "lora"], default="qlora")
    ap.add_argument("--seq", type=int, default=None, help="default 2048 (tiny: 128)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ckpt", choices=["true", "offload", "false"], default="true")
    ap.add_argument("--ckpt-blocks", type=int, default=None, help="checkpoint only the first N blocks (default all)")
    ap.add_argument("--host-embedding", action="store_true", help="the embedding table in pinned host memory")
    ap.add_argument("--kernels", choices=["auto", "off"], default="auto")
    ap.add_argument("--graph", choices=["auto", "off"], default="auto", help="replay steps as a CUDA graph")
    ap.add_argument("--loss", choices=["chunked", "full"], default="chunked")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--workdir", default="/tmp/slimtune_qlora_model")
    ap.add_argument("--model", help="an existing bf16 HF checkpoint of the shape instead (e.g. the one hf_baseline.py "
                                    "wrote to /tmp/anchor_model), to save writing a second copy")
    ap.add_argument("--out", default="/tmp", help="folder for results.jsonl")
    a = ap.parse_args()
    os.environ["SLIMTUNE_KERNELS"] = a.kernels

    from slimtune.models.host_embed import keep_embedding_on_host
    from slimtune.models.load import load_model
    from slimtune.models.shapes import get_shape
    from slimtune.peft import apply_method, freeze_base
    from slimtune.precision.policy import apply_precision, resolve_precision
    from slimtune.quant.linear import QuantLinear
    from slimtune.optim.build import make_optimizer
    from slimtune.train.graphed import GraphedStep, supported
    from slimtune.train.step import train_step

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seq = a.seq or (2048 if a.shape != "tiny" else 128)
    cfg = get_shape(SHAPES[a.shape])
    folder = Path(a.model) if a.model else write_random_checkpoint(cfg, Path(a.workdir) / a.shape, dev.type)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    prec = resolve_precision("bf16-mixed" if dev.type == "cuda" else "fp32", dev)
    t0 = time.perf_counter()
    model, cfg = load_model(folder, dtype=torch.bfloat16, device=dev, quantize="nf4" if a.mode == "qlora" else None)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    packed = sum(m.nbytes() for m in model.modules() if isinstance(m, QuantLinear))
    loaded_gib = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    torch.manual_seed(0)  # the same adapters in every run, so that losses compare
    apply_method(model, {"method": "lora", "r": a.rank, "lora_alpha": a.rank, "target_modules": TARGETS})
    freeze_base(model)
    apply_precision(model, prec)  # LoRA fp32, frozen non-quantized weights (embeddings, norms, head) stay bf16
    model.grad_ckpt = {"true": True, "false": False, "offload": "offload"}[a.ckpt]
    model.ckpt_blocks = a.ckpt_blocks
    if a.host_embedding:
        keep_embedding_on_host(model)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, "adamw", lr=1e-4)  # fused and capturable on CUDA, as the training loop builds it

    d, L, f, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    kv = d * cfg.num_key_value_heads // cfg.num_attention_heads
    n_base = L * (2 * d * d + 2 * d * kv + 3 * d * f) + d * V  # matmul weights incl. lm_head (as hf_baseline.py)
    flops_tok = 4 * n_base + 6 * L * seq * d
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, V, (a.batch, seq), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}

    chunked = a.loss == "chunked"
    graphed = None
    if a.graph == "auto" and supported(model, opt, None, dev, False) is None:
        graphed = GraphedStep(model, opt, prec, dev, 0.0, params, chunked)

    def step() -> float:
        if graphed is not None:
            return graphed([batch], 1e-4)["loss"]
        return train_step(model, [batch], opt, None, prec, dev, 0.0, params, chunked=chunked)["loss"]

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = []
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
        losses.append(step())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t1
    tok_s = a.batch * seq * a.steps / dt
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    res = dict(stack="slimtune", shape=a.shape, mode=a.mode, seq=seq, batch=a.batch, rank=a.rank, grad_ckpt=a.ckpt,
               ckpt_blocks=a.ckpt_blocks, host_embedding=a.host_embedding, kernels=a.kernels, graph=graphed is not None, loss=a.loss, tokens_per_s=round(tok_s, 1), step_s=round(dt / a.steps, 4),
               peak_gib=None if peak is None else round(peak, 2),
               mfu=round(tok_s * flops_tok / 989e12, 4) if dev.type == "cuda" else None,
               trainable=sum(p.numel() for p in params), load_s=round(load_s, 1),
               loaded_gib=None if loaded_gib is None else round(loaded_gib, 2), packed_gib=round(packed / 2**30, 3),
               loss_first=round(losses[0], 3), loss_last=round(losses[-1], 3),
               device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__)
    if a.profile:
        res["profile"] = profile_step(step, dev)
    print(json.dumps(res))
    with open(os.path.join(a.out, "results.jsonl"), "a") as fh:
        fh.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
