"""The Triton kernels compile for the H200 (sm_90) with Triton's real compiler, no GPU needed: what the interpreter
does not check (types, layouts, constexpr use, pointer arithmetic); the PTX rounds fp32 -> bf16 to nearest even,
has no fused multiply-add where the reference rounds twice (NF4 double quantization, RoPE) and stores the NF4 output
16 bytes at a time. And the dispatch switch: SLIMTUNE_KERNELS=off, kernels="off", CPU without the interpreter, and
no Triton import before a kernel runs."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

import slimtune.kernels as kernels_pkg
from slimtune.kernels import enabled

COMPILE = r'''
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from slimtune.kernels import cross_entropy, nf4, rmsnorm, rope, swiglu

def compile(lazy, ptrs, consts, floats=(), fusion=True, aligned=False):
    k = lazy.build() if hasattr(lazy, "build") else lazy  # after a first build the module holds the JITFunction
    sig, attrs = {}, {}
    for i, p in enumerate(k.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            continue
        sig[p.name] = ptrs.get(p.name) or ("fp32" if p.name in floats else "i32")
        if aligned:  # as Triton specializes 16-aligned pointers and sizes divisible by 16 at launch
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(k, sig, constexprs={**consts, "EMULATE_RNE": False}, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 4, "enable_fp_fusion": fusion}).asm["ptx"]
    return {"fma": len(re.findall(r"\bfma\.rn\.(f32|bf16|f16)", ptx)), "v4_store": "st.global.v4" in ptx,
            "cvt_bf16": len(re.findall(r"cvt\.rn\.bf16(x2)?\.f32", ptx))}

out = {}
for dt in ("bf16", "fp16", "fp32"):
    for nested in (True, False):
        ptrs = {"out_ptr": "*" + dt}
        for w in "012":  # three weights: packed codes, absmax (uint8 when nested), nested absmax, offset, tables
            ptrs.update({"p" + w: "*u8", "a" + w: "*u8" if nested else "*fp32", "s" + w: "*fp32", "o" + w: "*fp32",
                         "c" + w: "*fp32", "d" + w: "*fp32"})
        out[f"nf4 {dt} {nested}"] = compile(nf4._dequant4_kernel, ptrs, dict(NUM=3, BLOCK=64, ROWS=64, NESTED=nested,
                                            NESTED_BLOCK=256), fusion=False, aligned=True)
for dt in ("bf16", "fp32"):
    t = "*" + dt
    out[f"rms fwd {dt}"] = compile(rmsnorm._rms_fwd, dict(X=t, W=t, Y=t, RSTD="*fp32"), dict(BLOCK=4096),
                                   floats=("inv_n", "eps"))
    out[f"rms bwd {dt}"] = compile(rmsnorm._rms_bwd, dict(DY=t, X=t, W=t, RSTD="*fp32", DX=t, DW="*fp32"),
                                   dict(ROWS_PER_PROGRAM=4, BLOCK=4096), floats=("inv_n",))
    for bwd in (False, True):
        out[f"rope {dt} {bwd}"] = compile(rope._rope_kernel, dict(Q=t, K=t, C=t, S=t, QO=t, KO=t),
                                          dict(HALF=64, HALF_P=64, QH_P=32, KH_P=8, BACKWARD=bwd), fusion=False)
    out[f"swiglu fwd {dt}"] = compile(swiglu._swiglu_fwd, dict(G=t, U=t, H=t), dict(BLOCK=1024))
    out[f"swiglu bwd {dt}"] = compile(swiglu._swiglu_bwd, dict(DH=t, G=t, U=t, DG=t, DU=t), dict(BLOCK=1024))
    for grad in (False, True):
        out[f"ce {dt} {grad}"] = compile(cross_entropy._ce_rows, dict(Z=t, TARGET="*i64", LOSS="*fp32"),
                                         dict(V=128256, WRITE_GRAD=grad, BLOCK=4096))
json.dump(out, sys.stdout)
'''


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="no Triton CUDA backend")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    r = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert len(res) == 22
    for name, info in res.items():
        if name.startswith(("nf4", "rope")):
            assert info["fma"] == 0, name  # the reference rounds after each multiply
        if name.startswith(("nf4 bf16", "ce bf16 True")):
            assert info["cvt_bf16"] > 0, name  # round-to-nearest-even conversions
    assert all(res[f"nf4 {dt} {n}"]["v4_store"] for dt in ("bf16", "fp16", "fp32") for n in (True, False))


def test_dispatch_switch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not enabled("cpu", True)  # no interpreter: the CPU takes the reference
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not enabled("cpu")  # auto: the CPU takes the reference even under the interpreter
    assert enabled("cpu", True) == (importlib.util.find_spec("triton") is not None)
    assert not enabled("cpu", "off") and not enabled("cuda", False)
    # SLIMTUNE_KERNELS is read once at import (kernels._ENV_MODE); a fresh process sees the variable
    monkeypatch.setattr(kernels_pkg, "_ENV_MODE", "off")
    assert not enabled("cuda") and not enabled("cpu")
    monkeypatch.setattr(kernels_pkg, "_ENV_MODE", "on")
    assert enabled("cpu") == (importlib.util.find_spec("triton") is not None)
    code = "import slimtune.kernels as k; print(k.enabled('cuda'))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "SLIMTUNE_KERNELS": "off"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]


def test_importing_kernels_does_not_import_triton():
    code = ("import sys, slimtune.kernels.nf4, slimtune.kernels.lora, slimtune.kernels.rmsnorm, "
            "slimtune.kernels.rope, slimtune.kernels.swiglu, slimtune.kernels.cross_entropy; "
            "print('triton' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]
