"""Interoperability with Hugging Face PEFT 0.21 on a tiny 2-layer transformers Llama: adapters written by slimtune
load with `PeftModel.from_pretrained` and give the same logits (and DoRA the same gradients); adapters written by PEFT
load into slimtune's own decoder; trainable counts agree."""
from __future__ import annotations

import pytest
import torch

import slimtune.peft as P
from slimtune.models.load import load_model
from slimtune.peft.lora import LoraLinear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def hf_llama(seed: int = 0):
    """A 2-layer LlamaForCausalLM with every weight random (norms too), fp32, eval mode."""
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.08)
    return model.eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(seed))


def randomize_slimtune(model, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                for n in m.lora_B:
                    m.lora_B[n].weight.copy_(torch.randn(m.lora_B[n].weight.shape, generator=g) * 0.1)
                    if n in m.lora_magnitude_vector:
                        m.lora_magnitude_vector[n].mul_(1 + 0.3 * torch.rand(m.out_features, generator=g))


CONFIGS = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"], use_dora=True),
    "rslora-patterns": dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True,
                            rank_pattern={"down_proj": 2}, alpha_pattern={"layers.1.self_attn.o_proj": 4}),
    "layers": dict(r=2, lora_alpha=2, target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
    "modules_to_save": dict(r=2, lora_alpha=4, target_modules=["v_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_slimtune_adapter_loads_in_peft_with_same_logits(name, tmp_path):
    x = ids()
    model = hf_llama()
    P.apply_method(model, {"method": "lora", **CONFIGS[name]})
    randomize_slimtune(model)
    if name == "modules_to_save":
        with torch.no_grad():
            model.lm_head.modules_to_save["default"].weight.mul_(1.3)
    y = model(x).logits
    with P.disable_adapters(model):
        assert (model(x).logits - y).abs().max() > 1e-3
    P.save_adapter(model, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(hf_llama(), str(tmp_path / "ad")).eval()
    assert (pm(x).logits - y).abs().max() <= 1e-5
    if name == "dora":  # same gradients: DoRA's norm is detached the same way
        P.freeze_base(model)
        model(x).logits.square().mean().backward()
        pm = peft.PeftModel.from_pretrained(hf_llama(), str(tmp_path / "ad"), is_trainable=True)
        pm(x).logits.square().mean().backward()
        ours = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
        theirs = {k.removeprefix("base_model.model."): p.grad for k, p in pm.named_parameters() if p.requires_grad}
        theirs = {k.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default"): g
                  for k, g in theirs.items()}
        assert set(ours) == set(theirs)
        for k, g in ours.items():
            assert torch.allclose(g, theirs[k], atol=1e-6, rtol=1e-4), k


@pytest.mark.parametrize("dora", [False, True])
def test_peft_adapter_loads_into_slimtune_decoder(dora, tmp_path):
    x = ids()
    base = hf_llama()
    base.save_pretrained(tmp_path / "model")
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj"], use_dora=dora,
                          task_type="CAUSAL_LM")
    pm = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for k, p in pm.named_parameters():
            if "lora_B" in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude" in k:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    pm.eval()
    y = pm(x).logits
    pm.save_pretrained(tmp_path / "ad")
    ours, _ = load_model(tmp_path / "model")
    y_base = ours(x)
    P.load_adapter(ours, tmp_path / "ad")
    assert (ours(x) - y).abs().max() <= 1e-5
    assert (y_base - y).abs().max() > 1e-3
    P.merge_and_unload(ours)
    assert (ours(x) - y).abs().max() <= 1e-5


@pytest.mark.parametrize("kw", [dict(r=8, target_modules=["q_proj", "v_proj"]),
                                dict(r=4, target_modules="all-linear"),
                                dict(r=4, target_modules=["k_proj", "down_proj"], use_dora=True),
                                dict(r=16, target_modules=["o_proj", "up_proj"], layers_to_transform=[0],
                                     rank_pattern={"up_proj": 3})])
def test_trainable_count_equals_peft(kw):
    ours = hf_llama()
    P.apply_method(ours, {"method": "lora", "lora_alpha": 8, **kw})
    P.freeze_base(ours)
    mine = P.trainable_report(ours, print_line=False)
    pm = peft.get_peft_model(hf_llama(), peft.LoraConfig(lora_alpha=8, task_type="CAUSAL_LM", **kw))
    trainable, total = pm.get_nb_trainable_parameters()
    assert (mine["trainable"], mine["total"]) == (trainable, total)


def test_combined_adapter_loads_in_peft(tmp_path):
    """A 'cat' combination (per-module ranks, written as exact paths + rank_pattern) is a plain LoRA to PEFT."""
    x = ids()
    model = hf_llama()
    P.apply_method(model, {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "a")
    P.apply_method(model, {"method": "lora", "r": 2, "lora_alpha": 2, "target_modules": ["v_proj", "up_proj"]}, "b")
    randomize_slimtune(model)
    P.combine_adapters(model, ["a", "b"], [0.6, 0.9], mode="cat", new_name="ab")
    P.set_adapter(model, "ab")
    y = model(x).logits
    P.set_adapter(model, ["a", "b"])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.scaling = {**m.scaling, "a": m.scaling.get("a", 0) * 0.6, "b": m.scaling.get("b", 0) * 0.9}
    assert (model(x).logits - y).abs().max() <= 1e-5  # cat == the weighted sum of the two adapters
    P.save_adapter(model, tmp_path / "ab", "ab")
    pm = peft.PeftModel.from_pretrained(hf_llama(), str(tmp_path / "ab")).eval()
    assert (pm(x).logits - y).abs().max() <= 1e-5


def test_lora_bias_both_ways_with_peft(tmp_path):
    """PEFT's lora_bias (a trainable bias on lora_B, added as s * b): a PEFT adapter with it loads into slimtune's
    decoder with PEFT's logits, merges into the q/k/v biases of a Qwen2 model, and slimtune's own loads in PEFT."""
    from conftest import make_hf_model

    from slimtune.train.config import load_config
    from slimtune.train.build import method_config

    x = ids()
    base = make_hf_model("qwen2")
    base.save_pretrained(tmp_path / "model")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True,
                          task_type="CAUSAL_LM")
    pm = peft.get_peft_model(make_hf_model("qwen2"), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for k, p in pm.named_parameters():
            if "lora_B" in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    y = pm(x).logits
    pm.save_pretrained(tmp_path / "ad")
    ours, _ = load_model(tmp_path / "model")
    P.load_adapter(ours, tmp_path / "ad")
    assert (ours(x) - y).abs().max() <= 1e-5
    P.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(make_hf_model("qwen2"), tmp_path / "ours").eval()
    assert (back(x).logits - y).abs().max() <= 1e-5
    P.merge_and_unload(ours)
    assert (ours(x) - y).abs().max() <= 1e-5
    # a run's flat key sets it (the option is declared once, on LoraConfig)
    run = load_config(None, ["data=x.json", "lora_bias=true", "targets=[q_proj]"])
    assert method_config(run).lora_bias is True
