"""GPU check of slimtune.kernels on the Llama-3-8B shapes (d 4096, ffn 14336, kv 1024, vocab 128256): for each kernel
the relative error against its PyTorch reference, the median time of both (triton.testing.do_bench), bytes moved and
achieved bandwidth for the memory-bound ones, GPU launches per call (torch.profiler) and peak memory for the LoRA
layers and the loss. One failing case is printed and skipped; the table comes last; JSON goes to $OUT/kernels.json.

    python benchmarks/kernels_check.py            # H200: T = 2048 and 8192 tokens (about 2 minutes)
    python benchmarks/kernels_check.py --quick    # T = 2048 only, fewer repetitions
    TRITON_INTERPRET=1 python benchmarks/kernels_check.py --tiny    # CPU smoke test of this script (tiny shapes;
                                                                     # launches there count aten ops)
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from slimtune.train.loss import causal_lm_loss
from slimtune.models.config import ModelConfig
from slimtune.models.rope import Rotary
from slimtune.models.decoder import Block
from slimtune.kernels.cross_entropy import linear_cross_entropy
from slimtune import kernels
from slimtune.models.projections import project
from slimtune.kernels.rmsnorm import rms_norm
from slimtune.kernels.rope import apply_rope
from slimtune.kernels.swiglu import swiglu_packed
from slimtune.peft.lora import LoraLinear
from slimtune.quant.codecs.bnb import FourBitCodec
from slimtune.quant.codecs.fourbit import dequantize_4bit
from slimtune.quant.linear import QuantLinear

SHAPES = {"8b": dict(d=4096, f=14336, kv=1024, vocab=128256, nh=32, nkv=8, hd=128, r=16),
          "tiny": dict(d=64, f=96, kv=32, vocab=300, nh=4, nkv=2, hd=16, r=4)}
DRAM_BPS = 4.3e12  # H200 device-to-device copy, measured (shared/REFERENCE.md): the bandwidth floor's rate
MATMUL_FLOPS = 790e12  # H200 bf16 dense matmul, measured (shared/REFERENCE.md)


class Env:
    """Device, timing and counting helpers (CUDA: do_bench, profiler kernels, allocator peak; CPU: wall clock)."""

    def __init__(self, tiny: bool, quick: bool) -> None:
        self.dev = torch.device("cpu" if tiny else "cuda")
        self.kernels = True  # the Triton path (interpreted on the CPU with TRITON_INTERPRET=1)
        self.rep = 40 if quick else 100

    def ms(self, fn: Callable[[], object]) -> float:
        if self.dev.type == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=10, rep=self.rep, return_mode="median"))
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    def launches(self, fn: Callable[[], object]) -> int:
        """GPU kernels (and memsets / copies) one call runs; on the CPU, the aten ops it dispatches."""
        from torch.profiler import ProfilerActivity, profile

        fn()  # compiled and warm
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            fn()
            if self.dev.type == "cuda":
                torch.cuda.synchronize()
        kind = torch.autograd.DeviceType.CUDA if self.dev.type == "cuda" else torch.autograd.DeviceType.CPU
        evs = [e for e in prof.events() if e.device_type == kind]
        return len(evs) if self.dev.type == "cuda" else sum(e.name.startswith("aten::") for e in evs)

    def peak_gib(self, fn: Callable[[], object]) -> float:
        if self.dev.type != "cuda":
            return 0.0
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def on(fn: Callable) -> Callable:
    """fn run with the kernels on (the decoder's CUDA default)."""
    def run():
        with kernels.use("on"):
            return fn()
    return run


def off(fn: Callable) -> Callable:
    """fn run with the kernels off: the PyTorch reference path."""
    def run():
        with kernels.use("off"):
            return fn()
    return run


def rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def row(name: str, env: Env, ref: Callable, ker: Callable, err: float, nbytes: float = 0.0, flops: float = 0.0,
        **extra) -> dict:
    """Time both and build one result row; floor_ms = max(bytes / DRAM_BPS, flops / MATMUL_FLOPS)."""
    ref_ms, ker_ms = env.ms(ref), env.ms(ker)
    floor = max(nbytes / DRAM_BPS, flops / MATMUL_FLOPS) * 1e3
    out = dict(case=name, ref_ms=round(ref_ms, 4), kernel_ms=round(ker_ms, 4), speedup=round(ref_ms / ker_ms, 2),
               rel_err=float(f"{err:.3g}"), floor_ms=round(floor, 4))
    if nbytes:
        out["GBps"] = round(nbytes / ker_ms / 1e6, 1)
    return {**out, **extra}


def case_nf4(env: Env, s: dict, T: int) -> list[dict]:
    rows = []
    for o, i in ((s["d"], s["d"]), (s["f"], s["d"])):  # q_proj, gate_proj
        name = f"nf4 dequant {o}x{i}"
        w = torch.randn(o, i, device=env.dev, dtype=torch.bfloat16) * 0.02
        q = QuantLinear.from_weight(w, None, "nf4", double_quant=True); q = FourBitCodec.state(q)
        del w
        ref, ker = off(lambda: dequantize_4bit(q, torch.bfloat16)), on(lambda: dequantize_4bit(q, torch.bfloat16))
        got, want = ker(), ref()
        n = o * i
        nbytes = n / 2 + n * 2 + n / 64  # codes in, bf16 out, uint8 absmax in
        rows.append(row(name, env, ref, ker, rel(got, want), nbytes, bitwise_equal=bool(torch.equal(got, want)),
                        launches_ref=env.launches(ref), launches_kernel=env.launches(ker)))
    return rows


def _lora_layers(env: Env, outs: list[int], d_in: int, r: int) -> list[LoraLinear]:
    layers = []
    for o in outs:
        base = QuantLinear.from_weight(torch.randn(o, d_in, device=env.dev, dtype=torch.bfloat16) * 0.02, None,
                                       "nf4", double_quant=True)
        m = LoraLinear(base)
        m.add("default", r, r)
        with torch.no_grad():
            m.lora_B["default"].weight.normal_(0, 0.02)  # nonzero: the adapter path is exercised
        m.set_active(["default"])
        layers.append(m)
    return layers


def case_lora(env: Env, s: dict, T: int) -> list[dict]:
    rows = []
    groups = {"lora q,k,v": ([s["d"], s["kv"], s["kv"]], s["d"]), "lora gate,up": ([s["f"], s["f"]], s["d"]),
              "lora down": ([s["d"]], s["f"])}
    for name, (outs, d_in) in groups.items():
        layers = _lora_layers(env, outs, d_in, s["r"])
        x = (torch.randn(T, d_in, device=env.dev, dtype=torch.bfloat16)).requires_grad_()
        params = [x] + [p for m in layers for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
        gs = [torch.randn(T, o, device=env.dev, dtype=torch.bfloat16) for o in outs]

        @off
        def ref():  # each LoraLinear over QuantLinear on its own, the PyTorch path
            return torch.autograd.grad([m(x) for m in layers], params, gs)

        @on
        def ker():  # one fused call, as the decoder makes it
            return torch.autograd.grad(project(x, layers), params, gs)

        errs = [rel(a, b) for a, b in zip(ker(), ref())]
        flops = 3 * 2 * T * d_in * sum(outs)  # forward + input gradient + (recomputation is the caller's)
        rows.append(row(f"{name} fwd+bwd T={T}", env, ref, ker, max(errs), flops=flops * 2 / 3,
                        launches_ref=env.launches(ref), launches_kernel=env.launches(ker),
                        peak_ref_gib=round(env.peak_gib(ref), 3), peak_kernel_gib=round(env.peak_gib(ker), 3)))
        del layers
    return rows


def case_rmsnorm(env: Env, s: dict, T: int) -> list[dict]:
    x = torch.randn(T, s["d"], device=env.dev, dtype=torch.bfloat16).requires_grad_()
    w = (torch.rand(s["d"], device=env.dev, dtype=torch.bfloat16) + 0.5).requires_grad_()
    dy = torch.randn_like(x)

    def fb(kernels):
        return lambda: torch.autograd.grad(rms_norm(x, w, 1e-5, kernels=kernels), [x, w], dy)

    err = max(rel(a, b) for a, b in zip(fb(env.kernels)(), fb("off")()))
    fwd_err = rel(rms_norm(x, w, 1e-5, kernels=env.kernels), rms_norm(x, w, 1e-5, kernels="off"))
    n = T * s["d"] * 2
    return [row(f"rmsnorm fwd T={T}", env, lambda: rms_norm(x, w, 1e-5, kernels="off"),
                lambda: rms_norm(x, w, 1e-5, kernels=env.kernels), fwd_err, 2 * n),
            row(f"rmsnorm fwd+bwd T={T}", env, fb("off"), fb(env.kernels), err, 5 * n,
                launches_ref=env.launches(fb("off")), launches_kernel=env.launches(fb(env.kernels)))]


def case_rope(env: Env, s: dict, T: int) -> list[dict]:
    nh, nkv, hd = s["nh"], s["nkv"], s["hd"]
    qkv = torch.randn(1, T, (nh + 2 * nkv) * hd, device=env.dev, dtype=torch.bfloat16)
    q = qkv[..., :nh * hd].view(1, T, nh, hd).transpose(1, 2).detach().requires_grad_()
    k = qkv[..., nh * hd:(nh + nkv) * hd].view(1, T, nkv, hd).transpose(1, 2).detach().requires_grad_()
    ang = torch.arange(T, device=env.dev)[:, None] * 10000 ** (-torch.arange(0, hd, 2, device=env.dev) / hd)
    emb = torch.cat([ang, ang], -1)[None]
    cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
    dq, dk = torch.randn(1, nh, T, hd, device=env.dev, dtype=torch.bfloat16), torch.randn(1, nkv, T, hd,
                                                                                          device=env.dev,
                                                                                          dtype=torch.bfloat16)

    def fb(kernels):
        return lambda: torch.autograd.grad(apply_rope(q, k, cos, sin, kernels=kernels), [q, k], [dq, dk])

    outs = [apply_rope(q, k, cos, sin, kernels=kk) for kk in (env.kernels, "off")]
    err = max(rel(a, b) for a, b in zip(outs[0] + fb(env.kernels)(), outs[1] + fb("off")()))
    n = T * (nh + nkv) * hd * 2
    return [row(f"rope q,k fwd+bwd T={T}", env, fb("off"), fb(env.kernels), err, 4 * n + 2 * T * hd * 2,
                launches_ref=env.launches(fb("off")), launches_kernel=env.launches(fb(env.kernels)))]


def case_swiglu(env: Env, s: dict, T: int) -> list[dict]:
    gu = (torch.randn(T, 2 * s["f"], device=env.dev, dtype=torch.bfloat16) * 2).requires_grad_()
    dh = torch.randn(T, s["f"], device=env.dev, dtype=torch.bfloat16)

    def fb(kernels):
        return lambda: torch.autograd.grad(swiglu_packed(gu, kernels=kernels), [gu], dh)

    err = max(rel(swiglu_packed(gu, kernels=env.kernels), swiglu_packed(gu, kernels="off")),
              rel(fb(env.kernels)()[0], fb("off")()[0]))
    n = T * s["f"] * 2
    return [row(f"swiglu fwd+bwd T={T}", env, fb("off"), fb(env.kernels), err, 8 * n,
                launches_ref=env.launches(fb("off")), launches_kernel=env.launches(fb(env.kernels)))]


def case_cross_entropy(env: Env, s: dict, T: int) -> list[dict]:
    V, d = s["vocab"], s["d"]
    h = (torch.randn(1, T, d, device=env.dev, dtype=torch.bfloat16)).requires_grad_()
    W = torch.randn(V, d, device=env.dev, dtype=torch.bfloat16) * 0.02
    lab = torch.randint(0, V, (1, T), device=env.dev)
    lab[:, : T // 4] = -100  # a masked prompt

    def ref():
        loss, n = causal_lm_loss(F.linear(h, W), lab)
        return torch.autograd.grad(loss / n, [h])[0], loss

    def ker():
        loss, n = linear_cross_entropy(h, W, lab, kernels=env.kernels)
        return torch.autograd.grad(loss / n, [h])[0], loss

    (g1, l1), (g2, l2) = ker(), ref()
    return [row(f"linear+CE fwd+bwd T={T}", env, ref, ker, max(rel(g1, g2), rel(l1, l2)), flops=3 * 2 * T * V * d,
                peak_ref_gib=round(env.peak_gib(ref), 3), peak_kernel_gib=round(env.peak_gib(ker), 3),
                launches_ref=env.launches(ref), launches_kernel=env.launches(ker))]


def case_block(env: Env, s: dict, T: int) -> list[dict]:
    """One QLoRA decoder layer (NF4 + double quant, LoRA r on all 7 linears), forward + backward, the decoder's own
    `Block.forward` with kernels off (reference) and on: launches per layer and the step estimate with checkpointing
    (32 layers x (forward + recomputed forward + backward))."""
    cfg = ModelConfig(vocab_size=s["vocab"], hidden_size=s["d"], intermediate_size=s["f"], num_hidden_layers=1,
                      num_attention_heads=s["nh"], num_key_value_heads=s["nkv"])
    blk = Block(cfg, 0).to(env.dev, torch.bfloat16).requires_grad_(False)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"):
        m = LoraLinear(QuantLinear.from_linear(blk.get_submodule(name), "nf4", double_quant=True))
        m.add("default", s["r"], s["r"])
        with torch.no_grad():
            m.lora_B["default"].weight.normal_(0, 0.02)
        m.set_active(["default"])
        blk.set_submodule(name, m)
    cos, sin = Rotary(cfg)(torch.arange(T, device=env.dev)[None], torch.bfloat16)  # (1, T, hd) each
    x = torch.randn(1, T, s["d"], device=env.dev, dtype=torch.bfloat16).requires_grad_()
    params = [x] + [p for p in blk.parameters() if p.requires_grad]
    dy = torch.randn_like(x)

    @off
    def ref():
        return torch.autograd.grad(blk(x, cos, sin, None), params, dy)

    @on
    def ker():
        return torch.autograd.grad(blk(x, cos, sin, None), params, dy)

    err = max(rel(a, b) for a, b in zip([on(lambda: blk(x, cos, sin, None))()] + list(ker()),
                                        [off(lambda: blk(x, cos, sin, None))()] + list(ref())))
    with torch.no_grad():
        fwd = [env.launches(off(lambda: blk(x, cos, sin, None))), env.launches(on(lambda: blk(x, cos, sin, None)))]
    both = [env.launches(ref), env.launches(ker)]
    return [row(f"qlora layer fwd+bwd T={T}", env, ref, ker, err, launches_ref=both[0], launches_kernel=both[1],
                step_launches_ref=32 * (fwd[0] + both[0]), step_launches_kernel=32 * (fwd[1] + both[1]),
                peak_ref_gib=round(env.peak_gib(ref), 3), peak_kernel_gib=round(env.peak_gib(ker), 3))]


CASES = [case_block, case_nf4, case_lora, case_rmsnorm, case_rope, case_swiglu, case_cross_entropy]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T = 2048 only, fewer repetitions")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (run with TRITON_INTERPRET=1)")
    args = ap.parse_args()
    env = Env(args.tiny, args.quick)
    s = SHAPES["tiny" if args.tiny else "8b"]
    tokens = [16] if args.tiny else [2048] if args.quick else [2048, 8192]
    rows, t0 = [], time.perf_counter()
    for T in tokens:
        for case in CASES:
            if case is case_nf4 and T != tokens[0]:
                continue  # weight-only: once
            try:
                torch.manual_seed(0)
                got = case(env, s, T)
                for r in got:
                    print(json.dumps(r), flush=True)
                rows += got
            except Exception as e:  # one failing kernel must not stop the others
                traceback.print_exc()
                rows.append(dict(case=f"{case.__name__} T={T}", error=f"{type(e).__name__}: {e}"[:300]))
            if env.dev.type == "cuda":
                torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name() if env.dev.type == "cuda" else "cpu", torch=torch.__version__,
                seconds=round(time.perf_counter() - t0, 1))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "kernels.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    cols = ["case", "ref_ms", "kernel_ms", "speedup", "floor_ms", "GBps", "rel_err", "launches_ref",
            "launches_kernel", "step_launches_ref", "step_launches_kernel", "peak_ref_gib", "peak_kernel_gib",
            "error"]
    print(f"\n{meta}")
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
