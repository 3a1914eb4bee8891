"""The fallback for architectures outside slimtune's decoder (GPT-2, OPT, Bloom here): loaded through transformers,
trained by `slimtune finetune` with LoRA (adapter files that PEFT loads with equal logits, both ways), packed rows
kept apart (or refused in one line), full fine-tuning saved for transformers, resume, generation, refusals."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slimtune.peft as P
from slimtune.cli import main
from slimtune.data import sample_path
from slimtune.errors import CheckpointError, ConfigError
from slimtune.generate import SamplingConfig, generate
from slimtune.models.fallback import NOTE, TransposedLinear
from slimtune.models.load import load_model
from slimtune.models.tiny import builtin_tokenizer
from slimtune.train import load_config, train
from slimtune.train.metrics import read_metrics

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
SPECIAL = dict(vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY = {  # 2 layers, d 64, 4 heads, vocab 320 (the built-in byte tokenizer uses 264 ids)
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),  # Conv1D layers, learned positions
    "opt": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
                max_position_embeddings=256),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),  # ALiBi; its attention ignores a 4-D mask
}


def hf_folder(tmp: Path, model_type: str, seed: int = 0) -> Path:
    """A tiny random transformers model of `model_type`, saved with the built-in tokenizer."""
    cfg = transformers.AutoConfig.for_model(model_type, **TINY[model_type], **SPECIAL)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    folder = tmp / model_type
    model.save_pretrained(folder)
    builtin_tokenizer().save_pretrained(folder)
    return folder


def run_keys(folder: Path, out: Path, *extra: str) -> list[str]:
    return [f"model={folder}", f"data={sample_path()}", "data_limit=24", "max_length=64", "batch_size=4",
            "max_steps=4", "lr=3e-3", "warmup_steps=0", "precision=fp32", f"out_dir={out}", "progress=false",
            "plot=false", "seed=0", *extra]


def test_gpt2_lora_through_slimtune_finetune_loads_in_peft(tmp_path):
    folder = hf_folder(tmp_path, "gpt2")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "slimtune", "finetune", *run_keys(
        folder, out, "method=lora", "rank=4", "alpha=8", "targets=[c_attn,c_fc]")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert NOTE.format("gpt2") in r.stdout.splitlines()  # said once, in one line
    losses = [m["loss"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert len(losses) == 4 and losses[-1] < losses[0]
    # the adapter: trained (not zero), and PEFT computes what slimtune computes with it
    ours, _ = load_model(folder)
    assert isinstance(ours.transformer.h[0].attn.c_attn, TransposedLinear)
    x = torch.randint(3, 300, (2, 12))
    base = ours(x).logits
    P.load_adapter(ours, out / "adapter")
    y = ours(x).logits
    assert (y - base).abs().max() > 1e-4
    pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(folder), out / "adapter")
    assert (pm.eval()(x).logits - y).abs().max() <= 1e-5
    # merged into the base (GPT-2's Conv1D layout written back) and generated from, by the CLI
    assert main(["merge-adapter", "--model", str(folder), "--adapter", str(out / "adapter"), "--out",
                 str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (merged(x).logits - y).abs().max() <= 1e-4
    assert main(["generate", "--model", str(tmp_path / "merged"), "--prompt", "Hi", "--max-new-tokens", "4",
                 "--json"]) == 0
    # and a PEFT adapter on GPT-2's Conv1D (fan_in_fan_out) loads into the fallback with PEFT's logits
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_proj"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(folder), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.eval().save_pretrained(tmp_path / "peft")
    back, _ = load_model(folder)
    P.load_adapter(back, tmp_path / "peft")
    assert (back(x).logits - pm(x).logits).abs().max() <= 1e-5


def test_opt_packed_full_finetune_resume_and_save(tmp_path):
    """Packed rows (4-D mask) on OPT; full fine-tuning interrupted by a checkpoint and resumed equals the straight
    run; the saved folder loads in transformers with the trained weights."""
    folder = hf_folder(tmp_path, "opt")
    keys = run_keys(folder, tmp_path / "a", "method=full", "save_every=2", "keep_last=5")
    straight = train(load_config(None, keys), log=lambda m: None)
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("step-4", "model"))
    resumed = train(load_config(None, run_keys(folder, tmp_path / "b", "method=full", "resume=latest")),
                    log=lambda m: None)
    la = [m["loss"] for m in read_metrics(tmp_path / "a" / "metrics.jsonl") if "loss" in m]
    lb = [m["loss"] for m in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in m]
    assert la == lb and la[-1] < la[0]
    back = transformers.AutoModelForCausalLM.from_pretrained(straight["final"]).eval()
    trained = straight["model"].eval()
    for k, v in trained.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert resumed["steps"] == 4 and resumed["checkpoint"].endswith("step-4")


def test_packed_row_equals_examples_alone(tmp_path):
    from slimtune.models.fallback import transformers_logits

    model, _ = load_model(hf_folder(tmp_path, "gpt2"))
    a, b = torch.randint(3, 300, (1, 6)), torch.randint(3, 300, (1, 9))
    packed = transformers_logits(model, {"input_ids": torch.cat([a, b], 1),
                                         "position_ids": torch.cat([torch.arange(6), torch.arange(9)])[None],
                                         "seq_ids": torch.tensor([[0] * 6 + [1] * 9])})
    alone = torch.cat([model(a).logits, model(b).logits], 1)
    assert (packed - alone).abs().max() <= 1e-5


def test_bloom_packing_refused_in_one_line_and_trains_unpacked(tmp_path):
    folder = hf_folder(tmp_path, "bloom")
    with pytest.raises(ConfigError, match="packing=false"):
        train(load_config(None, run_keys(folder, tmp_path / "a", "method=lora", "targets=all-linear")),
              log=lambda m: None)
    s = train(load_config(None, run_keys(folder, tmp_path / "b", "method=lora", "targets=all-linear",
                                         "packing=false", "max_steps=2")), log=lambda m: None)
    assert s["steps"] == 2 and (tmp_path / "b" / "adapter" / "adapter_model.safetensors").exists()


def test_generation_through_transformers_generate(tmp_path):
    model, _ = load_model(hf_folder(tmp_path, "gpt2"))
    ids = torch.randint(3, 300, (2, 5))
    ours = generate(model, ids, sc=SamplingConfig(max_new_tokens=12, stop_token_ids=[]))
    theirs = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 5:]
    assert ours.tolist() == theirs.tolist()
    stop = int(ours[0, 3])  # a stop id met at step 3 of row 0: that row repeats it from there
    got = generate(model, ids, sc=SamplingConfig(max_new_tokens=12, stop_token_ids=[stop]))
    first = got[0].tolist().index(stop)
    assert set(got[0, first:].tolist()) == {stop}


def test_conv1d_state_dict_layout_is_kept():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(6, 4)  # in 4, out 6: weight (4, 6)
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    lin = TransposedLinear.from_conv1d(conv)
    x = torch.randn(3, 4)
    assert torch.allclose(lin(x), conv(x), atol=1e-6)
    sd = lin.state_dict()
    assert torch.equal(sd["weight"], conv.weight) and torch.equal(sd["bias"], conv.bias)
    fresh = TransposedLinear(4, 6)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.weight, lin.weight)


def test_refusals_are_one_line(tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "mymodel", "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(CheckpointError, match="remote code"):
        load_model(remote)
    folder = hf_folder(tmp_path, "opt")
    sd = {k: v.clone() for k, v in transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}
    (folder / "model.safetensors").unlink()
    torch.save(sd, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(folder)
