"""The LoRA autograd Function: forward and every gradient (x, each A, each B, bias) against autograd over the plain
math in float64 (1e-12), against today's LoraLinear over QuantLinear in fp32 (1e-5) and bf16 (2e-2 of the fp64
truth); several projections with different ranks sharing x; the op structure (one base matmul, one x A_cat^T); the
dropout fallback; DoRA and plain layers; `base_last` (the base product in a node of its own that saves nothing)
against the same float64 truth, for dense, per-projection and dequantized bases."""
import pytest
import torch
from kernel_helpers import rel
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from slimtune import kernels
from slimtune.kernels.lora import lora_linear, lora_linear_reference
from slimtune.models.projections import project, stacked_weight
from slimtune.peft.lora import LoraLinear
from slimtune.quant.linear import QuantLinear


def lora_layers_forward(x, layers):
    """The decoder's fused projections (kernels forced on; on the CPU the LoRA Function runs as plain PyTorch)."""
    with kernels.use("on"):
        return torch.cat(project(x, layers), -1)

PARTS = [12, 6, 6]  # q, k, v widths


def _factors(parts, d_in, ranks, dtype):
    """(A, B, scale, part) with fresh random values (B not zero: the adapter must matter)."""
    out = []
    for i, (p, r) in enumerate(ranks):
        A = torch.randn(r, d_in, dtype=dtype).requires_grad_()
        B = torch.randn(parts[p], r, dtype=dtype).requires_grad_()
        out.append((A, B, 0.5 + i, p))
    return out


def _grads(y, tensors, g):
    return torch.autograd.grad(y, tensors, g)


