"""Generation with prompt, P-tuning and prefix adapters: greedy ids from the KV-cache path (dynamic and static, padded
batches) equal a reference that re-runs the whole sequence through `forward_with_prompts` for every token; and
`slimtune generate --adapter` with such an adapter folder prints the same text."""
from __future__ import annotations

import json

import pytest
import torch
from test_generate import EagerStep

import slimtune.generate as G
from slimtune.generate import SamplingConfig, generate
from slimtune.models.tiny import builtin_model
from slimtune.peft import adapter_parameters, apply_method, save_adapter
from slimtune.peft.prompt import forward_with_prompts

CASES = {"prompt": {"method": "prompt", "num_virtual_tokens": 4},
         "ptuning": {"method": "ptuning", "num_virtual_tokens": 3, "encoder_hidden_size": 32},
         "ptuning_lstm": {"method": "ptuning", "num_virtual_tokens": 3, "encoder_reparameterization_type": "LSTM",
                          "encoder_hidden_size": 16},
         "prefix": {"method": "prefix", "num_virtual_tokens": 5}}


def adapted(case: str, seed: int = 0):
    torch.manual_seed(seed)
    model = builtin_model(seed).eval()
    apply_method(model, dict(CASES[case]))
    with torch.no_grad():
        for p in adapter_parameters(model, "default"):
            p.add_(torch.randn_like(p) * 0.5)
    return model


@torch.no_grad()
def greedy_reference(model, ids, am, n: int) -> torch.Tensor:
    out = []
    for _ in range(n):
        nxt = forward_with_prompts(model, ids, attention_mask=am).logits[:, -1].argmax(-1)
        out.append(nxt)
        ids, am = torch.cat([ids, nxt[:, None]], 1), torch.cat([am, am.new_ones(len(am), 1)], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("case", list(CASES))
def test_generation_with_prompt_adapters_equals_full_recompute(case, monkeypatch):
    model = adapted(case)
    ids = torch.randint(8, 264, (2, 7))
    am = torch.ones_like(ids)
    am[1, :3] = 0  # a left-padded row
    sc = SamplingConfig(max_new_tokens=12, stop_token_ids=[])
    want = greedy_reference(model, ids, am, 12)
    got = generate(model, ids, am, sc, cuda_graph=False)
    assert torch.equal(got, want)
    with torch.no_grad():  # the adapter changes what is generated
        plain = builtin_model(0).eval()
        assert not torch.equal(generate(plain, ids, am, sc, cuda_graph=False), want)
    monkeypatch.setattr(G, "GraphStep", EagerStep)  # the static cache that CUDA graphs replay
    assert torch.equal(generate(model, ids, am, sc, cuda_graph=True), want)
    if case == "prefix":  # the attention hooks are back after generation
        assert all(layer.self_attn.prefix is not None for layer in model.model.layers)


@pytest.mark.parametrize("case", ["prompt", "prefix", "ptuning"])
def test_cli_generate_with_prompt_adapter(case, tmp_path, capsys):
    from slimtune.cli import main
    from slimtune.models.tiny import builtin_tokenizer, write_builtin

    write_builtin(tmp_path / "base", seed=0)
    model = adapted(case)
    save_adapter(model, tmp_path / "adapter")
    tok = builtin_tokenizer()
    ids = torch.tensor([tok("hello there")["input_ids"]])
    want = tok.decode(greedy_reference(model, ids, torch.ones_like(ids), 6)[0].tolist(), skip_special_tokens=True)
    rc = main(["generate", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--prompt",
               "hello there", "--max-new-tokens", "6", "--json", "--device", "cpu"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["outputs"] == [want]
