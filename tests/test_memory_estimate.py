"""The memory estimator against direct counts on real tiny models: parameters, gradients and optimizer states by dtype
after a real optimizer step, quantized weights, and the tensors autograd saves for backward (saved_tensors_hooks)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from slimtune.memory.estimate import estimate
from slimtune.memory.params import param_table
from slimtune.models.decoder import Decoder, init_weights
from slimtune.models.shapes import build_meta, get_shape

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
B, T = 2, 48


def _model(shape: str, dtype: torch.dtype, lora: dict | None = None, seed: int = 0) -> Decoder:
    cfg = get_shape(shape)
    m = init_weights(Decoder(cfg), seed).to(dtype)
    if lora is not None:
        from slimtune.peft import apply_method, freeze_base
        apply_method(m, {"method": "lora", **lora})
        freeze_base(m)
    return m.train()


def _batch(cfg, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, cfg.vocab_size, (B, T), generator=g), torch.randint(0, cfg.vocab_size, (B, T), generator=g))


def _saved_bytes(model: Decoder, autocast: bool, ckpt: bool) -> tuple[int, int]:
    """(activation bytes, autocast weight-copy bytes) kept for backward by forward + fp32 cross entropy: unique
    storages seen by saved_tensors_hooks, parameters excluded; with checkpointing, plus the block inputs the
    checkpoints hold (inner hooks hide the blocks' own saved tensors)."""
    model.grad_ckpt = ckpt
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[int, bool]] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            b = t._base if t._base is not None else t
            gf = b.grad_fn  # a weight's autocast copy: ToCopy whose input is a leaf (AccumulateGrad)
            cast = gf is not None and type(gf).__name__ == "ToCopyBackward0" and \
                type(gf.next_functions[0][0]).__name__ == "AccumulateGrad"
            saved[st.data_ptr()] = (st.nbytes(), cast)
        return t

    inputs: dict[int, int] = {}
    hooks = [blk.register_forward_pre_hook(lambda m, a: inputs.__setitem__(a[0].untyped_storage().data_ptr(),
                                                                            a[0].untyped_storage().nbytes()))
             for blk in model.model.layers]
    ids, labels = _batch(model.config)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(ids).float().flatten(0, 1), labels.flatten())
    for h in hooks:
        h.remove()
    loss.backward()  # the graph is valid
    act = sum(b for b, c in saved.values() if not c)
    if ckpt:
        act += sum(v for k, v in inputs.items() if k not in saved)
    return act, sum(b for b, c in saved.values() if c)


def _predicted_saved(e: dict, cfg, ckpt: bool, resid_bytes: int) -> int:
    d, L = e["detail"], cfg.num_hidden_layers
    blocks = (L * B * T * cfg.hidden_size * resid_bytes if ckpt else
              d["first_block_saved_bytes"] + (L - 1) * d["block_saved_bytes"])
    return blocks + d["shared_saved_bytes"] + d["head_saved_bytes"] + B * T * cfg.vocab_size * 4 + B * T * 8 + 4


@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen2", "tiny-qwen3", "gpt3-175b", "llama3-8b", "gemma2-9b",
                                   "gemma3-12b", "phi3-mini", "tiny-gemma2", "tiny-phi3"])
def test_param_table_matches_decoder(shape):
    meta = {n: tuple(p.shape) for n, p in build_meta(get_shape(shape)).named_parameters()}
    assert {p.name: p.shape for p in param_table(get_shape(shape))} == meta


