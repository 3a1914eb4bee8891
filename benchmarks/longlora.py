"""LongLoRA measured (issue 18). A small decoder (~25M parameters) is pre-trained here on the Python standard
library's source at a short context (512), extended 4x (2048) with LongLoRA (LoRA on q, k, v, o + trainable
embeddings and norms, S^2-Attn in training, linear RoPE interpolation); perplexity at 4x the training length against
the un-extended model and against position interpolation without training. Then the memory and speed of LongLoRA
training steps at 8k-32k tokens on the Llama-3-8B shape (random bf16 weights), S^2-Attn against full attention.

    PYTHONPATH=src python benchmarks/longlora.py           # one H200: about 6-7 minutes
    PYTHONPATH=src python benchmarks/longlora.py --tiny    # the CPU in seconds, toy sizes (run by the test suite)

Data: every .py file under sysconfig.get_paths()["stdlib"] (site-packages left out), as bytes; id = 8 + byte (the
built-in byte-level tokenizer's ids); files in sorted order, every 20th held out for validation. Rebuilt on every
run; nothing is written but the results: JSON lines on stdout and in $OUT/longlora.jsonl, then a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slimtune.models.config import ModelConfig
from slimtune.models.decoder import Decoder, init_weights
from slimtune.models.tiny import N_SPECIAL
from slimtune.peft import apply_method, freeze_base
from slimtune.precision.policy import apply_precision, resolve_precision
from slimtune.train.step import train_step

SIZES = {  # what --tiny shrinks
    "full": dict(d=512, layers=8, heads=8, short=512, factor=4, batch=64, ext_batch=16, pre_s=150.0, ext_s=90.0,
                 eval_windows=48, shape="llama3-8b", seqs=(8192, 16384, 32768), limit_mb=64),
    "tiny": dict(d=64, layers=2, heads=4, short=32, factor=4, batch=8, ext_batch=4, pre_s=4.0, ext_s=3.0,
                 eval_windows=4, shape=None, seqs=(64, 128), limit_mb=0.4),
}


def emit(row: dict, rows: list[dict]) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(Path(out) / "longlora.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def stdlib_tokens(limit_mb: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train ids, validation ids, summary): the stdlib's .py files as byte ids, every 20th file for validation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(f.parts))
    parts: tuple[list[bytes], list[bytes]] = ([], [])
    total = 0
    for i, f in enumerate(files):
        b = f.read_bytes() + b"\n\n"
        parts[i % 20 == 0].append(b)
        total += len(b)
        if total >= limit_mb * 1e6:
            break
    train, val = (torch.frombuffer(bytearray(b"".join(p)), dtype=torch.uint8).long() + N_SPECIAL for p in parts)
    return train, val, {"root": str(root), "files": i + 1, "train_tokens": len(train), "val_tokens": len(val)}


def windows(data: torch.Tensor, B: int, T: int, g: torch.Generator) -> torch.Tensor:
    """B random windows of T tokens, (B, T)."""
    start = torch.randint(0, len(data) - T, (B,), generator=g)
    return data[start[:, None] + torch.arange(T)]


def small_model(s: dict, device: torch.device) -> Decoder:
    cfg = ModelConfig(vocab_size=320, hidden_size=s["d"], intermediate_size=s["d"] * 11 // 4 // 64 * 64 or 128,
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                      max_position_embeddings=s["short"], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return init_weights(Decoder(cfg), 0).to(device)


def train_for(model, data, B: int, T: int, seconds: float, lr: float, prec, device, seed: int) -> dict:
    """AdamW steps on random windows for `seconds` (linear warmup over 50 steps, then cosine over the time budget
    to lr / 10); returns steps, tokens/s and the last losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0, steps, losses = time.perf_counter(), 0, []
    while (elapsed := time.perf_counter() - t0) < seconds:
        frac = min(1.0, elapsed / seconds)
        f = min(1.0, (steps + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for grp in opt.param_groups:
            grp["lr"] = lr * f
        x = windows(data, B, T, g)
        res = train_step(model, [{"input_ids": x, "labels": x}], opt, None, prec, device, 1.0, params)
        losses.append(res["loss"])
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"steps": steps, "seconds": round(dt, 1), "tokens_per_s": round(steps * B * T / dt),
            "loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 4)}


@torch.no_grad()
def perplexity(model, val: torch.Tensor, T: int, n: int, short: int, prec, device) -> dict:
    """Perplexity (per byte) over n consecutive validation windows of T tokens: over all positions, and over those
    past the pre-training context `short` (where an extension matters)."""
    model.eval()
    n = min(n, (len(val) - 1) // T)
    nll = []
    for i in range(0, n, 4):
        x = torch.stack([val[j * T:(j + 1) * T + 1] for j in range(i, min(n, i + 4))]).to(device)
        with prec.context(device.type):
            logits = model(x[:, :-1]).float()  # (b, T, V)
        nll.append(F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(len(x), T))
    nll = torch.cat(nll)  # (n, T)
    out = {"ppl": round(math.exp(nll.mean().item()), 4)}
    if T > short:
        out["ppl_beyond_short"] = round(math.exp(nll[:, short:].mean().item()), 4)
    return out


def context_extension(s: dict, device: torch.device, rows: list[dict]) -> None:
    """Pre-train at `short`, then measure base / position interpolation / LongLoRA at factor x short."""
    train, val, summary = stdlib_tokens(s["limit_mb"])
    emit({"phase": "data", **summary}, rows)
    prec = resolve_precision("bf16-mixed" if device.type == "cuda" else "fp32", device)
    short, long = s["short"], s["short"] * s["factor"]
    model = small_model(s, device)
    n_params = sum(p.numel() for p in model.parameters())
    r = train_for(model, train, s["batch"], short, s["pre_s"], 1e-3, prec, device, seed=1)
    emit({"phase": "pretrain", "params": n_params, "context": short, **r}, rows)
    ev = lambda m, T: perplexity(m, val, T, s["eval_windows"] * long // T, short, prec, device)  # noqa: E731
    emit({"phase": "eval", "model": "base", "context": short, **ev(model, short)}, rows)
    emit({"phase": "eval", "model": "base (no extension)", "context": long, **ev(model, long)}, rows)
    mc = model.config
    mc.rope_scaling = {"rope_type": "linear", "factor": float(s["factor"])}
    model.reset_rope()
    emit({"phase": "eval", "model": "position interpolation, no training", "context": long, **ev(model, long)}, rows)
    mc.rope_scaling = None
    model.reset_rope()
    apply_method(model, {"method": "longlora", "r": 8, "lora_alpha": 16, "rope_factor": s["factor"],
                         "s2_group": short})  # groups of the pre-training length: a quarter of the new context
    trainable = freeze_base(model)  # (weights stay fp32; the matmuls run in bf16 under autocast, as in pre-training)
    r = train_for(model, train, s["ext_batch"], long, s["ext_s"], 5e-4, prec, device, seed=2)
    emit({"phase": "longlora", "context": long, "s2_group": short, "trainable": trainable, **r}, rows)
    emit({"phase": "eval", "model": "LongLoRA", "context": long, **ev(model, long)}, rows)
    emit({"phase": "eval", "model": "LongLoRA", "context": short, **ev(model, short)}, rows)


def shape_steps(s: dict, device: torch.device, rows: list[dict]) -> None:
    """LongLoRA training steps (batch 1, grad_ckpt, bf16-mixed, fused AdamW) at each length, S^2-Attn (group = a
    quarter of the length) against full attention: seconds per step, tokens/s, peak memory."""
    from slimtune.models.shapes import get_shape

    if s["shape"]:
        cfg = get_shape(s["shape"]).replace(rope_scaling=None, max_position_embeddings=8192)
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("meta"):
            model = Decoder(cfg)
        torch.set_default_dtype(torch.float32)
        model.to_empty(device=device)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.fill_(1.0) if "norm" in n else p.normal_(0, 0.02)
        model.reset_rope()
    else:
        model = small_model(s, device)
    apply_method(model, {"method": "longlora", "r": 8, "lora_alpha": 16, "rope_factor": 4})
    freeze_base(model)
    prec = resolve_precision("bf16-mixed" if device.type == "cuda" else "fp32", device)
    apply_precision(model, prec)
    model.grad_ckpt = True
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    atts = [layer.self_attn for layer in model.model.layers]
    for T in s["seqs"]:
        for mode in ("s2", "full"):
            for a in atts:
                a.s2_group = T // 4 if mode == "s2" else None
            emit({"phase": "steps", "shape": s["shape"] or "tiny", "seq": T, "attention": mode,
                  **timed_steps(model, opt, params, T, prec, device)}, rows)


def timed_steps(model, opt, params, T: int, prec, device, timed: int = 2) -> dict:
    x = torch.randint(N_SPECIAL, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
    batch = [{"input_ids": x, "labels": x}]
    try:
        train_step(model, batch, opt, None, prec, device, 1.0, params)  # warm-up (allocator, kernels)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(timed):
            loss = train_step(model, batch, opt, None, prec, device, 1.0, params)["loss"]
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / timed
    except torch.cuda.OutOfMemoryError as e:
        opt.zero_grad(set_to_none=True)
        return {"ok": False, "error": str(e).split("\n")[0][:120]}
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"ok": True, "step_s": round(dt, 3), "tokens_per_s": round(T / dt), "peak_gib": peak and round(peak, 2),
            "loss": round(loss, 4)}


def table(rows: list[dict]) -> str:
    out = ["| model | context | ppl | ppl past the pre-training context |", "| --- | --- | --- | --- |"]
    out += [f"| {r['model']} | {r['context']} | {r['ppl']} | {r.get('ppl_beyond_short', '')} |"
            for r in rows if r["phase"] == "eval"]
    out += ["", "| shape | seq | attention | s / step | tokens/s | peak GiB |", "| --- | --- | --- | --- | --- | --- |"]
    out += [f"| {r['shape']} | {r['seq']} | {r['attention']} | {r.get('step_s', 'OOM')} | {r.get('tokens_per_s', '')} "
            f"| {r.get('peak_gib') or ''} |" for r in rows if r["phase"] == "steps"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (seconds)")
    ap.add_argument("--pretrain-s", type=float, help="seconds of pre-training (default 150; tiny 4)")
    ap.add_argument("--extend-s", type=float, help="seconds of LongLoRA training (default 90; tiny 3)")
    ap.add_argument("--seqs", help="comma-separated lengths for the 8B-shape steps (default 8192,16384,32768)")
    ap.add_argument("--skip-shape", action="store_true", help="leave out the 8B-shape steps")
    a = ap.parse_args(argv)
    s = dict(SIZES["tiny" if a.tiny else "full"])
    s.update({k: v for k, v in (("pre_s", a.pretrain_s), ("ext_s", a.extend_s)) if v is not None})
    if a.seqs:
        s["seqs"] = tuple(int(x) for x in a.seqs.split(","))
    device = torch.device("cpu" if a.tiny or not torch.cuda.is_available() else "cuda")
    torch.manual_seed(0)
    rows: list[dict] = []
    t0 = time.perf_counter()
    context_extension(s, device, rows)
    if not a.skip_shape:
        shape_steps(s, device, rows)
    emit({"phase": "done", "seconds": round(time.perf_counter() - t0, 1), "device": str(device),
          "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "torch": torch.__version__}, rows)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
