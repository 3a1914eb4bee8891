"""Activation offloading and the optimizers of slimtune.memory: exactness against the plain paths on the CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimtune.errors import ConfigError
from slimtune.train.offload import offload_activations
from slimtune.optim.build import make_optimizer
from slimtune.optim.offload import CPUOffloadAdamW
from slimtune.models.decoder import Decoder, init_weights
from slimtune.models.shapes import get_shape


def _model(seed: int = 0, lora: bool = False) -> Decoder:
    m = init_weights(Decoder(get_shape("tiny-qwen2")), seed).train()
    if lora:
        from slimtune.peft import apply_method, freeze_base
        torch.manual_seed(seed)  # random A and B (init_lora_weights=False), the same in both models
        apply_method(m, {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"],
                         "init_lora_weights": False})
        freeze_base(m)
    return m


def _loss(m, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m.config.vocab_size, (2, 24), generator=g)
    return F.cross_entropy(m(ids).float().flatten(0, 1), torch.randint(0, m.config.vocab_size, (48,), generator=g))


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("ckpt", [False, True])
def test_offloaded_activations_give_identical_gradients(lora, ckpt):
    ref, off = _model(lora=lora), _model(lora=lora)
    ref.grad_ckpt = off.grad_ckpt = ckpt
    _loss(ref).backward()
    ctx = offload_activations(off, min_bytes=1024)
    with ctx:
        loss = _loss(off)
    loss.backward()
    assert ctx.offloaded_bytes > 0
    for (n, a), (_, b) in zip(ref.named_parameters(), off.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a.grad, b.grad), n


def test_parameters_and_small_tensors_are_not_offloaded():
    m = _model()
    packed = []
    ctx = offload_activations(m, min_bytes=4096)
    pack = ctx.pack_hook

    def spy(t):
        out = pack(t)
        packed.append((t, out))
        return out
    ctx.pack_hook = spy
    with ctx:
        _loss(m).backward()
    ptrs = {p.untyped_storage().data_ptr() for p in m.parameters()}
    assert packed
    for t, out in packed:
        is_param = t.untyped_storage().data_ptr() in ptrs
        small = t.numel() * t.element_size() < 4096
        assert (out is t) == (is_param or small)


def test_cpu_offloaded_adamw_equals_torch_adamw():
    a, b = _model(seed=3), _model(seed=3)
    ref = torch.optim.AdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    off = make_optimizer(b.parameters(), "adamw", lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, offload=True)
    off_exact = CPUOffloadAdamW(list(b.parameters()), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=False)
    assert isinstance(off, CPUOffloadAdamW)
    for step in range(4):
        for m, opt in ((a, ref), (b, off_exact)):
            opt.zero_grad()
            _loss(m, seed=10 + step).backward()
            opt.step()
        for n, p in a.named_parameters():
            assert torch.equal(p, b.get_parameter(n)), (step, n)
    # resume: a fresh offloaded optimizer loaded from the state dict continues identically
    c = _model(seed=99)
    c.load_state_dict(b.state_dict())
    resumed = CPUOffloadAdamW(list(c.parameters()), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=False)
    resumed.load_state_dict(off_exact.state_dict())
    for m, opt in ((a, ref), (c, resumed)):
        opt.zero_grad()
        _loss(m, seed=50).backward()
        opt.step()
    for n, p in a.named_parameters():
        assert torch.equal(p, c.get_parameter(n)), n
    # the fused CPU kernel agrees to rounding
    d = _model(seed=3)
    fused = CPUOffloadAdamW(list(d.parameters()), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    e = _model(seed=3)
    ref2 = torch.optim.AdamW(e.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for m, opt in ((d, fused), (e, ref2)):
        _loss(m).backward()
        opt.step()
    for n, p in d.named_parameters():
        torch.testing.assert_close(p, e.get_parameter(n), rtol=1e-5, atol=1e-6)
    _ = off


def test_lr_changes_reach_the_offloaded_update():
    a = _model(seed=4)
    opt = make_optimizer(a.parameters(), "adamw", lr=1e-2, offload=True)
    before = [p.detach().clone() for p in a.parameters()]
    for g in opt.param_groups:
        g["lr"] = 0.0
    _loss(a).backward()
    opt.step()
    assert all(torch.equal(x, p) for x, p in zip(before, a.parameters()))


def test_optimizer_factory(monkeypatch):
    m = _model(lora=True)
    groups = [{"params": [p for p in m.parameters() if p.requires_grad], "weight_decay": 0.0}]
    assert isinstance(make_optimizer(groups, "sgd", lr=0.1), torch.optim.SGD)
    assert isinstance(make_optimizer(groups, "adamw", lr=0.1), torch.optim.AdamW)
    with pytest.raises(ConfigError, match="unknown optimizer"):
        make_optimizer(groups, "lion")
    with pytest.raises(ConfigError, match="offload"):
        make_optimizer(groups, "sgd", offload=True)
    try:
        import torchao  # noqa: F401
    except ImportError:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            with pytest.raises(ConfigError, match="pip install torchao"):
                make_optimizer(groups, "adamw8bit")
            return
    # one tensor that takes 8-bit states (>= 4096 elements in blocks of 256) and one that keeps fp32 states. torchao
    # compiles its step per shape with inductor (seconds each on the CPU); here with the "eager" backend, which traces
    # the same graph and runs it as is: the states are the same
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": "eager"}))
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(64, 128, generator=g)), torch.nn.Parameter(torch.randn(4, 128, generator=g))]
    opt = make_optimizer([{"params": ps, "weight_decay": 0.0}], "adamw8bit", lr=1e-3)
    sum((p * torch.randn(p.shape, generator=g)).sum() for p in ps).backward()
    opt.step()
    # 8-bit states for tensors of >= 4096 elements that split into blocks of 256, as the estimator counts
    from slimtune.memory.estimate import _optimizer_bytes
    held, quantized = 0, 0
    for s in opt.state.values():
        for v in s.values():
            if hasattr(v, "codes"):  # torchao OptimState8bit: uint8 codes + fp32 scale per block
                held += v.codes.numel() + v.scale.numel() * 4
                quantized += 1
            elif torch.is_tensor(v):
                held += v.numel() * v.element_size()
    assert held > 0 and quantized in (0, 2)  # torchao: both moments of the large tensor (bitsandbytes: no codes)
    predicted = _optimizer_bytes([(p.numel(), 4) for p in ps], "adamw8bit", 4, 0.0) - 4 * len(ps)
    assert abs(held - predicted) <= 2 * 256 * 4 * len(ps)  # + the 256-entry code table per quantized state