@pytest.mark.parametrize("lead", [(7,), (2, 5)])
def test_float64_against_autograd(lead):
    torch.manual_seed(0)
    d = 10
    x = torch.randn(*lead, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(sum(PARTS), d, dtype=torch.float64)
    b = torch.randn(sum(PARTS), dtype=torch.float64, requires_grad=True)
    ads = _factors(PARTS, d, [(0, 2), (1, 3), (2, 1), (0, 4)], torch.float64)  # two adapters on q, ranks differ
    params = [x, b] + [a[0] for a in ads] + [a[1] for a in ads]
    y = lora_linear(x, W, b, ads, PARTS)
    want = lora_linear_reference(x, W, b, ads, PARTS)
    g = torch.randn_like(want)
    assert y.shape == (*lead, sum(PARTS)) and rel(y, want) < 1e-12
    for got, ref in zip(_grads(y, params, g), _grads(want, params, g)):
        assert rel(got, ref) < 1e-12


@pytest.mark.parametrize("kind", ["dense", "split", "callable"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_base_last_against_float64(kind, dropout):
    torch.manual_seed(1)
    d, f64 = 10, torch.float64
    x = torch.randn(2, 5, d, dtype=f64, requires_grad=True)
    W = torch.randn(sum(PARTS), d, dtype=f64)
    b = torch.randn(sum(PARTS), dtype=f64, requires_grad=True)
    ads = _factors(PARTS, d, [(0, 2), (1, 3), (2, 1)], f64)
    params = [x, b] + [a[0] for a in ads] + [a[1] for a in ads]
    weight = {"dense": W, "split": list(W.split(PARTS)), "callable": lambda dt: W.to(dt)}[kind]
    outs = []
    for base_last in (True, False):
        torch.manual_seed(5)  # the same dropout masks
        y = lora_linear(x, weight, b, ads, PARTS, dropout, True, base_last)
        g = torch.randn_like(y, generator=torch.Generator().manual_seed(2))
        outs.append((y, _grads(y, params, g)))
    torch.manual_seed(5)
    want = lora_linear_reference(x, W, b, ads, PARTS, dropout, True)
    want_grads = _grads(want, params, g)
    for y, grads in outs:
        assert rel(y, want) < 1e-12
        for got, ref in zip(grads, want_grads, strict=True):
            assert rel(got, ref) < 1e-12


class _Ops(TorchDispatchMode):
    """Counts matmuls and casts."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_callable_weight_dequantized_once_per_pass_and_op_structure():
    torch.manual_seed(1)
    d = 16
    W = torch.randn(sum(PARTS), d)
    calls = []

    def load(dtype):
        calls.append(dtype)
        return W.to(dtype)

    x = torch.randn(3, 4, d, requires_grad=True)
    ads = _factors(PARTS, d, [(0, 2), (1, 2), (2, 2)], torch.float32)
    with _Ops() as fwd:
        y = lora_linear(x, load, None, ads, PARTS)
    mms = [o for o in fwd.ops if o in ("mm", "addmm", "addmm_")]
    assert mms == ["mm", "mm", "addmm_", "addmm_", "addmm_"]  # x W^T, x A_cat^T, then one B per projection
    assert calls == [torch.float32]
    y.backward(torch.randn_like(y))
    assert len(calls) == 2  # dequantized again in backward, not saved
    want = lora_linear_reference(x, W, None, ads, PARTS)
    assert rel(y, want) < 1e-6


def test_bf16_casts_masters_once():
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    ads = _factors(PARTS, 16, [(0, 2), (1, 3), (2, 4)], torch.float32)
    with _Ops() as m:
        lora_linear(x, torch.randn(sum(PARTS), 16, dtype=torch.bfloat16), None, ads, PARTS)
    assert m.ops.count("cat") == 1 and m.ops.count("_to_copy") == 1  # six factors: one concatenation, one cast


def _qkv(dtype, dropout=0.0, dora=False, bias=False):
    """q, k, v: LoraLinear over 4-bit QuantLinear (double quantized), adapters with random (nonzero) B."""
    torch.manual_seed(2)
    layers = []
    for o, r in zip(PARTS, (4, 2, 3)):
        lin = nn.Linear(32, o, bias=bias)
        m = LoraLinear(QuantLinear.from_linear(lin, "nf4", double_quant=True))
        m.base_layer.compute_dtype = dtype
        m.add("default", r, 2 * r, dropout=dropout, dora=dora)
        with torch.no_grad():
            m.lora_B["default"].weight.normal_()
        m.set_active(["default"])
        layers.append(m)
    return layers


def _lora_params(layers):
    return [p for m in layers for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]


@pytest.mark.parametrize("bias", [False, True])
def test_fp32_equals_lora_linear_over_quant_linear(bias):
    layers = _qkv(torch.float32, bias=bias)
    x = torch.randn(2, 3, 32, requires_grad=True)
    params = [x] + _lora_params(layers)
    y = lora_layers_forward(x, layers)
    want = torch.cat([m(x) for m in layers], -1)
    g = torch.randn_like(want)
    assert rel(y, want) < 1e-5
    for got, ref in zip(_grads(y, params, g), _grads(want, params, g)):
        assert rel(got, ref) < 1e-5
        assert got.dtype == ref.dtype


def test_bf16_close_to_float64_truth():
    """bf16 compute (adapters in bf16 from fp32 masters): within 2e-2 of the fp64 math, as close as today's path."""
    layers = _qkv(torch.bfloat16)
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    y = lora_layers_forward(x, layers)
    W = torch.cat([m.base_layer.dequantize(torch.float64) for m in layers])
    ads = [(m.lora_A["default"].weight.double(), m.lora_B["default"].weight.double(), m.scaling["default"], p)
           for p, m in enumerate(layers)]
    truth = lora_linear_reference(x.double(), W, None, ads, PARTS)
    today = torch.cat([m(x) for m in layers], -1)
    assert y.dtype == torch.bfloat16
    assert rel(y, truth) < 2e-2 and rel(y, truth) < 2 * rel(today, truth) + 4e-3
    g = torch.randn_like(y)
    gx, gA = _grads(y, [x, layers[0].lora_A["default"].weight], g)
    tx, tA = _grads(truth, [x, layers[0].lora_A["default"].weight], g.double())
    assert rel(gx, tx) < 2e-2 and rel(gA, tA) < 2e-2 and gA.dtype == torch.float32


def test_dropout_falls_back_with_the_same_masks():
    layers = [m.train() for m in _qkv(torch.float32, dropout=0.3)]
    x = torch.randn(6, 32, requires_grad=True)
    torch.manual_seed(5)
    y = lora_layers_forward(x, layers)
    torch.manual_seed(5)
    want = torch.cat([m(x) for m in layers], -1)
    assert rel(y, want) < 1e-5
    g = torch.randn_like(y)
    for got, ref in zip(_grads(y, [x] + _lora_params(layers), g), _grads(want, [x] + _lora_params(layers), g)):
        assert rel(got, ref) < 1e-5


def test_dora_and_plain_layers():
    x = torch.randn(3, 32)
    dora = _qkv(torch.float32, dora=True)
    assert rel(lora_layers_forward(x, dora), torch.cat([m(x) for m in dora], -1)) < 1e-6
    plain = [m.base_layer for m in _qkv(torch.float32)]  # no adapter: plain quantized linears, one matmul
    y = lora_layers_forward(x, plain)
    assert rel(y, torch.cat([m(x) for m in plain], -1)) < 1e-6
    assert torch.equal(stacked_weight(plain)(torch.float32), torch.cat([m.dequantize(torch.float32) for m in plain]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_bases_without_stacking(dtype):
    """LoRA over plain frozen nn.Linear (q,k,v with biases, as Qwen2): one matmul per projection into its columns;
    a trainable base weight keeps each layer's own forward."""
    torch.manual_seed(6)
    layers = []
    for o in PARTS:
        m = LoraLinear(nn.Linear(32, o, bias=True).to(dtype).requires_grad_(False))
        m.add("default", 3, 6)
        with torch.no_grad():
            m.lora_B["default"].weight.normal_()
        m.set_active(["default"])
        layers.append(m)
    x = torch.randn(2, 5, 32, dtype=dtype, requires_grad=True)
    params = [x] + _lora_params(layers)
    with _Ops() as ops:
        y = lora_layers_forward(x, layers)
    assert "cat" in ops.ops and ops.ops.count("addmm_") == 6  # 3 base projections + 3 adapters, no stacked copy
    want = torch.cat([m(x) for m in layers], -1)
    g = torch.randn_like(want)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(y, want) < tol
    for got, ref in zip(_grads(y, params, g), _grads(want, params, g)):
        assert rel(got, ref) < tol
    layers[0].base_layer.weight.requires_grad_(True)
    assert torch.equal(lora_layers_forward(x, layers), torch.cat([m(x) for m in layers], -1))


def test_bad_arguments_raise():
    W = torch.randn(8, 4)
    A, B = torch.randn(2, 4), torch.randn(7, 2)
    with pytest.raises(ValueError, match="do not fit"):
        lora_linear(torch.randn(3, 4), W, None, [(A, B, 1.0, 0)])
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(torch.randn(3, 4), W.requires_grad_(), None)
    with pytest.raises(ValueError, match="parts"):
        lora_linear(torch.randn(3, 4), lambda dt: W, None)
