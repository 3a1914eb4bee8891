"""The longest sequence that trains one QLoRA step at batch 1 on one GPU, for slimtune or Unsloth, on the same random
Llama-3-8B-shape checkpoint (LoRA r=16 on all 7 projections, AdamW, each stack's own checkpointing: slimtune
grad_ckpt=offload with the chunked loss, Unsloth's "unsloth" offloaded checkpointing).

The model is loaded once; lengths are tried doubling from --start until a step fails with out-of-memory, then bisected
(on multiples of 1024) to within 10%, or until --budget-s seconds of stepping are spent. Each length runs one step
(the first step at a length includes any allocator growth, which is what fits or not). One JSON line per trial (seq,
ok, seconds, tokens/s, peak GiB) and a summary line.

`--cap-gib G` lets each stack use at most G GiB of the GPU (`torch.cuda.set_per_process_memory_fraction`, set
before anything is loaded): the longest sequence on a smaller card, found on the big one. Without a cap the search on
an H200 runs into the step time (it grows with the square of the length: about a minute at 128k) before the memory.

    python benchmarks/long_context.py --stack slimtune --model /tmp/anchor_model --cap-gib 16
    PYTHONPATH=/tmp/site_uns:/tmp/site_base python benchmarks/long_context.py --stack unsloth --cap-gib 16
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time


def slimtune_step(model_dir: str, max_len: int):
    import torch

    from slimtune.models.load import load_model
    from slimtune.peft import apply_method, freeze_base
    from slimtune.precision.policy import apply_precision, resolve_precision
    from slimtune.train.step import train_step

    dev = torch.device("cuda")
    prec = resolve_precision("bf16-mixed", dev)
    model, cfg = load_model(model_dir, dtype=torch.bfloat16, device=dev, quantize="nf4")
    apply_method(model, {"method": "lora", "r": 16, "lora_alpha": 16, "target_modules": "all-linear"})
    freeze_base(model)
    apply_precision(model, prec)
    model.grad_ckpt = "offload"
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step(seq: int) -> float:
        ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seq))
        return train_step(model, [{"input_ids": ids, "labels": ids.clone()}], opt, None, prec, dev, 0.0,
                          params)["loss"]

    return step, cfg.vocab_size


def unsloth_step(model_dir: str, max_len: int):
    import unsloth  # noqa: F401  (before transformers / peft, as Unsloth requires)
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_dir, max_seq_length=max_len, load_in_4bit=True,
                                                 dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"],
                                             use_gradient_checkpointing="unsloth", random_state=3407,
                                             max_seq_length=max_len)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    V = model.config.vocab_size

    def step(seq: int) -> float:
        ids = torch.randint(0, V, (1, seq), generator=torch.Generator().manual_seed(seq)).cuda()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    return step, V


def trial(step, seq: int) -> dict:
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    try:
        loss = step(seq)
        torch.cuda.synchronize()
        ok, err = True, None
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:  # (some kernels report it as a plain RuntimeError)
        if "out of memory" not in str(e).lower():
            raise
        ok, err, loss = False, str(e).split("\n")[0][:160], None
    dt = time.perf_counter() - t
    return {"seq": seq, "ok": ok, "seconds": round(dt, 1), "tokens_per_s": round(seq / dt, 1) if ok else None,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "loss": loss, "error": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stack", choices=["slimtune", "unsloth"], required=True)
    ap.add_argument("--model", default="/tmp/anchor_model")
    ap.add_argument("--start", type=int, default=16384)
    ap.add_argument("--max", type=int, default=1 << 20)
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop trying once this much stepping is spent")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--cap-gib", type=float, help="use at most this much GPU memory (a smaller card on a big one)")
    a = ap.parse_args()
    if a.cap_gib:
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(a.cap_gib * 2**30 / total)
    step, _ = (slimtune_step if a.stack == "slimtune" else unsloth_step)(a.model, a.max)
    rows, good, bad, spent, seq = [], 0, None, 0.0, a.start
    while spent < a.budget_s:
        r = {"stack": a.stack, **trial(step, seq)}
        rows.append(r)
        spent += r["seconds"]
        print(json.dumps(r), flush=True)
        if r["ok"]:
            good = seq
        else:
            bad = seq
        if bad is None:
            if seq * 2 > a.max:
                break
            seq *= 2
        elif bad - good <= 0.1 * good or good == 0 and bad <= a.start:
            break
        else:
            seq = (good + bad) // 2 // 1024 * 1024
    summary = {"stack": a.stack, "cap_gib": a.cap_gib, "longest_ok": good, "first_failed": bad, "stepping_s": round(spent, 1),
               "within_10pct": bad is not None and good > 0 and bad - good <= 0.1 * good, "trials": len(rows)}
    print(json.dumps({"summary": summary}))
    with open(os.path.join(a.out, "long_context.jsonl"), "a") as fh:
        for r in rows + [{"summary": summary}]:
            fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
