"""ReLoRA: the merged weights equal the base plus the sum of the merged updates, exactly; restarts happen at the stated
steps, re-initialize LoRA (the model is then the merged one), prune the optimizer state by magnitude and warm the
learning rate up again; a `finetune method=relora from_scratch=true` run does all of it and saves the merged model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimtune.models.config import ModelConfig
from slimtune.models.decoder import Decoder, init_weights
from slimtune.peft import adapter_parameters, apply_method, disable_adapters, freeze_base
from slimtune.peft.lora import LoraLinear
from slimtune.train.relora import magnitude_prune_, make_restarts


def small(seed: int = 0) -> Decoder:
    cfg = ModelConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return init_weights(Decoder(cfg), seed, std=0.1)


def test_merges_sum_exactly_and_restarts_at_the_stated_steps():
    torch.manual_seed(0)
    model = small()
    apply_method(model, {"method": "relora", "r": 2, "relora_every": 3, "relora_warmup": 2, "relora_prune": 0.9})
    freeze_base(model)
    layers = {p: m for p, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert len(layers) == 2 * 7
    expect = {p: m.base_layer.weight.detach().clone() for p, m in layers.items()}  # W0, then + each merged update
    opt = torch.optim.AdamW(adapter_parameters(model, "default"), lr=1e-2)
    restarts = make_restarts(model, opt)
    assert [restarts.lr_factor(s) for s in range(8)] == [1, 1, 1, 0.5, 1, 1, 0.5, 1]
    x = torch.randint(0, 200, (2, 12))
    fired = []
    for step in range(1, 8):
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
        if step % 3 == 0:  # what the restart is about to merge
            for p, m in layers.items():
                expect[p] = (expect[p].float() + m.delta_weight("default").detach().float()).to(expect[p].dtype)
        if restarts.after_step(step):
            fired.append(step)
            for m in layers.values():
                assert not m.lora_B["default"].weight.any()  # LoRA restarted: B = 0 ...
                st = opt.state[m.lora_A["default"].weight]
                assert (st["exp_avg_sq"] != 0).float().mean() <= 0.1 + 1e-6  # ... and 90% of its state pruned
            with torch.no_grad():
                with disable_adapters(model):
                    merged = model(x)
                assert torch.equal(model(x), merged)  # the adapted model is the merged one
    assert fired == [3, 6] and restarts.restarts == 2
    for p, m in layers.items():
        assert torch.equal(m.base_layer.weight, expect[p]), p
    assert any(not torch.equal(m.base_layer.weight, small().get_submodule(p).weight) for p, m in layers.items())


def test_magnitude_prune():
    t = torch.randn(1000)
    keep = t.abs() > t.abs().kthvalue(990).values
    want = t * keep
    magnitude_prune_(t, 0.99)
    assert torch.equal(t, want) and int((t != 0).sum()) == 10


def test_finetune_relora_from_scratch(tmp_path):
    from slimtune.data import sample_path
    from slimtune.models.load import load_model
    from slimtune.optim.schedules import lr_at
    from slimtune.train import load_config, train
    from slimtune.train.metrics import read_metrics

    cfg = load_config("configs/relora.yaml", [
        "model=builtin", f"data={sample_path()}", "data_format=auto", "data_limit=24", "max_length=48", "batch_size=4", "max_steps=7",
        "rank=4", "relora_every=3", "relora_warmup=2", "warmup_steps=1", "lr=3e-3", "eval_every=0", "save_every=0",
        "grad_ckpt=false", "precision=fp32", f"out_dir={tmp_path}", "progress=false", "plot=false"])
    assert cfg.from_scratch and cfg.method == "relora"
    s = train(cfg, log=lambda m: None)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "relora_restart" in r] == [3, 6]
    lr = {r["step"]: r["lr"] for r in rows}
    sched = [lr_at(i, 3e-3, 7, 1, cfg.schedule, cfg.min_lr) for i in range(7)]
    assert [lr[i + 1] for i in range(7)] == pytest.approx([sched[i] * f for i, f in
                                                           enumerate([1, 1, 1, 0.5, 1, 1, 0.5])])  # warm restarts
    model, _ = load_model(tmp_path / "model")
    x = torch.randint(8, 264, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(x), s["model"].eval()(x), rtol=0, atol=1e-6)
    assert not any(isinstance(m, LoraLinear) for m in s["model"].modules())  # saved merged