def test_cli_offloaded_checkpointing_and_the_mlp_tile(capsys):
    """`--grad-ckpt offload` and `--mlp-tile` reach the estimator: the same figures as `estimate` called directly."""
    import json

    from slimtune.cli import main
    from slimtune.memory.estimate import estimate
    from slimtune.models.shapes import get_shape

    def cli(*extra):
        assert main(["memory", "--shape", "llama3-8b", "--method", "qlora", "--seq", "65536", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)["total_bytes"]

    cfg = get_shape("llama3-8b")
    tiled = estimate(cfg, "qlora", batch=1, seq=65536, grad_ckpt="offload")["total_bytes"]
    untiled = estimate(cfg, "qlora", batch=1, seq=65536, grad_ckpt="offload", mlp_tile=None)["total_bytes"]
    assert tiled < untiled
    assert cli("--grad-ckpt", "offload") == tiled
    assert cli("--grad-ckpt", "offload", "--mlp-tile", "0") == untiled
    assert cli("--grad-ckpt") == estimate(cfg, "qlora", batch=1, seq=65536, grad_ckpt=True)["total_bytes"]


@pytest.mark.parametrize("precision,dtype,autocast", [("fp32", torch.float32, False),
                                                      ("bf16-true", torch.bfloat16, False),
                                                      ("bf16-mixed", torch.float32, True)])
@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen2", "tiny-qwen3"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_full_saved_activations_match_hooks(precision, dtype, autocast, shape, ckpt):
    m = _model(shape, dtype)
    act, casts = _saved_bytes(m, autocast, ckpt)
    e = estimate(m.config, "full", precision, "adamw", B, T, ckpt, device="cpu", chunked_loss=False)
    assert act == _predicted_saved(e, m.config, ckpt, dtype.itemsize)
    if autocast and not ckpt:  # every linear weight's bf16 copy is kept, lm_head's included
        assert casts == e["detail"]["autocast_copies_forward_bytes"] > 0


@pytest.mark.parametrize("precision,dtype,autocast", [("fp32", torch.float32, False),
                                                      ("bf16-true", torch.bfloat16, False),
                                                      ("bf16-mixed", torch.bfloat16, True)])
@pytest.mark.parametrize("targets,dropout", [(("q_proj", "v_proj"), 0.0), (ALL, 0.0), (("q_proj", "down_proj"), 0.1)])
@pytest.mark.parametrize("ckpt", [False, True])
def test_lora_saved_activations_match_hooks(precision, dtype, autocast, targets, dropout, ckpt):
    m = _model("tiny", dtype, {"r": 8, "target_modules": list(targets), "lora_dropout": dropout})
    assert {p.dtype for n, p in m.named_parameters() if p.requires_grad} == {torch.float32}
    act, _ = _saved_bytes(m, autocast, ckpt)
    e = estimate(m.config, "lora", precision, "adamw", B, T, ckpt, lora_rank=8, lora_targets=targets, chunked_loss=False,
                 lora_dropout=dropout, device="cpu")
    assert act == _predicted_saved(e, m.config, ckpt, dtype.itemsize)


@pytest.mark.parametrize("precision,dtype,autocast", [("fp32", torch.float32, False),
                                                      ("bf16-true", torch.bfloat16, False),
                                                      ("bf16-mixed", torch.float32, True)])
@pytest.mark.parametrize("shape,targets", [("tiny-gemma2", None), ("tiny-gemma2", ("q_proj", "v_proj")),
                                           ("tiny-phi3", None), ("tiny-phi3", ("qkv_proj", "gate_up_proj"))])
@pytest.mark.parametrize("ckpt", [False, True])
def test_gemma_phi3_saved_activations_near_hooks(precision, dtype, autocast, shape, targets, ckpt):
    """Gemma 2 (sandwich and (1 + w) norms, soft-capped math attention, soft-capped logits) and Phi-3 (fused
    projections, a sliding window shorter than the sequence) within 2% of the bytes autograd saves. Not modelled:
    Gemma's two mask kinds (counted as one per block), the window mask a checkpoint keeps as its input."""
    lora = None if targets is None else {"r": 8, "target_modules": list(targets)}
    m = _model(shape, torch.bfloat16 if lora and autocast else dtype, lora)
    act, _ = _saved_bytes(m, autocast, ckpt)
    e = estimate(m.config, "lora" if lora else "full", precision, "adamw", B, T, ckpt, lora_rank=8,
                 lora_targets=targets or (), device="cpu", chunked_loss=False)
    got = _predicted_saved(e, m.config, ckpt, m.model.embed_tokens.weight.element_size())
    assert abs(got / act - 1) <= 0.02, (got, act)


def _bytes_by_dtype(tensors) -> dict[torch.dtype, int]:
    out: dict[torch.dtype, int] = {}
    for t in tensors:
        out[t.dtype] = out.get(t.dtype, 0) + t.numel() * t.element_size()
    return out


@pytest.mark.parametrize("method,precision,dtype", [("full", "fp32", torch.float32), ("full", "bf16-true", torch.bfloat16),
                                                    ("lora", "bf16-mixed", torch.bfloat16), ("lora", "fp32", torch.float32)])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_static_components_match_a_real_step(method, precision, dtype, optimizer):
    targets = ("q_proj", "v_proj", "down_proj")
    m = _model("tiny-qwen2", dtype, {"r": 4, "target_modules": list(targets)} if method == "lora" else None)
    ps = [p for p in m.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(ps, lr=1e-3) if optimizer == "adamw" else torch.optim.SGD(ps, lr=1e-3, momentum=0.9))
    ids, labels = _batch(m.config)
    F.cross_entropy(m(ids).float().flatten(0, 1), labels.flatten()).backward()
    opt.step()
    sdt = "bf16" if (dtype == torch.bfloat16 and method == "full") else "fp32"
    e = estimate(m.config, method, precision, optimizer, B, T, lora_rank=4, lora_targets=targets,
                 optim_state_dtype=sdt, sgd_momentum=0.9)
    frozen = sum(p.numel() * p.element_size() for p in m.parameters() if not p.requires_grad)
    train = sum(p.numel() * p.element_size() for p in ps)
    assert e["weights_bytes"] == frozen + (train if method == "full" else 0)
    assert e["trainable_bytes"] == (0 if method == "full" else train)
    assert e["detail"]["gradients_full_bytes"] == sum(_bytes_by_dtype(p.grad for p in ps).values())
    assert _bytes_by_dtype(p.grad for p in ps) == _bytes_by_dtype(ps)
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    assert e["optimizer_bytes"] == sum(_bytes_by_dtype(states).values())
    assert e["detail"]["trainable_params"] == sum(p.numel() for p in ps)


@pytest.mark.parametrize("fmt,dq,group", [("nf4", True, None), ("nf4", False, None), ("fp4", True, 128),
                                          ("int8", False, None), ("int4", False, 16), ("fp8", False, None)])
def test_quantized_weights_match_quant_linear(fmt, dq, group):
    from slimtune.quant import quantize_model
    m = _model("tiny", torch.bfloat16)
    quantize_model(m, fmt, group_size=group, double_quant=dq)
    held = sum(b.numel() * b.element_size() for b in m.buffers()) + \
        sum(p.numel() * p.element_size() for p in m.parameters())
    e = estimate(m.config, "qlora", "bf16-mixed", "adamw", B, T, quant_format=fmt, double_quant=dq,
                 quant_group=group)
    assert e["weights_bytes"] - e["detail"]["quant_tables_bytes"] == held


def test_textbook_7b_full_finetune_is_56_gb():
    # 7e9 parameters in 16-bit: 14 GB of weights; gradients 16-bit (14 GB) + Adam's two 16-bit states (28 GB)
    e = estimate(get_shape("tiny"), "full", "bf16-true", "adamw", 1, 1, weight_dtype="bf16", grad_dtype="bf16",
                 optim_state_dtype="bf16", params_override=7_000_000_000)
    assert e["weights_bytes"] == 14e9
    assert e["static_bytes"] - e["weights_bytes"] == 42e9 + 4  # + Adam's 4-byte step counter
    assert e["static_bytes"] == 56e9 + 4
    # the default bf16-true policy keeps fp32 states: 2 + 2 + 8 bytes per parameter
    e = estimate(get_shape("tiny"), "full", "bf16-true", "adamw", 1, 1, params_override=7_000_000_000)
    assert e["static_bytes"] == 84e9 + 4


def test_adamw8bit_states_are_a_quarter_plus_scales():
    cfg = get_shape("llama3-8b")
    e32 = estimate(cfg, "full", "bf16-true", "adamw", 1, 512)
    e8 = estimate(cfg, "full", "bf16-true", "adamw8bit", 1, 512)
    n = e32["detail"]["trainable_params"]
    assert 0.25 < e8["optimizer_bytes"] / e32["optimizer_bytes"] < 0.26
    assert e8["optimizer_bytes"] >= 2 * n * (1 + 4 / 256)


def test_checkpointing_and_qlora_lower_the_peak():
    cfg = get_shape("llama3-8b")
    lora = estimate(cfg, "lora", "bf16-mixed", "adamw", 1, 2048)
    ck = estimate(cfg, "lora", "bf16-mixed", "adamw", 1, 2048, grad_ckpt=True)
    q = estimate(cfg, "qlora", "bf16-mixed", "adamw", 1, 2048, grad_ckpt=True)
    assert q["total_bytes"] < ck["total_bytes"] < lora["total_bytes"]
    assert lora["activations_bytes"] > 8 * ck["activations_bytes"]
    # NF4 with double quant: 0.5 B/weight + 1 B per 64 + 4 B per 16384 for the block linears
    assert 0.5 < (q["weights_bytes"] - (cfg.vocab_size * 4096 * 2 * 2)) / (ck["weights_bytes"] / 2 -
                                                                          cfg.vocab_size * 4096 * 2) < 0.52
    g = estimate(cfg, "lora", "bf16-mixed", "adamw", 1, 16, generate=True, context=8192)
    assert g["kv_cache_bytes"] == 2 * 32 * 8 * 8192 * 128 * 2  # k and v, 32 layers, 8 KV heads, hd 128, bf16


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "slimtune", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args", [("memory", "--shape", "nope"), ("memory", "--shape", "tiny", "--batch", "-1"),
                                  ("plan", "--shape", "llama3-8b", "--gpu-memory", "2GiB"),
                                  ("plan", "--shape", "tiny", "--gpu-memory", "lots")])
