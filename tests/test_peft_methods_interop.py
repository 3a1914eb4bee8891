"""IA3 and prompt-method adapters cross between slimtune and PEFT 0.21: written by slimtune on a tiny transformers
Llama, read by `peft.PeftModel.from_pretrained`, same logits (and the reverse for IA3, into slimtune's own decoder)."""
from __future__ import annotations

import pytest
import torch
from conftest import make_hf_model

from slimtune.peft import adapter_parameters, apply_method, load_adapter, save_adapter
from slimtune.peft.prompt import forward_with_prompts

peft = pytest.importorskip("peft")


def _randomize(model, scale=0.3):
    with torch.no_grad():
        for p in adapter_parameters(model, "default"):
            p.add_(torch.randn_like(p) * scale)


def _peft_logits(folder, x, mask=None, labels=None):
    base = make_hf_model("llama3").eval()
    pm = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        out = pm(input_ids=x, attention_mask=mask, labels=labels)
    return out


def test_ia3_written_by_slimtune_loads_in_peft(tmp_path):
    torch.manual_seed(0)
    model = make_hf_model("llama3").eval()
    apply_method(model, {"method": "ia3"})
    _randomize(model)
    save_adapter(model, tmp_path / "ia3")
    x = torch.randint(3, 290, (2, 9))
    with torch.no_grad():
        ours = model(x).logits
    theirs = _peft_logits(tmp_path / "ia3", x).logits
    assert (ours - make_hf_model("llama3")(x).logits).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_prompt_adapter_written_by_slimtune_loads_in_peft(method, tmp_path):
    torch.manual_seed(1)
    model = make_hf_model("llama3").eval()
    apply_method(model, {"method": method, "num_virtual_tokens": 5})
    _randomize(model, 0.05)
    save_adapter(model, tmp_path / method)
    x = torch.randint(3, 290, (2, 8))
    mask = torch.ones_like(x)
    labels = x.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        ours = forward_with_prompts(model, x, attention_mask=mask, labels=labels)
    theirs = _peft_logits(tmp_path / method, x, mask, labels)
    assert theirs.logits.shape == (2, 5 + 8, 300)  # PEFT returns the virtual positions too
    torch.testing.assert_close(theirs.logits[:, 5:], ours.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.loss, ours.loss, rtol=1e-5, atol=1e-6)


def test_prefix_written_by_slimtune_matches_peft_on_transformers(tmp_path):
    """The same checkpoint as slimtune's decoder with our prefix and as a transformers model with PEFT's prefix
    (past_key_values) from our file: PEFT's (P, 2 L nkv hd) layout and position offset are reproduced."""
    from slimtune.models.load import load_model

    hf = make_hf_model("llama3")
    hf.save_pretrained(tmp_path / "base")
    model, _ = load_model(tmp_path / "base")
    torch.manual_seed(2)
    apply_method(model, {"method": "prefix", "num_virtual_tokens": 3})
    save_adapter(model, tmp_path / "prefix")
    x = torch.randint(3, 290, (2, 7))
    mask = torch.ones_like(x)
    with torch.no_grad():
        ours = forward_with_prompts(model.eval(), x, attention_mask=mask).logits
    theirs = _peft_logits(tmp_path / "prefix", x, mask).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_ia3_written_by_peft_loads_in_slimtune(tmp_path):
    from slimtune.models.load import load_model

    hf = make_hf_model("llama3").eval()
    hf.save_pretrained(tmp_path / "base")
    torch.manual_seed(3)
    pm = peft.get_peft_model(make_hf_model("llama3"), peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.add_(torch.randn_like(p) * 0.3)
    pm.save_pretrained(tmp_path / "peft_ia3")
    x = torch.randint(3, 290, (2, 9))
    with torch.no_grad():
        want = pm.eval()(input_ids=x).logits
        load_adapter(hf, tmp_path / "peft_ia3")
        torch.testing.assert_close(hf(x).logits, want, rtol=1e-5, atol=1e-5)
        ours, _ = load_model(tmp_path / "base")
        load_adapter(ours, tmp_path / "peft_ia3")
        torch.testing.assert_close(ours.eval()(x), want, rtol=1e-4, atol=1e-4)
