"""Adapters trained with `targets=all-linear` through the real `slimtune finetune` and the shipped configs (LoRA, DoRA,
QLoRA) load in `peft.PeftModel.from_pretrained` with equal logits: adapter_config.json lists the adapted module names,
as PEFT itself writes them; the QLoRA adapter on transformers + bitsandbytes' NF4 base."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimtune.cli import main
from slimtune.data import sample_path

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
ALL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 2-layer random model saved as a Hugging Face folder with a tokenizer (widths multiples of 64: bitsandbytes'
    CPU 4-bit kernel needs that)."""
    from slimtune.models.config import ModelConfig
    from slimtune.models.decoder import Decoder, init_weights
    from slimtune.models.save import save_model
    from slimtune.models.tiny import builtin_tokenizer

    cfg = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=[2, 6],
                      pad_token_id=0)
    return save_model(init_weights(Decoder(cfg), 5, std=0.08), tmp_path_factory.mktemp("al") / "model",
                      tokenizer=builtin_tokenizer())


def finetune(config: str, model_dir: Path, out: Path, capsys) -> Path:
    """Run `slimtune finetune configs/<config>` for 2 steps on the tiny model; returns the saved adapter folder."""
    argv = ["finetune", str(ROOT / "configs" / config), f"model={model_dir}", f"data={sample_path()}",
            "data_limit=16", "max_length=64", "max_steps=2", "batch_size=2", "grad_accum=1", "val_fraction=0",
            "warmup_steps=0", "lr=2e-2", f"out_dir={out}", "progress=false", "plot=false", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return Path(summary["final"])


@pytest.mark.parametrize("config", ["lora.yaml", "dora.yaml", "qlora.yaml"])
def test_all_linear_adapter_loads_in_peft(config, model_dir, tmp_path, capsys):
    from slimtune.models.load import load_model
    from slimtune.peft import disable_adapters, load_adapter

    adapter = finetune(config, model_dir, tmp_path / "out", capsys)
    meta = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(meta["target_modules"]) == ALL_LINEAR  # not ["all-linear"], which PEFT refuses
    assert meta["use_dora"] == (config == "dora.yaml")
    qlora = config == "qlora.yaml"
    ours, _ = load_model(model_dir, quantize="nf4" if qlora else None)
    load_adapter(ours, adapter)
    kw = {}
    if qlora:  # the same NF4 (double-quantized) base in transformers + bitsandbytes
        bnb = pytest.importorskip("bitsandbytes")
        kw = dict(quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32), device_map="cpu")
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw)
    if qlora:
        for m in base.modules():  # bitsandbytes' reference path (its AVX512-BF16 CPU kernel computes in bf16)
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
    theirs = peft.PeftModel.from_pretrained(base, adapter).eval()
    x = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = ours(x)
        with disable_adapters(ours):
            y0 = ours(x)
        torch.testing.assert_close(theirs(x).logits, y, rtol=0, atol=1e-5)
    assert (y - y0).abs().max() > 1e-3  # the trained adapter changes the logits