def test_cli_bad_input_is_one_line_exit_2(args):
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_cli_json_is_one_object():
    import json
    r = _cli("memory", "--shape", "llama3-8b", "--method", "qlora", "--grad-ckpt", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["total_bytes"] > d["weights_bytes"] > 0
    r = _cli("plan", "--shape", "llama3-8b", "--gpu-memory", "24GiB", "--seq", "2048", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert sum(r["fastest"] for r in rows) == 1
    assert all(r["fits"] or r["reason"] for r in rows)


@pytest.mark.parametrize("precision,dtype,autocast", [("fp32", torch.float32, False),
                                                      ("bf16-mixed", torch.bfloat16, True)])
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ALL])
@pytest.mark.parametrize("ckpt", [False, True])
def test_lora_saved_activations_on_the_kernels_path(precision, dtype, autocast, targets, ckpt):
    """The CUDA path (fused RMSNorm / RoPE / SwiGLU kernels, one LoRA Function per projection group), run on the CPU
    through Triton's interpreter: what it saves for backward is what `block_saved_kernels` counts."""
    from slimtune import kernels

    m = _model("tiny", dtype, {"r": 8, "target_modules": list(targets)})
    with kernels.use("on"):
        act, _ = _saved_bytes(m, autocast, ckpt)
    e = estimate(m.config, "lora", precision, "adamw", B, T, ckpt, lora_rank=8, lora_targets=targets,
                 chunked_loss=False, device="cpu", kernels=True)
    assert act == _predicted_saved(e, m.config, ckpt, dtype.itemsize)


