"""QAT (fake quantization + straight-through estimator, then conversion) beats PTQ on a tiny correlated regression;
BitNet b1.58 layers train, export to 2-bit packing and reload with identical outputs."""
import copy

import pytest
import torch
from torch import nn

from slimtune.errors import ConfigError
from slimtune.models.tiny import builtin_model
from slimtune.quant.bitnet import BitLinear, export_bitnet, prepare_bitnet
from slimtune.quant.codecs.ternary import act_quant_int8, pack_ternary, ternary_quant, unpack_ternary
from slimtune.quant.fake import FakeQuantLinear, QATConfig, convert_qat, fake_quantize, prepare_qat
from slimtune.quant.linear import QuantLinear

IN, OUT, N = 64, 16, 2048


def regression(seed=0):
    """Targets of a linear teacher on correlated inputs (so rounding errors of one weight can be compensated by
    others: the case where QAT can beat round-to-nearest PTQ)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=g) * 0.1
    mix = torch.randn(IN, IN, generator=g) / IN ** 0.5 + 0.2 * torch.eye(IN)
    x = torch.randn(N, IN, generator=g) @ mix
    return w, x, x @ w.T


def mse(m, x, y):
    with torch.no_grad():
        return ((m(x) - y) ** 2).mean().item()


def train(model, x, y, steps, lr):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def test_qat_int4_beats_ptq_after_conversion():
    w, x, y = regression()
    start = nn.Linear(IN, OUT, bias=False)
    with torch.no_grad():
        start.weight.copy_(w)  # the float optimum: PTQ's best case
    ptq = QuantLinear.from_linear(start, "int4", group_size=32)
    model = nn.Sequential(copy.deepcopy(start))
    assert prepare_qat(model, QATConfig("int4", 32), skip=()) == ["0"]
    assert mse(model, x, y) == pytest.approx(mse(ptq, x, y), rel=1e-6)  # step 0 of QAT is PTQ
    train(model, x, y, steps=100, lr=1e-4)
    fake_loss = mse(model, x, y)
    assert convert_qat(model) == ["0"] and isinstance(model[0], QuantLinear)
    assert mse(model, x, y) == pytest.approx(fake_loss, rel=1e-6)  # conversion changes nothing
    assert mse(model, x, y) < 0.85 * mse(ptq, x, y)


@pytest.mark.parametrize("fmt,act", [("int8", 8), ("int4", None), ("nf4", None)])
def test_fake_forward_equals_converted_layer(fmt, act):
    lin = nn.Linear(IN, OUT)
    fq = FakeQuantLinear(lin, QATConfig(fmt, None, act))
    x = torch.randn(3, 7, IN)
    real = fq.to_quant_linear()
    assert real.fmt == ("w8a8" if act else fmt)
    with torch.no_grad():
        assert torch.allclose(fq(x), real(x), atol=1e-5, rtol=1e-5)


def test_ste_gradient_is_gradient_at_quantized_weight():
    lin = nn.Linear(IN, OUT, bias=False)
    fq = FakeQuantLinear(lin, QATConfig("int4", 32))
    x = torch.randn(5, IN)
    fq(x).pow(2).sum().backward()
    wq = fake_quantize(lin.weight, "int4", 32).requires_grad_(True)
    (x @ wq.T).pow(2).sum().backward()
    assert torch.allclose(lin.weight.grad, wq.grad, atol=1e-6)


def test_qat_bad_config():
    with pytest.raises(ConfigError, match="unknown weight format"):
        QATConfig("fp4")
    with pytest.raises(ConfigError, match="does not divide"):
        prepare_qat(builtin_model(0), QATConfig("int4", 64))  # FFN width 688


def test_ternary_quant_and_packing():
    w = torch.randn(8, 32)
    t, gamma = ternary_quant(w)
    assert gamma.item() == pytest.approx(w.abs().mean().item(), rel=1e-6)
    assert set(t.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(t, torch.round(w / w.abs().mean()).clamp(-1, 1).to(torch.int8))
    p = pack_ternary(t)
    assert p.shape == (8, 8) and p.dtype == torch.uint8
    assert p[0, 0].item() == sum(int(t[0, k] + 1) << (6 - 2 * k) for k in range(4))  # element 4j highest
    assert torch.equal(unpack_ternary(p), t)


def test_act_quant_int8():
    x = torch.randn(4, 32)
    q = act_quant_int8(x)
    s = 127 / x.abs().amax(-1, keepdim=True)
    assert torch.allclose(q * s, torch.round(x * s), atol=1e-4)
    assert ((q - x).abs() <= 0.5 / s + 1e-6).all()


def test_bitlinear_trains():
    torch.manual_seed(0)
    _, x, y = regression(1)
    layer = BitLinear(IN, OUT)
    losses = train(layer, x[:512], y[:512], steps=150, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0]
    assert torch.isfinite(torch.tensor(losses)).all()


def test_bitnet_export_and_reload_identical():
    torch.manual_seed(0)
    model = builtin_model(0)
    names = prepare_bitnet(model)
    assert len(names) == 28 and isinstance(model.model.layers[0].self_attn.q_proj, BitLinear)
    ids = torch.randint(8, 264, (2, 16))
    losses = []
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):  # the whole decoder trains through the STE
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        before = model(ids)
    assert export_bitnet(model) == names
    q = model.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.fmt == "ternary" and q.weight.shape == (256, 688 // 4)
    with torch.no_grad():
        assert torch.allclose(model(ids), before, atol=1e-4, rtol=1e-4)
    sd = {k: v.clone() for k, v in q.state_dict().items()}
    fresh = QuantLinear(688, 256, "ternary", compute_dtype=torch.float32, device="meta")
    fresh.load_state_dict(sd, assign=True)
    x = torch.randn(3, 688)
    assert torch.equal(fresh(x), q(x))
