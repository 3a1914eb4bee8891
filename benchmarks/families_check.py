"""GPU check of Gemma 2, Gemma 3 (text), Phi-3 and the transformers fallback on tiny random models. The CPU tests
compare fp32 logits with the PyTorch references; this runs the CUDA paths: the fused kernels (RMSNorm, RoPE on
partial rotary dims, the LoRA projections over qkv_proj / gate_up_proj), SDPA with scale=, the soft-capped math
attention, CUDA-graph decoding with per-layer sliding windows (KVCache.window_mask), LongRoPE's cache refill, graphed
training steps, and a fallback (GPT-2) run. One line per check, then a summary; exits 1 if a check failed.

    python benchmarks/families_check.py                 # CUDA (about a minute)
    python benchmarks/families_check.py --device cpu    # smoke test of this script
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_hf_model  # noqa: E402  (the tiny random transformers models of the tests)

from slimtune.data import sample_path  # noqa: E402
from slimtune.generate import SamplingConfig, generate  # noqa: E402
from slimtune.models.load import load_model  # noqa: E402
from slimtune.models.tiny import builtin_tokenizer  # noqa: E402
from slimtune.train import load_config, train  # noqa: E402

ARCHS = ["gemma2", "gemma3_text", "phi3", "phi3_longrope"]
RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, fn) -> None:
    try:
        ok, info = fn()
    except Exception as e:  # report and go on: one failing case must not hide the others
        traceback.print_exc()
        ok, info = False, f"{type(e).__name__}: {e}"
    RESULTS.append((name, ok, info))
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {info}", flush=True)


def folder_of(arch: str, root: Path) -> tuple[Path, torch.nn.Module]:
    ref = make_hf_model(arch)
    ref.save_pretrained(root / arch)
    builtin_tokenizer().save_pretrained(root / arch)
    return root / arch, ref


def logits_check(folder: Path, ref, dev: str, dtype: torch.dtype, tol: float):
    ours, _ = load_model(folder, dtype=dtype, device=dev)
    ref = ref.to(dev, dtype)
    ids = torch.randint(3, 300, (2, 24), device=dev)  # longer than the windows (8, 10) and longrope's 12
    am = torch.ones_like(ids)
    am[1, :5] = 0
    with torch.no_grad():
        a, b = ours(ids, attention_mask=am).float(), ref(ids, attention_mask=am).logits.float()
    diff = (a - b)[am.bool()].abs().max().item()
    return diff <= tol, f"max |logit diff| {diff:.3g} ({str(dtype)[6:]}, tol {tol:g})"


def graph_check(folder: Path, dev: str):
    ours, _ = load_model(folder, device=dev)
    ids = torch.randint(3, 300, (2, 6), device=dev)
    sc = SamplingConfig(max_new_tokens=30, stop_token_ids=[])
    eager = generate(ours, ids, sc=sc, cuda_graph=False)
    graphed = generate(ours, ids, sc=sc, cuda_graph=dev.startswith("cuda"))
    same = eager.tolist() == graphed.tolist()
    return same, "CUDA-graph decoding (36 positions, past the windows) equals eager decoding" if same else \
        f"eager {eager[0].tolist()} vs graphed {graphed[0].tolist()}"


def train_check(folder: Path, out: Path, dev: str, *extra: str, lr: float = 3e-3):
    keys = [f"model={folder}", f"data={sample_path()}", "data_limit=32", "max_length=64", "batch_size=4", "max_steps=6",
            f"lr={lr}", "warmup_steps=0", f"device={dev}", f"out_dir={out}", "progress=false", "plot=false",
            "save_final=false", "seed=0", *extra]
    lines: list[str] = []
    s = train(load_config(None, keys), log=lines.append)
    import json

    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    ok = all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    how = next((x for x in lines if "CUDA graphs" in x or "transformers' own" in x), "graphed or eager: see log")
    return ok, f"losses {losses[0]:.4f} -> {losses[-1]:.4f}, {s['tokens_per_s']:.0f} tok/s; {how}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = args.device
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    root = Path(tempfile.mkdtemp(prefix="families_check_"))
    for arch in ARCHS:
        folder, ref = folder_of(arch, root)
        check(f"{arch} fp32 logits vs transformers", lambda: logits_check(folder, ref, dev, torch.float32, 1e-4))
        check(f"{arch} bf16 logits vs transformers", lambda: logits_check(folder, ref, dev, torch.bfloat16, 0.25))
        check(f"{arch} greedy decoding", lambda: graph_check(folder, dev))
        check(f"{arch} LoRA all-linear, bf16-mixed", lambda: train_check(
            folder, root / f"{arch}-lora", dev, "method=lora", "targets=all-linear", "precision=bf16-mixed"))
    gpt2 = root / "gpt2"
    import transformers

    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=320, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(gpt2)
    builtin_tokenizer().save_pretrained(gpt2)
    check("gpt2 (fallback) LoRA, bf16-mixed", lambda: train_check(  # its std-0.02 init starts at uniform logits
        gpt2, root / "gpt2-lora", dev, "method=lora", "targets=[c_attn,c_fc,c_proj]", "precision=bf16-mixed",
        lr=3e-2))
    failed = [n for n, ok, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)} of {len(RESULTS)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
