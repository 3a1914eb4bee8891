"""QAT and BitNet as registered methods: a QAT-trained int4 model has lower loss after conversion than int4
post-training quantization of the same starting model trained as long on the same data; conversion changes no
output; QAT with LoRA on top trains; BitNet trains through the one training loop and exports to a checkpoint that
load_model reads back with the same logits."""
from __future__ import annotations

import pytest
import torch

from slimtune.data import DataConfig, build_datasets, model_inputs, sample_path
from slimtune.train.loss import causal_lm_loss
from slimtune.errors import ConfigError
from slimtune.models.config import ModelConfig
from slimtune.models.decoder import Decoder, init_weights
from slimtune.models.tiny import builtin_tokenizer
from slimtune.peft import apply_method, freeze_base

CFG = ModelConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, bos_token_id=1, eos_token_id=[2, 6], pad_token_id=0)


def data():
    ds, _, _ = build_datasets(DataConfig(path=str(sample_path()), limit=40, max_length=64), builtin_tokenizer())
    return [ds.collate(range(i, min(i + 4, len(ds)))) for i in range(0, len(ds), 4)]


def loss(model, batches) -> float:
    s = n = 0
    with torch.no_grad():
        for b in batches:
            ls, c = causal_lm_loss(model(**model_inputs(b)), b["labels"])
            s, n = s + ls.item(), n + int(c)
    return s / n


def train(model, batches, steps: int, lr: float = 3e-3) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    out = []
    for i in range(steps):
        b = batches[i % len(batches)]
        ls, c = causal_lm_loss(model(**model_inputs(b)), b["labels"])
        (ls / c).backward()
        opt.step()
        opt.zero_grad()
        out.append((ls / c).item())
    return out


def test_qat_beats_ptq_after_conversion():
    from slimtune.peft.qat import convert
    from slimtune.quant import quantize_model

    torch.manual_seed(0)
    batches = data()
    steps = 30
    # train-then-quantize: the same layers train in full precision (method partial), then PTQ int4
    ptq = init_weights(Decoder(CFG), 0)
    apply_method(ptq, {"method": "partial", "trainable_modules": r".*_proj"})
    freeze_base(ptq)
    train(ptq, batches, steps)
    fp_loss = loss(ptq, batches)
    quantize_model(ptq, "int4", group_size=128)
    ptq_loss = loss(ptq, batches)
    # QAT from the same start, same data, same steps, same optimizer
    qat = init_weights(Decoder(CFG), 0)
    apply_method(qat, {"method": "qat", "fmt": "int4", "group_size": 128})
    assert freeze_base(qat) == sum(p.numel() for n, p in qat.named_parameters() if "_proj" in n)
    losses = train(qat, batches, steps)
    fake_loss = loss(qat, batches)
    convert(qat)
    qat_loss = loss(qat, batches)
    start = init_weights(Decoder(CFG), 0)
    quantize_model(start, "int4", group_size=128)
    print(fp_loss, ptq_loss, fake_loss, qat_loss, loss(start, batches))
    assert abs(qat_loss - fake_loss) < 1e-4  # conversion computes exactly what training saw
    assert qat_loss < ptq_loss - 0.01 and qat_loss < loss(start, batches)
    assert losses[-1] < losses[0]


def test_qat_with_lora_trains_and_converts():
    from slimtune.peft.qat import convert
    from slimtune.quant.linear import QuantLinear

    torch.manual_seed(0)
    batches = data()
    m = init_weights(Decoder(CFG), 1)
    apply_method(m, {"method": "qat", "fmt": "nf4", "r": 4, "lora_alpha": 8})
    n = freeze_base(m)
    assert n == sum(p.numel() for k, p in m.named_parameters() if "lora_" in k) > 0
    losses = train(m, batches, 10, lr=1e-2)
    assert losses[-1] < losses[0]
    before = loss(m, batches)
    convert(m)
    assert isinstance(m.model.layers[0].self_attn.q_proj, QuantLinear)
    assert abs(loss(m, batches) - before) < 0.05  # Q(W + sBA) vs Q(W) + sBA: close, not equal


def test_bitnet_trains_through_the_loop_and_exports(tmp_path):
    from slimtune.models.load import load_model
    from slimtune.models.save import save_model
    from slimtune.cli import main
    from slimtune.peft import load_adapter
    from slimtune.peft.qat import export_quantized
    from slimtune.train import load_config
    from slimtune.train import train as run
    from slimtune.train.metrics import read_metrics

    model_dir = save_model(init_weights(Decoder(CFG), 2), tmp_path / "model", tokenizer=builtin_tokenizer())
    cfg = load_config(None, [f"model={model_dir}", f"data={sample_path()}", "data_limit=32", "max_length=64",
                             "method=bitnet", "batch_size=4", "max_steps=10", "lr=3e-3", "precision=fp32",
                             f"out_dir={tmp_path / 'run'}", "progress=false", "plot=false", "seed=0", "device=cpu"])
    res = run(cfg, log=lambda m: None)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0] - 0.1, losses
    # the adapter file (latent weights) reloads onto a fresh base; export writes a packed ternary checkpoint
    m, _ = load_model(model_dir)
    load_adapter(m, tmp_path / "run" / "adapter")
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(m(ids), res["model"](ids))
        want = m(ids)
    export_quantized(m, tmp_path / "ternary", tokenizer=builtin_tokenizer())
    back, _ = load_model(tmp_path / "ternary")
    assert back.model.layers[1].mlp.up_proj.fmt == "ternary"
    with torch.no_grad():
        torch.testing.assert_close(back(ids), want, rtol=1e-4, atol=1e-4)
    # the same through the CLI: slimtune quantize MODEL --adapter RUN/adapter --out DIR
    assert main(["quantize", str(model_dir), "--adapter", str(tmp_path / "run" / "adapter"), "--out",
                 str(tmp_path / "cli"), "--json"]) == 0
    assert main(["quantize", str(model_dir), "--adapter", str(tmp_path / "run" / "adapter"), "--format", "int4",
                 "--out", str(tmp_path / "bad")]) == 2
    back, _ = load_model(tmp_path / "cli")
    assert back.model.layers[1].mlp.up_proj.fmt == "ternary"
    with torch.no_grad():
        torch.testing.assert_close(back(ids), want, rtol=1e-4, atol=1e-4)


def test_qat_int8_activations_convert_to_w8a8():
    from slimtune.peft.qat import convert

    torch.manual_seed(0)
    m = init_weights(Decoder(CFG), 4)
    apply_method(m, {"method": "qat", "fmt": "int8", "act_bits": 8})
    ids = torch.randint(0, 320, (2, 16))
    x = torch.randn(3, 7, 128)
    fq = m.model.layers[0].mlp.gate_proj
    with torch.no_grad():
        fake, fake_layer = m(ids), fq(x)
        torch.testing.assert_close(fq.to_quant_linear()(x), fake_layer, rtol=1e-5, atol=1e-5)  # one layer: exact
    convert(m)
    assert m.model.layers[0].mlp.gate_proj.fmt == "w8a8" and type(m.lm_head).__name__ == "Linear"
    with torch.no_grad():  # through the model, an activation on a rounding boundary may flip by one int8 level
        assert (m(ids) - fake).abs().max() < 0.01 * fake.abs().max()
    with pytest.raises(ConfigError, match="one per model"):
        n = init_weights(Decoder(CFG), 4)
        apply_method(n, {"method": "qat"})
        apply_method(n, {"method": "bitnet"}, adapter_name="second")
    with pytest.raises(ConfigError):
        apply_method(init_weights(Decoder(CFG), 4), {"method": "qat", "fmt": "int5"})
