"""Precision policies on a tiny model: each trains, fp16 overflow skips the step, adapters stay fp32 under a 16-bit
base, bf16 is refused on a GPU without it, and the fp32-state AdamW matches torch's AdamW."""
from __future__ import annotations

import pytest
import torch

from slimtune.errors import PrecisionError
from slimtune.models.config import ModelConfig
from slimtune.models.decoder import Decoder, init_weights
from slimtune.peft import apply_method, freeze_base
from slimtune.optim.adamw import AdamWFp32State
from slimtune.precision.policy import apply_precision, resolve_precision
from slimtune.train.step import train_step

CPU = torch.device("cpu")


def tiny(seed: int = 0) -> Decoder:
    cfg = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return init_weights(Decoder(cfg), seed, std=0.05)


def batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 72, (4, 32), generator=g)  # a small alphabet: learnable in a few steps
    return {"input_ids": ids, "labels": ids.clone()}


def setup(policy: str, method: str):
    model = tiny()
    prec = resolve_precision(policy, CPU, full=method == "full")
    if method == "lora":
        apply_method(model, {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"})
        freeze_base(model)
    apply_precision(model, prec)
    params = [p for p in model.parameters() if p.requires_grad]
    if any(p.dtype != torch.float32 for p in params):
        opt = AdamWFp32State(params, lr=1e-2, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    return model.train(), prec, opt, params


@pytest.mark.parametrize("policy,method", [("fp32", "lora"), ("bf16-mixed", "lora"), ("fp16-mixed", "lora"),
                                           ("bf16-true", "lora"), ("bf16-true", "full"), ("bf16-mixed", "full")])
def test_each_policy_trains(policy, method):
    model, prec, opt, params = setup(policy, method)
    scaler = prec.make_scaler("cpu")
    b = batch()
    losses = [train_step(model, [b], opt, scaler, prec, CPU, 1.0, params)["loss"] for _ in range(20)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses
    if method == "full" and policy == "bf16-true":
        assert {p.dtype for p in params} == {torch.bfloat16}
        assert {s["exp_avg"].dtype for s in opt.state.values()} == {torch.float32}


def test_fp16_overflow_skips_step_and_keeps_weights():
    model, prec, opt, params = setup("fp16-mixed", "lora")
    # loss x 2^30: fp16 gradients overflow to inf (on this model they fit from about 2^19 down)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 30)
    before = [p.detach().clone() for p in params]
    res = train_step(model, [batch()], opt, scaler, prec, CPU, 1.0, params)
    assert res["skipped"] and scaler.get_scale() == 2.0 ** 29  # backed off by 0.5
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert not opt.state  # no moment was touched
    for _ in range(40):  # the scale keeps halving until a step goes through
        res = train_step(model, [batch()], opt, scaler, prec, CPU, 1.0, params)
        if not res["skipped"]:
            break
    assert not res["skipped"] and scaler.get_scale() < 2.0 ** 25
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


def test_fp16_scale_grows_after_good_steps():
    model, prec, opt, params = setup("fp16-mixed", "lora")
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=3)
    for _ in range(3):
        assert not train_step(model, [batch()], opt, scaler, prec, CPU, 1.0, params)["skipped"]
    assert scaler.get_scale() == 16.0


@pytest.mark.parametrize("policy", ["bf16-mixed", "bf16-true", "fp16-mixed"])
def test_adapter_stays_fp32_under_16bit_base(policy):
    model, prec, opt, params = setup(policy, "lora")
    base = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert set(base.values()) == {prec.compute_dtype}
    scaler = prec.make_scaler("cpu")
    train_step(model, [batch()], opt, scaler, prec, CPU, 1.0, params)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, n
            assert "lora_" in n
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def test_bf16_refused_on_gpu_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    for name in ("bf16-mixed", "bf16-true"):
        with pytest.raises(PrecisionError, match="fp16-mixed"):
            resolve_precision(name, "cuda")
    assert resolve_precision("auto", "cuda").name == "fp16-mixed"
    assert resolve_precision("auto", "cpu").name == "fp32"


def test_adamw_fp32_state_matches_torch_adamw():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(8))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = AdamWFp32State(a, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    ref = torch.optim.AdamW(b, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, foreach=False)
    for _ in range(5):
        g = [torch.randn_like(p) for p in a]
        for p, q, gi in zip(a, b, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        ours.step()
        ref.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_adamw_fp32_state_reload_keeps_fp32():
    p = torch.nn.Parameter(torch.randn(8, 8).bfloat16())
    opt = AdamWFp32State([p], lr=1e-3)
    p.grad = torch.randn(8, 8).bfloat16()
    opt.step()
    sd = opt.state_dict()
    exact = sd["state"][0]["exp_avg_sq"].clone()
    opt2 = AdamWFp32State([p], lr=1e-3)
    opt2.load_state_dict(sd)
    st = opt2.state[p]
    assert st["exp_avg_sq"].dtype == torch.float32 and torch.equal(st["exp_avg_sq"], exact)
