"""QuantLinear: every format against an independent reference, exact packed sizes, gradients without a saved 16-bit
weight, state-dict round trips (meta + assign), whole-model quantization with its errors and reports."""
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtune.errors import CheckpointError, ConfigError, PrecisionError
from slimtune.models.tiny import builtin_model
from slimtune.quant.linear import QUANT_FORMATS, QuantLinear, prepare_quantized, quantize_model

OUT, IN = 48, 128


def make_linear(seed=0, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(OUT, IN, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(OUT, generator=g) * 0.1)
    return lin.to(dtype)


def x_of(seed=1, dtype=torch.float32):
    return torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(seed)).to(dtype)


EXPECTED_BYTES = {  # packed weight + scales + fp32 bias (OUT floats)
    "nf4": OUT * IN // 2 + OUT * IN // 64 * 1 + 4 * 1 + 4,  # double quant: u8 absmax, 1 nested absmax, offset
    "fp4": OUT * IN // 2 + OUT * IN // 64 * 1 + 4 * 1 + 4,
    "int8": OUT * IN + OUT * 4,
    "w8a8": OUT * IN + OUT * 4,
    "int4": OUT * IN // 2 + OUT * (IN // 64) * (4 + 1),
    "int3": OUT * IN * 3 // 8 + OUT * (IN // 64) * (4 + 1),
    "int2": OUT * IN // 4 + OUT * (IN // 64) * (4 + 1),
    "fp8": OUT * IN + OUT * 4,
    "ternary": OUT * IN // 4 + 4,
}


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
def test_packed_size_exact(fmt):
    q = QuantLinear.from_linear(make_linear(), fmt, double_quant=True)
    assert q.nbytes() == EXPECTED_BYTES[fmt] + OUT * 4


def test_int8_reference():
    lin = make_linear()
    q = QuantLinear.from_linear(lin, "int8")
    w = lin.weight.double()
    rowmax = w.abs().amax(1, keepdim=True)
    ref = torch.round(w / rowmax * 127).to(torch.int8)
    assert torch.equal(q.weight, ref) and torch.equal(q.SCB.double(), rowmax.view(-1))
    assert torch.allclose(q.dequantize(torch.float64), ref.double() * rowmax / 127, rtol=1e-6, atol=0)