def test_plan_table_names_offloaded_checkpointing(capsys):
    """A grad_ckpt=offload row reads 'offload' in the ckpt column, not 'yes' (two rows looked alike before)."""
    from slimtune.cli import main

    assert main(["plan", "--shape", "llama3-8b", "--gpu-memory", "16GiB", "--seq", "2048"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    ckpt = {r[1] if r[0] != "*" else r[2] for r in rows if r}
    assert {"no", "yes", "offload"} <= ckpt


# Peaks measured on one H200 (torch.cuda.max_memory_allocated, GiB), Llama-3-8B shape, bf16-mixed, AdamW, LoRA r=16
# on the 7 projections; the runs and commands are in benchmarks/memory.md (vs_unsloth, long_context, fsdp_8b).
H200_PEAKS = [
    (dict(method="qlora", batch=1, seq=2048, grad_ckpt=True), 6.89),
    (dict(method="qlora", batch=4, seq=2048, grad_ckpt=True), 9.56),
    (dict(method="qlora", batch=4, seq=2048, grad_ckpt=False), 45.01),
    (dict(method="lora", batch=1, seq=2048, grad_ckpt=True), 16.47),
    (dict(method="qlora", batch=1, seq=2048, grad_ckpt=True, kernels=False, chunked_loss=False), 9.31),
    (dict(method="qlora", batch=1, seq=32768, grad_ckpt="offload", mlp_tile=None), 13.02),
    (dict(method="qlora", batch=1, seq=65536, grad_ckpt="offload", mlp_tile=None), 20.67),
    (dict(method="qlora", batch=1, seq=131072, grad_ckpt="offload", mlp_tile=None), 35.34),
    (dict(method="qlora", batch=1, seq=32768, grad_ckpt="offload"), 10.24),
    (dict(method="qlora", batch=1, seq=65536, grad_ckpt="offload"), 13.86),
    (dict(method="qlora", batch=1, seq=73728, grad_ckpt="offload"), 15.19),
    (dict(method="qlora", batch=1, seq=77824, grad_ckpt="offload"), 15.70),
    (dict(method="lora", batch=1, seq=2048, grad_ckpt=True, chunked_loss=False), 19.10),
    (dict(method="lora", batch=1, seq=2048, grad_ckpt=True, chunked_loss=False, gpus=2), 11.23),
    # second session (runs/2026-11-30-vs_unsloth-levers.jsonl), predicted before the call
    (dict(method="qlora", batch=1, seq=2048, grad_ckpt=True, ckpt_blocks=24), 8.97),
    (dict(method="qlora", batch=1, seq=2048, grad_ckpt="offload", host_embedding=True), 5.55),
    (dict(method="qlora", batch=4, seq=2048, grad_ckpt=True, ckpt_blocks=16), 26.74),
    (dict(method="lora", batch=1, seq=2048, grad_ckpt=True, ckpt_blocks=22), 19.20),
    (dict(method="lora", batch=1, seq=2048, grad_ckpt=False), 25.53),
    # third session (runs/2026-11-30-vs_unsloth-base_last.jsonl, runs/2026-11-30-fsdp_qlora_fp32storage_x2.txt),
    # predicted before the calls
    (dict(method="lora", batch=1, seq=2048, grad_ckpt=True, ckpt_blocks=18, host_embedding=True), 19.37),
    (dict(method="lora", batch=1, seq=2048, grad_ckpt=True, ckpt_blocks=19, host_embedding=True), 19.09),
    (dict(method="qlora", batch=4, seq=2048, grad_ckpt=True, chunked_loss=False, gpus=2, fsdp_reshard=False), 22.24),
    (dict(method="qlora", batch=6, seq=2048, grad_ckpt=True, chunked_loss=False, gpus=2, fsdp_reshard=False), 29.15),
    (dict(method="qlora", batch=6, seq=2048, grad_ckpt=True, chunked_loss=False), 26.73),
]


@pytest.mark.parametrize("kw,measured", H200_PEAKS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items())
                         if isinstance(v, dict) else str(v))
def test_predictions_against_the_h200_peaks(kw, measured):
    from slimtune.memory.estimate import estimate
    from slimtune.models.shapes import get_shape

    predicted = estimate(get_shape("llama3-8b"), **kw)["total_bytes"] / 2**30
    assert abs(predicted / measured - 1) < 0.05, (predicted, measured)
