"""Loose ends of the adapter methods: prefix tuning on a transformers model (through its cache) against PEFT;
deleting or unloading an adapter leaves the model exactly as it was before (prompt encoders, hooks, added biases,
RoPE changes included); Houlsby adapters train the layer norms, as the paper."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_model

from slimtune.errors import ConfigError
from slimtune.models.tiny import builtin_model
from slimtune.peft import (adapter_parameters, apply_method, delete_adapter, freeze_base, load_adapter,
                           merge_and_unload, save_adapter, unload)
from slimtune.peft.prompt import forward_with_prompts

peft = pytest.importorskip("peft")


def _randomize(model, scale=0.05):
    with torch.no_grad():
        for p in adapter_parameters(model, "default"):
            p.add_(torch.randn_like(p) * scale)


# ---- prefix tuning on transformers ------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_on_transformers_matches_peft(projection, tmp_path):
    torch.manual_seed(0)
    model = make_hf_model("llama3").eval()
    cfg = {"method": "prefix", "num_virtual_tokens": 4}
    if projection:
        cfg.update(prefix_projection=True, encoder_hidden_size=16)
    apply_method(model, cfg)
    _randomize(model, 0.3)
    x = torch.randint(3, 290, (2, 9))
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding
    labels = x.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ours = forward_with_prompts(model, x, attention_mask=mask, labels=labels)
    save_adapter(model, tmp_path / "prefix")
    pm = peft.PeftModel.from_pretrained(make_hf_model("llama3"), str(tmp_path / "prefix")).eval()
    with torch.no_grad():
        theirs = pm(input_ids=x, attention_mask=mask, labels=labels)
    real = mask.bool()
    torch.testing.assert_close(theirs.logits[real], ours.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.loss, ours.loss, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the prefix matters
        assert (make_hf_model("llama3")(x, attention_mask=mask).logits - ours.logits)[real].abs().max() > 1e-3


def test_prefix_written_by_peft_loads_on_transformers(tmp_path):
    torch.manual_seed(1)
    pm = peft.get_peft_model(make_hf_model("llama3"), peft.PrefixTuningConfig(num_virtual_tokens=3,
                                                                               task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "prompt_encoder" in n:
                p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "p")
    x = torch.randint(3, 290, (2, 7))
    with torch.no_grad():
        want = pm.eval()(input_ids=x).logits
    model = make_hf_model("llama3").eval()
    load_adapter(model, tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(forward_with_prompts(model, x).logits, want, rtol=1e-5, atol=1e-5)


# ---- deleting and unloading leave nothing behind -------------------------------------------------------------------
def _fingerprint(model) -> tuple:
    """Every module path and type, parameter and buffer name, shape and value, and the attention hooks."""
    mods = tuple((n, type(m).__name__) for n, m in model.named_modules())
    tensors = tuple((n, tuple(t.shape), t.detach().clone()) for n, t in [*model.named_parameters(),
                                                                         *model.named_buffers()])
    hooks = tuple((getattr(m, "prefix", None), getattr(m, "s2_group", None)) for m in model.modules()
                  if type(m).__name__ == "Attention")
    cfg = getattr(model, "config", None)
    rope = (getattr(cfg, "rope_scaling", None), getattr(cfg, "max_position_embeddings", None))
    return mods, tensors, hooks, rope


def _same(a, b) -> None:
    assert a[0] == b[0] and a[2] == b[2] and a[3] == b[3]
    assert [(n, s) for n, s, _ in a[1]] == [(n, s) for n, s, _ in b[1]]
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(a[1], b[1]))


REMOVABLE = {
    "prompt": {"method": "prompt", "num_virtual_tokens": 3},
    "ptuning": {"method": "ptuning", "num_virtual_tokens": 3, "encoder_hidden_size": 16},
    "prefix": {"method": "prefix", "num_virtual_tokens": 3},
    "bitfit": {"method": "bitfit", "add_bias": True},
    "houlsby": {"method": "houlsby", "r": 2},
    "lora": {"method": "lora", "r": 2, "target_modules": "all-linear", "modules_to_save": ["lm_head"]},
    "longlora": {"method": "longlora", "r": 2},
}


@pytest.mark.parametrize("how", ["delete", "unload"])
@pytest.mark.parametrize("case", list(REMOVABLE))
def test_removal_leaves_the_model_as_it_was(case, how):
    model = builtin_model(1).eval()
    before = _fingerprint(model)
    x = torch.randint(8, 264, (2, 6))
    with torch.no_grad():
        want = model(x)
    apply_method(model, dict(REMOVABLE[case]))
    apply_method(model, dict(REMOVABLE[case]), "second")  # two adapters of the method: both go
    assert len(_fingerprint(model)[1]) > len(before[1]) or case == "longlora"
    if how == "delete":
        delete_adapter(model, "default")
        delete_adapter(model, "second")
    else:
        unload(model)
    _same(_fingerprint(model), before)
    assert not hasattr(model, "prompt_encoder")
    with torch.no_grad():
        assert torch.equal(model(x), want)


@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix"])
def test_prompt_adapters_refuse_to_merge_and_go_on_transformers(method):
    model = make_hf_model("llama2").eval()
    before = _fingerprint(model)
    apply_method(model, {"method": method, "num_virtual_tokens": 2})
    with pytest.raises(ConfigError, match="cannot be merged"):
        merge_and_unload(model)
    assert hasattr(model, "prompt_encoder")  # nothing was removed by the refused merge
    delete_adapter(model, "default")
    _same(_fingerprint(model), before)


# ---- Houlsby trains the layer norms ---------------------------------------------------------------------------------
def test_houlsby_trains_layer_norms(tmp_path):
    torch.manual_seed(3)
    model = builtin_model(2)
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    assert len(norms) == 2 * 4 + 1
    apply_method(model, {"method": "houlsby", "r": 2})
    freeze_base(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".modules_to_save")[0] for n in trained if "modules_to_save" in n} == \
        {n.rsplit(".", 1)[0] for n in norms}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(8, 264, (2, 8))
    for _ in range(3):
        lg = model(x)
        F.cross_entropy(lg[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    live = dict(model.named_parameters())
    for n, w in norms.items():
        base = n.replace(".weight", ".base_layer.weight")
        copy = n.replace(".weight", ".modules_to_save.default.weight")
        assert torch.equal(live[base], w) and not torch.equal(live[copy], w), n
    save_adapter(model, tmp_path / "h")
    fresh = builtin_model(2)
    load_adapter(fresh, tmp_path / "h")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=1e-6)