def test_int4_reference_and_nibbles():
    lin = make_linear(3)
    q = QuantLinear.from_linear(lin, "int4", group_size=32)
    w = lin.weight.double().view(OUT, IN // 32, 32)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = (hi - lo) / 15
    zero = torch.round(-lo / scale)
    codes = (torch.round(w / scale[..., None]) + zero[..., None]).clamp(0, 15).view(OUT, IN).to(torch.uint8)
    assert torch.equal(q.weight[:, 0], codes[:, 0] * 16 + codes[:, 1])  # column 0 high nibble, column 1 low
    assert torch.equal(q.weight, codes[:, 0::2] * 16 + codes[:, 1::2])
    assert torch.equal(q.zeros, zero.to(torch.uint8))
    deq = ((codes.view(OUT, IN // 32, 32).double() - zero[..., None]) * scale[..., None]).view(OUT, IN)
    assert torch.allclose(q.dequantize(torch.float64), deq, rtol=1e-6, atol=1e-9)
    err = (q.dequantize(torch.float64) - lin.weight.double()).abs()
    assert bool((err <= scale.repeat_interleave(32, 1) / 2 + 1e-7).all())  # at most half a step


def test_fp8_reference():
    lin = make_linear(4)
    q = QuantLinear.from_linear(lin, "fp8")
    scale = lin.weight.abs().amax(1, keepdim=True) / 448
    ref = (lin.weight / scale).to(torch.float8_e4m3fn)
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.shape == (OUT, 1)
    assert (q.weight.float() - ref.float()).abs().max() <= 0  # same rounding
    assert q.weight.float().abs().amax(1).eq(448).all()  # every row's absmax maps to the largest value


def test_pack_bits_layout():
    from slimtune.quant.codecs.intk import pack_bits, pack_nibbles, unpack_bits

    g = torch.Generator().manual_seed(11)
    c4 = torch.randint(0, 16, (5, 64), generator=g, dtype=torch.uint8)
    assert torch.equal(pack_bits(c4, 4), pack_nibbles(c4))
    c3 = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)  # 001 010 011 100 101 110 111 000
    assert pack_bits(c3, 3).tolist() == [[0b00101001, 0b11001011, 0b10111000]]
    for bits in (2, 3, 4, 8):
        c = torch.randint(0, 2 ** bits, (3, 48), generator=g, dtype=torch.uint8)
        assert torch.equal(unpack_bits(pack_bits(c, bits), bits), c)


def test_fewer_bits_more_error():
    lin = make_linear(12)
    err = {f: (QuantLinear.from_linear(lin, f).dequantize(torch.float32) - lin.weight).norm().item()
           for f in ("int2", "int3", "int4", "int8")}
    assert err["int2"] > 1.8 * err["int3"] > 1.8 * 1.8 * err["int4"]
    assert err["int4"] > 5 * err["int8"]


def test_to_dtype_keeps_packed_buffers():
    model = builtin_model(0)
    quantize_model(model, "fp8")
    q = model.model.layers[0].self_attn.q_proj
    w, s = q.weight.clone(), q.weight_scale.clone()
    model.to(torch.bfloat16)  # must not round the fp32 scales nor re-encode the fp8 codes
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.dtype == torch.float32
    assert torch.equal(q.weight.float(), w.float()) and torch.equal(q.weight_scale, s)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(torch.randint(8, 264, (1, 8))).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8", "int4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_dequantized_linear(fmt, dtype):
    lin = make_linear(dtype=dtype)
    q = QuantLinear.from_linear(lin, fmt, double_quant=True)
    x = x_of(dtype=dtype)
    y = q(x)
    assert y.dtype == dtype
    assert torch.equal(y, F.linear(x, q.dequantize(dtype), lin.bias))
    tol = {"int8": 0.01, "fp8": 0.05, "int4": 0.1, "nf4": 0.12, "fp4": 0.15}[fmt]
    assert ((y.float() - lin(x).float()).norm() / lin(x).float().norm()) < tol


def test_w8a8_integer_path():
    lin = make_linear(5)
    q = QuantLinear.from_linear(lin, "w8a8")
    x = x_of(6)
    x2 = x.reshape(-1, IN).double()
    sx = x2.abs().amax(1, keepdim=True) / 127
    xq = torch.round(x2 / sx)
    acc = xq @ q.weight.double().t()  # exact integers in float64
    ref = acc * sx * (q.SCB.double() / 127) + lin.bias.double()
    y = q(x)
    assert torch.allclose(y.double().view(-1, OUT), ref, rtol=1e-5, atol=1e-6)
    assert ((y - lin(x)).norm() / lin(x).norm()) < 0.02


@pytest.mark.parametrize("fmt", ["nf4", "int4", "w8a8"])
def test_backward_reaches_input_without_saving_weight(fmt):
    lin = make_linear(7)
    q = QuantLinear.from_linear(lin, fmt)
    x = x_of(8).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = q(x)
    assert all(n < OUT * IN for n in saved)  # no dequantized weight kept for the backward
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g @ q.dequantize(torch.float32), atol=1e-6)
    assert q.bias.grad is None and not any(p.requires_grad for p in q.parameters())


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
def test_state_dict_roundtrip_meta_assign(fmt):
    lin = make_linear(9)
    q = QuantLinear.from_linear(lin, fmt, double_quant=True)
    sd = q.state_dict()
    fresh = QuantLinear(IN, OUT, fmt, bias=True, double_quant=True, compute_dtype=torch.float32, device="meta")
    fresh.load_state_dict(sd, assign=True)
    x = x_of(10)
    assert torch.equal(fresh(x), q(x))
    into = QuantLinear(IN, OUT, fmt, bias=True, double_quant=True, compute_dtype=torch.float32)
    into.load_state_dict(sd)  # copy into existing buffers
    assert torch.equal(into(x), q(x))


@pytest.mark.parametrize("fmt,key", [("nf4", "absmax"), ("int4", "scales"), ("int8", "SCB"), ("fp8", "weight_scale")])
def test_missing_scales_one_line(fmt, key):
    sd = QuantLinear.from_linear(make_linear(), fmt).state_dict()
    sd = {k: v for k, v in sd.items() if not k.endswith(key)}
    with pytest.raises(CheckpointError) as e:
        QuantLinear(IN, OUT, fmt, bias=True).load_state_dict(sd)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_bad_input_one_line():
    lin = make_linear()
    with pytest.raises(ConfigError) as e:
        QuantLinear.from_linear(lin, "int5")
    assert "unknown quantization format 'int5'" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="group size 48 does not divide its width 128"):
        QuantLinear.from_linear(lin, "int4", group_size=48, name="layer.x")
    with pytest.raises(ConfigError, match="per-channel"):
        QuantLinear.from_linear(lin, "int8", group_size=64)


def test_quantize_model_tiny():
    torch.manual_seed(0)
    model = builtin_model(0)
    ids = torch.randint(8, 264, (2, 24))
    with torch.no_grad():  # a graph would keep the weights alive
        ref = model(ids)
    linears = {n: weakref.ref(m.weight) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    rep = quantize_model(model, "nf4", measure_error=True)
    gc.collect()
    assert "lm_head" not in rep.layers and len(rep.layers) == 4 * 7
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert all(linears[n]() is None for n in rep.layers)  # every 16-bit weight freed
    assert rep.bytes_after == sum(model.get_submodule(n).nbytes() for n in rep.layers)
    assert rep.bytes_before / rep.bytes_after > 6.5  # fp32 -> ~4.13 bits
    assert all(0.05 < e < 0.12 for e in rep.errors.values())
    twin = builtin_model(0)  # the float model with every weight replaced by its dequantized value
    with torch.no_grad():
        for n in rep.layers:
            twin.get_submodule(n).weight.copy_(model.get_submodule(n).dequantize(torch.float32))
        out, out_twin = model(ids), twin(ids)
    assert torch.allclose(out, out_twin, atol=1e-5, rtol=1e-5)
    assert ((out - ref).norm() / ref.norm()) < 0.3  # 4 random layers, errors compound


def test_quantize_model_group_error_names_layer():
    model = builtin_model(0)  # FFN width 688 = 16 * 43: 64 does not divide it
    with pytest.raises(ConfigError) as e:
        quantize_model(model, "int4", group_size=64)
    msg = str(e.value)
    assert "model.layers.0.mlp.down_proj" in msg and "688" in msg and "\n" not in msg


def test_quantize_model_nan_and_outlier_reports():
    model = builtin_model(0)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[3, 7] = 5.0  # 250 x the 0.02 std
    rep = quantize_model(model, "int8")
    assert len(rep.outliers) == 1 and "model.layers.1.self_attn.k_proj.weight" in rep.outliers[0]
    model = builtin_model(0)
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[5, 1] = float("inf")
    with pytest.raises(PrecisionError) as e:
        quantize_model(model, "nf4")
    assert "model.layers.2.mlp.up_proj.weight" in str(e.value) and "row 5" in str(e.value)


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8", "fp8"])
def test_whole_model_safetensors_roundtrip(tmp_path, fmt):
    from safetensors.torch import load_file, save_file

    model = builtin_model(0)
    quantize_model(model, fmt, group_size=16 if fmt == "int4" else None)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    fresh = builtin_model(1)  # other weights: everything must come from the file
    prepare_quantized(fresh, fmt, group_size=16 if fmt == "int4" else None)
    assert isinstance(fresh.model.layers[0].self_attn.q_proj.weight, torch.Tensor)
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True, assign=True)
    ids = torch.randint(8, 264, (1, 12))
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
def test_from_weight_refuses_nan(fmt):
    w = make_linear().weight.detach().clone()
    w[7, 3] = float("nan")
    with pytest.raises(PrecisionError, match="tensor blk.w holds NaN or inf"):
        QuantLinear.from_weight(w, None, fmt, name="blk.w")


def test_quantized_model_trains_input_side_with_checkpointing():
    """Frozen NF4 base, trainable embeddings: the same gradients with and without activation checkpointing."""
    grads = []
    for ckpt in (False, True):
        model = builtin_model(0)
        quantize_model(model, "nf4")
        model.grad_ckpt = ckpt
        model.train()
        ids = torch.randint(8, 264, (2, 16), generator=torch.Generator().manual_seed(3))
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        grads.append(model.model.embed_tokens.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)
