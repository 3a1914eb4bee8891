"""QLoRA end to end: training through the one loop on an NF4 base (loss falls), merging into the dequantized base
(logits match the unmerged QLoRA model within bf16 rounding, unlike a merge into the original weights), the merged
folder loads in transformers, and `slimtune merge-adapter --qlora` reports it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimtune.data import sample_path
from slimtune.quant.qlora import detect_quant, merge_qlora, probe_batch


def tiny_dir(tmp: Path, seed: int = 0) -> Path:
    from slimtune.models.save import save_model
    from slimtune.models.config import ModelConfig
    from slimtune.models.decoder import Decoder, init_weights
    from slimtune.models.tiny import builtin_tokenizer

    cfg = ModelConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=[2, 6],
                      pad_token_id=0)
    return save_model(init_weights(Decoder(cfg), seed), tmp / "model", dtype=torch.bfloat16,
                      tokenizer=builtin_tokenizer())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A QLoRA run of 12 steps on the tiny model; returns (model dir, run dir, losses)."""
    from slimtune.train import load_config, train
    from slimtune.train.metrics import read_metrics

    tmp = tmp_path_factory.mktemp("qlora")
    model = tiny_dir(tmp)
    cfg = load_config(None, [f"model={model}", f"data={sample_path()}", "data_limit=48", "max_length=64",
                             "method=qlora", "rank=8", "alpha=16", "targets=all-linear", "batch_size=4",
                             "max_steps=12", "lr=1e-2", "warmup_steps=0", "schedule=constant", "precision=fp32",
                             f"out_dir={tmp / 'run'}", "progress=false", "plot=false", "seed=0", "device=cpu"])
    train(cfg, log=lambda m: None)
    losses = [r["loss"] for r in read_metrics(tmp / "run" / "metrics.jsonl") if "loss" in r]
    return model, tmp / "run", losses


def test_qlora_trains_through_the_loop(trained):
    _, run, losses = trained
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert detect_quant(run / "adapter") == "nf4"  # read from the run's config.yaml (method: qlora)


def test_merge_matches_unmerged_within_bf16(trained, tmp_path):
    model, run, _ = trained
    rep = merge_qlora(model, run / "adapter", tmp_path / "merged", dtype="bf16", compare_naive=True)
    print(rep)
    assert rep.quant == "nf4" and rep.layers == 14 and rep.dtype == "bfloat16"
    # bf16 keeps 8 significant bits: a logit of size L moves by about L * 2^-8 through rounded weights
    assert rep.max_abs_logit_diff < 4 * rep.max_abs_logit * 2 ** -8, rep
    # merging into the original 16-bit weights is off by the NF4 error: far beyond rounding
    assert rep.naive_max_abs_logit_diff > 5 * rep.max_abs_logit_diff, rep
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"


def test_merged_loads_in_transformers(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from slimtune.models.load import load_model

    model, run, _ = trained
    merge_qlora(model, run / "adapter", tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    ours, cfg = load_model(tmp_path / "merged", dtype=torch.float32)
    ids = probe_batch(cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


def test_merge_adapter_cli_qlora(trained, tmp_path, capsys):
    from slimtune.cli import main

    model, run, _ = trained
    rc = main(["merge-adapter", "--model", str(model), "--adapter", str(run / "adapter"), "--out",
               str(tmp_path / "m"), "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["quant"] == "nf4" and "DEQUANTIZED" in d["note"] and d["max_abs_logit_diff"] < 0.05
    rc = main(["merge-adapter", "--model", str(model), "--adapter", str(run / "adapter"), "--out",
               str(tmp_path / "m2"), "--qlora"])
    out = capsys.readouterr().out
    assert rc == 0 and "most reported QLoRA mistake" in out and "max |logit diff|" in out
    rc = main(["merge-adapter", "--model", str(tmp_path / "nope"), "--adapter", str(run / "adapter"), "--out",
               str(tmp_path / "m3"), "--qlora"])
    assert rc == 2
