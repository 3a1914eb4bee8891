"""PEFT-format adapter folders: field and key names, round trips, refusing a wrong base without touching the model,
and the CLI (`generate --adapter`, `merge-adapter`) turning bad input into one line and exit code 2."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import slimtune.peft as P
from slimtune.models.load import load_model
from slimtune.cli import main
from slimtune.errors import CheckpointError, ConfigError
from slimtune.models.config import ModelConfig
from slimtune.models.decoder import Decoder, init_weights
from slimtune.models.tiny import write_builtin
from slimtune.peft.lora import LoraLinear


def tiny(seed: int = 0, **kw) -> Decoder:
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
    cfg.update(kw)
    return init_weights(Decoder(ModelConfig(**cfg)), seed, std=0.08).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))


def trained(model, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                for n in m.lora_B:
                    m.lora_B[n].weight.copy_(torch.randn(m.lora_B[n].weight.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("dora", [False, True])
def test_file_layout_and_round_trip(dora, tmp_path):
    model, x = tiny(), ids()
    P.apply_method(model, {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                           "use_dora": dora, "lora_dropout": 0.1})
    trained(model)
    y = model(x)
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "trainer_state.json").write_text("{}")  # other files in the folder survive a save
    P.save_adapter(model, tmp_path / "ad")
    assert (tmp_path / "ad" / "trainer_state.json").exists()
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_dora"] is dora
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["lora_dropout"] == 0.1 and cfg["bias"] == "none"
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"])  # all-linear, resolved as PEFT writes it
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        a = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
    assert a.shape == (4, 64) and b.shape == (64, 4) and a.dtype == torch.float32
    assert len(keys) == 14 * (3 if dora else 2)
    assert ("base_model.model.model.layers.1.self_attn.k_proj.lora_magnitude_vector" in keys) is dora
    assert not any("default" in k or "base_layer" in k for k in keys)
    fresh = tiny()
    P.load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(fresh(x), y)
    P.freeze_base(fresh)
    assert P.trainable_report(fresh, print_line=False)["trainable"] == \
        sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_modules_to_save_round_trip(tmp_path):
    model, x = tiny(), ids()
    P.apply_method(model, {"method": "lora", "r": 2, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]})
    trained(model)
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    y = model(x)
    P.freeze_base(model)
    assert model.lm_head.modules_to_save["default"].weight.requires_grad
    assert not model.lm_head.base_layer.weight.requires_grad
    P.save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.lm_head.weight" in set(f.keys())
    fresh = tiny()
    P.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(x), y)
    P.merge_and_unload(fresh)
    assert isinstance(fresh.lm_head, torch.nn.Linear) and (fresh(x) - y).abs().max() < 1e-5


def _untouched(model, before):
    assert not any(isinstance(m, P.AdapterLayer) for m in model.modules())
    assert P.model_adapters(model) == {}
    sd = model.state_dict()
    assert set(sd) == set(before) and all(torch.equal(sd[k], v) for k, v in before.items())


def test_wrong_base_is_refused_and_the_model_untouched(tmp_path):
    model = tiny()
    P.apply_method(model, {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]})
    P.save_adapter(model, tmp_path / "ad")
    wider = tiny(hidden_size=96, num_attention_heads=4)  # same names, other shapes
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"tensor base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A"
                                              r"\.weight has shape \(4, 64\), this model needs \(4, 96\)"):
        P.load_adapter(wider, tmp_path / "ad")
    _untouched(wider, before)
    # an adapter for deeper model: module layers.2 does not exist here
    deep = tiny(num_hidden_layers=3)
    P.apply_method(deep, {"method": "lora", "r": 4, "target_modules": ["q_proj"]})
    P.save_adapter(deep, tmp_path / "deep")
    cfg = json.loads((tmp_path / "deep" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj"]
    shallow = tiny()
    before = {k: v.clone() for k, v in shallow.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"tensor base_model\.model\.model\.layers\.2\.self_attn\.q_proj\.lora_A"
                                              r"\.weight \(4, 64\) has no place in this model"):
        P.load_adapter(shallow, tmp_path / "deep")
    _untouched(shallow, before)
    # a listed name that matches nothing is tolerated in a file (as PEFT), not in a config the user writes
    cfg["target_modules"] = ["q_proj", "v_proj", "c_attn"]
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))
    fresh = tiny()
    P.load_adapter(fresh, tmp_path / "ad")
    assert isinstance(fresh.model.layers[1].self_attn.q_proj, LoraLinear)
    # targets that do not exist at all
    cfg["target_modules"] = ["c_attn"]
    (tmp_path / "deep" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"adapter does not fit Decoder: target_modules \['c_attn'\] "
                                              r"selects no module of Decoder; linear modules here: q_proj, k_proj"):
        P.load_adapter(shallow, tmp_path / "deep")
    _untouched(shallow, before)


def test_bad_folders_and_configs(tmp_path):
    model = tiny()
    with pytest.raises(CheckpointError, match="adapter folder not found"):
        P.load_adapter(model, tmp_path / "nope")
    (tmp_path / "ad").mkdir()
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        P.load_adapter(model, tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 0}))
    with pytest.raises(CheckpointError, match=r"adapter_config.json: LoRA rank r must be a positive integer, got 0"):
        P.load_adapter(model, tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA", "r": 4}))
    with pytest.raises(CheckpointError, match=r"peft_type 'VERA' is not supported; supported: .*LORA"):
        P.load_adapter(model, tmp_path / "ad")
    with pytest.raises(ConfigError, match="no adapter named 'default' to save"):
        P.save_adapter(model, tmp_path / "x")


def test_cli_generate_with_adapter_and_bad_adapter(tmp_path, capsys):
    write_builtin(tmp_path / "m")
    model, _ = load_model(tmp_path / "m")
    P.apply_method(model, {"method": "lora", "r": 2, "target_modules": ["q_proj"]})
    trained(model)
    P.save_adapter(model, tmp_path / "ad")
    gen = ["generate", "--model", str(tmp_path / "m"), "--prompt", "Hi", "--max-new-tokens", "3", "--json"]
    assert main(gen + ["--adapter", str(tmp_path / "ad")]) == 0
    capsys.readouterr()
    assert main(gen + ["--adapter", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimtune generate: error: ") and "adapter folder not found" in err and "\n" not in err
    other = tiny()  # an adapter of another shape
    P.apply_method(other, {"method": "lora", "r": 2, "target_modules": ["q_proj"]})
    P.save_adapter(other, tmp_path / "other")
    assert main(gen + ["--adapter", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert "has shape (2, 64), this model needs (2, 256)" in err and "\n" not in err


def test_cli_merge_adapter(tmp_path, capsys):
    write_builtin(tmp_path / "m")
    model, _ = load_model(tmp_path / "m")
    P.apply_method(model, {"method": "lora", "r": 2, "target_modules": ["q_proj", "down_proj"], "use_dora": True})
    trained(model)
    x = ids()
    y = model(x)
    P.save_adapter(model, tmp_path / "ad")
    assert main(["merge-adapter", "--model", str(tmp_path / "m"), "--adapter", str(tmp_path / "ad"),
                 "--out", str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(tmp_path / "out")
    merged, _ = load_model(tmp_path / "out")
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert (merged(x) - y).abs().max() < 1e-5
    assert (tmp_path / "out" / "tokenizer.json").exists()
