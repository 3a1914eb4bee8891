"""Habits of PEFT / transformers / torchtune / axolotl users work: apply_method freezes the base (AdamW over
model.parameters() trains the adapter only), peft's config objects and their to_dict() apply, the command line takes
flags between positionals and --config, dotted keys and the other tools' key names, the model's output has .logits
and .loss, and an adapted model's state dict names its base weights as the plain model does."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

import slimtune.peft as P
from conftest import make_hf_model
from slimtune.cli import main
from slimtune.data import sample_path
from slimtune.errors import ConfigError
from slimtune.train.config import flat_options, load_config
from slimtune.train.keys import INSTEAD, RUN_ALIASES

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def hf_llama(seed: int = 0):
    return make_hf_model("llama2", seed)


def ids(seed: int = 1, vocab: int = 300) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 10), generator=torch.Generator().manual_seed(seed))


# ---- apply_method freezes, as get_peft_model ------------------------------------------------------------------------
def test_apply_then_adamw_over_all_parameters_trains_the_adapter_only():
    from slimtune.models.tiny import builtin_model

    model = builtin_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    P.apply_method(model, {"method": "lora", "r": 4, "target_modules": "all-linear"})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # the habit: every parameter handed over
    model.train()
    for _ in range(3):
        out = model(ids(vocab=model.config.vocab_size), labels=ids(vocab=model.config.vocab_size))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # base weights, under their own names
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)
    # freeze=False leaves the flags alone; freeze_base still returns the adapter's count
    other = builtin_model(0)
    P.apply_method(other, {"method": "lora", "r": 4, "target_modules": ["q_proj"]}, freeze=False)
    assert all(p.requires_grad for p in other.parameters())
    assert P.freeze_base(other) == sum(p.numel() for n, p in other.named_parameters() if "lora_" in n)


# ---- peft config objects ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("as_dict", [False, True])
@pytest.mark.parametrize("dora", [False, True])
def test_peft_lora_config_object_and_dict_apply(as_dict, dora):
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules={"q_proj", "down_proj"},
                          use_dora=dora, lora_dropout=0.0)
    theirs = peft.get_peft_model(hf_llama(), cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ours = hf_llama()
    P.apply_method(ours, cfg.to_dict() if as_dict else cfg)
    mine = {n for n, p in ours.named_parameters() if p.requires_grad}
    adapter = {k.removeprefix("base_model.model.").replace("vector.default.weight", "vector.default"): v
               for k, v in theirs.state_dict().items() if "lora_" in k}  # PEFT's DoRA magnitude: a module's weight
    assert mine == set(adapter)  # the same adapted modules and tensors, and only they train
    res = ours.load_state_dict(adapter, strict=False)
    assert not res.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()).logits, theirs(ids()).logits, rtol=0, atol=1e-5)


def test_peft_configs_refused_in_one_line():
    with pytest.raises(ConfigError, match="task_type='SEQ_CLS'.*CAUSAL_LM"):
        P.apply_method(hf_llama(), peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="layer_replication"):
        P.apply_method(hf_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], layer_replication=[[0, 2]]))
    with pytest.raises(ConfigError, match="needs a 'method' key"):
        P.apply_method(hf_llama(), {"r": 4})
    ia3 = P.method_config_from_dict(peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"]).to_dict())
    assert ia3.method == "ia3" and ia3.feedforward_modules == ["down_proj"]


# ---- the command line ------------------------------------------------------------------------------------------------
def cli_run(tmp_path, capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 1
    return yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())


def test_cli_flags_between_positionals_config_flag_and_foreign_names(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: builtin\ndata: {sample_path()}\ndata_limit: 8\nmax_length: 96\nmax_steps: 1\n"
                   f"batch_size: 2\nsave_final: false\nprogress: false\nplot: false\noptimizer: {{lr: 3.0e-3}}\n"
                   f"lora: {{r: 4}}\n")
    eff = cli_run(tmp_path, capsys, ["finetune", str(cfg), "--json", f"out_dir={tmp_path / 'o'}", "alpha=16"])
    assert eff["lr"] == 3e-3 and eff["rank"] == 4 and eff["alpha"] == 16  # nested YAML sections, flag in between
    eff = cli_run(tmp_path, capsys, ["finetune", "--config", str(cfg), "--json", "learning_rate=1e-3",
                                     "lora_r=2", "lora.init_lora_weights=gaussian", "model.lora_alpha=8",
                                     f"output_dir={tmp_path / 'o'}", "gradient_accumulation_steps=2",
                                     "tokenizer.max_seq_len=80", "lora_target_modules=all-linear"])
    assert (eff["lr"], eff["rank"], eff["alpha"], eff["grad_accum"], eff["max_length"], eff["targets"]) == \
        (1e-3, 2, 8, 2, 80, "all-linear")
    assert eff["method_args"] == {"init_lora_weights": "gaussian"} and "learning_rate" not in eff


def test_cli_unknown_flag_still_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "x.yaml", "--bogus", "lr=1"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert main(["finetune", "a.yaml", "--config", "b.yaml"]) == 2
    assert "two config files" in capsys.readouterr().err


# ---- key names -------------------------------------------------------------------------------------------------------
def test_every_declared_alias_sets_its_key():
    for key, names in RUN_ALIASES.items():
        for name in names:
            value = {"model": "m", "method": "dora", "data": "d.json", "max_length": 77, "packing": False,
                     "train_on_prompt": True, "val_fraction": 0.1, "grad_ckpt": True, "batch_size": 3,
                     "grad_accum": 5, "epochs": 2.0, "lr": 1e-5, "warmup_steps": 7, "schedule": "linear",
                     "max_grad_norm": 0.5, "eval_every": 9, "save_every": 11, "keep_last": 4, "resume": "latest",
                     "out_dir": "o2", "log_every": 3}[key]
            cfg = load_config(None, ["data=x.json", f"{name}={value}"])
            assert getattr(cfg, key) == value, (name, key)
    opts = {"rank": 6, "alpha": 12.0, "dropout": 0.1, "targets": ["q_proj", "o_proj"]}
    for key, o in flat_options().items():
        for name in o.aliases:
            text = ",".join(opts[key]) if isinstance(opts[key], list) else opts[key]
            assert getattr(load_config(None, ["data=x.json", f"{name}={text}"]), key) == opts[key], name
    assert {"lora_r", "lora_rank", "r"} <= set(flat_options()["rank"].aliases)


def test_unknown_keys_get_real_suggestions():
    def err(item: str) -> str:
        with pytest.raises(ConfigError) as e:
            load_config(None, ["data=x.json", item])
        return str(e.value)

    assert "log_every" not in err("lora_rr=8") and "did you mean 'rank'" in err("lora_rr=8")
    assert "did you mean 'lr'" in err("learnng_rate=1")
    assert "did you mean 'batch_size'" in err("bach_size=2")
    assert f"write {INSTEAD['bf16']} instead" in err("bf16=true")
    assert "write targets=all-linear instead" in err("lora_target_linear=true")
    assert "dotted keys are SECTION.KEY" in err("foo.bar=1")
    assert "valid keys:" in err("zzzz=1")


def test_dotted_method_fields_and_duplicates(tmp_path):
    from slimtune.train.build import method_config

    cfg = load_config(None, ["data=x.json", "method=dora", "dora.r=4", "lora.alpha=2", "method_args.use_rslora=true",
                             "peft.lora_dropout=0.1"])
    m = method_config(cfg)
    assert (m.r, m.lora_alpha, m.use_rslora, m.lora_dropout, m.use_dora) == (4, 2.0, True, 0.1, True)
    nested = tmp_path / "nested.yaml"
    nested.write_text("data: x.json\nlora:\n  r: 8\n  rank_pattern: {q_proj: 2}\n")  # a mapping field stays whole
    m = method_config(load_config(nested))
    assert (m.r, m.rank_pattern) == (8, {"q_proj": 2})
    p = tmp_path / "two.yaml"
    p.write_text("data: x.json\nlr: 1.0e-4\nlearning_rate: 2.0e-4\n")
    with pytest.raises(ConfigError, match="lr is set twice, as 'lr' and as 'learning_rate'"):
        load_config(p)


def test_warmup_ratio():
    from slimtune.optim.schedules import warmup_count

    assert warmup_count(0, 0.1, 95) == 10 and warmup_count(3, 0.1, 95) == 3  # ceil, as transformers; steps win
    assert load_config(None, ["data=x.json", "warmup_ratio=0.05"]).warmup_ratio == 0.05
    with pytest.raises(ConfigError, match="warmup_ratio must be in"):
        load_config(None, ["data=x.json", "warmup_ratio=1.5"])


# ---- the output object -----------------------------------------------------------------------------------------------
def test_output_has_logits_and_transformers_loss(tmp_path):
    from slimtune.models.load import load_model

    hf = hf_llama()
    hf.save_pretrained(tmp_path / "m")
    ours, _ = load_model(tmp_path / "m")
    x = ids()
    labels = x.clone()
    labels[0, :4] = -100
    out = ours(x, labels=labels)
    ref = hf(x, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-6)
    assert ours(x).loss is None and torch.equal(ours(x), out.detach())
    assert type(out[:, -1]) is torch.Tensor and type(out.logits.softmax(-1)) is torch.Tensor  # ops: plain tensors
    out.loss.backward()
    assert ours.lm_head.weight.grad is not None


# ---- state dicts of adapted models ----------------------------------------------------------------------------------
def test_adapted_transformers_model_save_pretrained_reloads_the_base(tmp_path):
    model, base = hf_llama(), hf_llama()
    P.apply_method(model, {"method": "lora", "r": 4, "target_modules": "all-linear"})
    sd = model.state_dict()
    assert not any("base_layer" in k for k in sd)
    assert set(base.state_dict()) <= set(sd)  # every base weight under its own name, plus the adapters
    model.save_pretrained(tmp_path / "s")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(back(ids()).logits, base(ids()).logits)
    # both namings load back; a base state dict loads into the adapted model (only the adapters are missing)
    fresh = hf_llama(seed=9)
    P.apply_method(fresh, {"method": "lora", "r": 4, "target_modules": "all-linear"})
    res = fresh.load_state_dict(base.state_dict(), strict=False)
    assert not res.unexpected_keys and all("lora_" in k for k in res.missing_keys)
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(fresh(ids()).logits, model(ids()).logits)
    legacy = {k.replace("q_proj.weight", "q_proj.base_layer.weight"): v for k, v in sd.items()}
    assert any("base_layer" in k for k in legacy)
    fresh.load_state_dict(legacy)
