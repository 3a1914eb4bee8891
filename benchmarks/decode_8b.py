"""Forward and greedy decoding of the 8B shape with random bf16 weights on CUDA, beside transformers on the same
weights (shared storage, no second copy).

    python benchmarks/decode_8b.py [--shape llama3-8b] [--prompt-len 128] [--new 256]

Prints one JSON line: prefill time of a 2048-token sequence, greedy decode tokens/s at batch 1 for slimtune and for
transformers' `generate`, the relative logit difference between the two, and whether the greedy ids agree.
"""
import argparse
import json
import time

import torch


def materialise(model, device, seed=0):
    """Random normal(0, 0.02) bf16 weights on `device` (norms at 1), for a model built on the meta device."""
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    return model


def timed(fn, device):
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--quant", choices=["nf4"], help="quantize the linear layers first (NF4 + double quant); the "
                                                     "transformers comparison is then skipped")
    a = ap.parse_args()
    from slimtune.generate import SamplingConfig, generate
    from slimtune.models.shapes import build_meta, get_shape

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = get_shape(a.shape).replace(dtype="bfloat16")
    model = materialise(build_meta(cfg), dev).to(torch.bfloat16).eval()
    if a.quant:
        from slimtune.quant.linear import quantize_model

        quantize_model(model, a.quant)
        a.no_hf = True
        bw = sum(b.numel() * b.element_size() for b in model.buffers()) + \
            sum(p.numel() * p.element_size() for p in model.parameters())
        floor = bw / 4.3e12  # every weight byte read once per token at the measured copy bandwidth
        print(json.dumps({"quant": a.quant, "weight_gib": round(bw / 2**30, 2),
                          "bandwidth_floor_tok_s": round(1 / floor, 1)}))
    V = cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    long_ids = torch.randint(0, V, (1, min(2048, cfg.max_position_embeddings)), generator=g).to(dev)
    ids = long_ids[:, :a.prompt_len]
    res = {"shape": a.shape, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "torch": torch.__version__}
    with torch.no_grad():
        model(long_ids[:, :64])  # warm-up
        sc = SamplingConfig(max_new_tokens=a.new, stop_token_ids=[])
        model(long_ids)  # warm-up at this shape too (cuDNN builds a plan per shape)
        _, res["prefill_2048_s"] = timed(lambda: model(long_ids), dev)
        for graph in ((False, True) if dev.type == "cuda" else (False,)):
            generate(model, ids, sc=SamplingConfig(max_new_tokens=8, stop_token_ids=[]), cuda_graph=graph)
            ours, dt = timed(lambda: generate(model, ids, sc=sc, cuda_graph=graph), dev)
            res["slimtune_decode_tok_s" + ("_cuda_graph" if graph else "_eager")] = round(a.new / dt, 1)
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None
        if not a.no_hf:
            import transformers

            hcfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures",)})
            with torch.device("meta"):
                hf = transformers.AutoModelForCausalLM.from_config(hcfg, dtype=torch.bfloat16)
            hf.load_state_dict(model.state_dict(), assign=True, strict=False)
            hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hcfg, device=dev)  # its buffer was on meta
            hf.eval()
            ref = hf(long_ids[:, :256]).logits.float()
            mine = model(long_ids[:, :256]).float()
            res["rel_logit_diff_vs_hf"] = float((mine - ref).norm() / ref.norm())
            hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
            theirs, dt = timed(lambda: hf.generate(ids, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False,
                                                   eos_token_id=None, pad_token_id=0), dev)
            res["hf_decode_tok_s"] = round(a.new / dt, 1)
            n = min(ours.shape[1], theirs.shape[1] - ids.shape[1])
            same = (ours[0, :n] == theirs[0, ids.shape[1]:ids.shape[1] + n])
            res["greedy_ids_agree_prefix"] = int(same.long().cumprod(0).sum())
    print(json.dumps(res))


if __name__ == "__main__":
    main()
