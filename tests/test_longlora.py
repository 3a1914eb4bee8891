"""LongLoRA: RoPE scaling (linear, dynamic NTK, YaRN) against transformers' logits; S^2-Attn against full attention
when a group covers the sequence, against the paper's pseudocode index by index, and against a dense float64
computation of its definition (masks, grouped-query heads, lengths that are no multiple of the group, gradients);
the method: what it trains, its file, its removal, and a `finetune method=longlora` run."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slimtune.models.config import ModelConfig
from slimtune.models.decoder import Decoder, init_weights
from slimtune.models.shifted import segments, shifted_attention
from slimtune.peft import (adapter_parameters, apply_method, delete_adapter, freeze_base, load_adapter,
                           merge_and_unload, save_adapter)


def sdpa(q, k, v, mask, is_causal):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


# ---- RoPE scaling against transformers ------------------------------------------------------------------------------
ROPES = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, 64),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0}, 16),  # 40 positions > 16: the base grows
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, 64),
    "yarn_mscale": ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "mscale": 0.8,
                     "mscale_all_dim": 0.5, "beta_fast": 16}, 128),
}


@pytest.mark.parametrize("kind", list(ROPES))
def test_rope_scaling_logits_match_transformers(kind, tmp_path):
    import transformers

    from slimtune.models.load import load_model

    rope, max_pos = ROPES[kind]
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                                   rope_parameters={**rope, "rope_theta": 10000.0}, tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():  # sharp attention (large q, k) so that positions matter
            p.normal_(0, 0.5 if n.endswith(("q_proj.weight", "k_proj.weight")) else 0.08)
    ref.save_pretrained(tmp_path)
    model, mc = load_model(tmp_path)
    assert mc.rope_scaling["rope_type"] == rope["rope_type"]
    ids = torch.randint(3, 300, (2, 40))
    plain = Decoder(mc.replace(rope_scaling=None))
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        theirs = ref(ids).logits
        diff = (model(ids) - theirs).abs().max().item()
        assert (plain(ids) - theirs).abs().max() > 1e-3  # the scaling matters at these positions
    assert diff <= 2e-5, f"{kind}: max |diff| {diff}"


def test_yarn_attention_factor_and_ramp():
    from slimtune.models.rope import rope_attention_factor, rope_inv_freq

    cfg = ModelConfig(vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                      rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256})
    assert rope_attention_factor(cfg) == pytest.approx(0.1 * math.log(4) + 1)
    inv = rope_inv_freq(cfg)
    base = rope_inv_freq(cfg.replace(rope_scaling=None))
    turns = 256 * base / (2 * math.pi)  # rotations of each dimension over the original context
    assert torch.equal(inv[turns > 32], base[turns > 32])  # fast dimensions kept
    torch.testing.assert_close(inv[turns < 1], base[turns < 1] / 4)  # slow ones interpolated


# ---- S^2-Attn ---------------------------------------------------------------------------------------------------
def paper_s2(q, k, v, G):
    """The paper's Algorithm 1 (and the authors' non-flash code): roll the second half of the heads by -G/2, causal
    attention within groups of G, roll back."""
    B, H, N, D = q.shape

    def shift(x):
        x = x.clone()
        x[:, H // 2:] = x[:, H // 2:].roll(-G // 2, dims=2)
        return x.transpose(1, 2).reshape(B * N // G, G, H, D).transpose(1, 2)

    out = sdpa(shift(q), shift(k), shift(v), None, True).transpose(1, 2).reshape(B, N, H, D)
    out[:, :, H // 2:] = out[:, :, H // 2:].roll(G // 2, dims=1)
    return out.transpose(1, 2)


def group_of(t: int, shifted: bool, G: int) -> int:
    return t // G if not shifted else (0 if t < G // 2 else (t - G // 2) // G + 1)


def dense_s2(q, k, v, mask, G):
    """S^2-Attn from its definition, in float64: query t of head h sees key s <= t of its group (mask permitting)."""
    B, H, T, D = q.shape
    r = H // k.shape[1]
    k, v = k.double().repeat_interleave(r, 1), v.double().repeat_interleave(r, 1)
    allow = torch.zeros(H, T, T, dtype=torch.bool)
    for h in range(H):
        sh = h >= H // 2
        for t in range(T):
            for s in range(t + 1):
                allow[h, t, s] = T <= G or group_of(t, sh, G) == group_of(s, sh, G)
    allow = allow[None] & (mask if mask is not None else torch.ones(B, 1, T, T, dtype=torch.bool))
    att = (q.double() @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~allow, float("-inf")).softmax(-1)
    return att @ v


def test_s2_equals_full_attention_when_a_group_covers_the_sequence():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    full = sdpa(q, k, v, None, True)
    for G in (12, 16):
        assert torch.equal(shifted_attention(q, k, v, None, G, sdpa), full)
    assert (shifted_attention(q, k, v, None, 4, sdpa) - full).abs().max() > 1e-3  # smaller groups differ
    # through the decoder in training mode: S^2 with a group of the whole row is the plain model
    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = init_weights(Decoder(cfg), 1, std=0.1).train()
    ids = torch.randint(0, 300, (2, 16))
    want = model(ids)
    for layer in model.model.layers:
        layer.self_attn.s2_group = 16
    assert torch.equal(model(ids), want)
    for layer in model.model.layers:
        layer.self_attn.s2_group = 4
    assert (model(ids) - want).abs().max() > 1e-4
    assert torch.equal(model.eval()(ids), want)  # inference: full attention whatever s2_group says


def test_s2_shift_index_by_index_against_the_paper():
    """T = 8, G = 4, one plain head and one shifted head; q = k = 0 makes the attention uniform over the keys a query
    sees, and one-hot values read those keys out."""
    T, G = 8, 4
    q = torch.zeros(1, 2, T, T)
    v = torch.eye(T).expand(1, 2, T, T).contiguous()
    ours = shifted_attention(q, q, v, None, G, sdpa)[0]  # (heads, query, key): 1/n on each visible key
    paper = paper_s2(q, q, v, G)[0]
    assert segments(T, 0, G) == [(0, 4), (4, 8)] and segments(T, G // 2, G) == [(0, 2), (2, 6), (6, 8)]
    sees = {0: [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [4], [4, 5], [4, 5, 6], [4, 5, 6, 7]],
            1: [[0], [0, 1], [2], [2, 3], [2, 3, 4], [2, 3, 4, 5], [6], [6, 7]]}
    for h in (0, 1):
        for t in range(T):
            want = torch.zeros(T)
            want[sees[h][t]] = 1 / len(sees[h][t])
            assert torch.allclose(ours[h, t], want), (h, t)
            if h == 1 and t < G // 2:
                # the pseudocode's roll puts tokens 6, 7 and 0, 1 in one group: 0 and 1 also see 6 and 7 (the
                # future); the authors' flash path, and this one, keep [0, 2) and [6, 8) apart
                leak = sorted(set(sees[h][t]) | {6, 7})
                want = torch.zeros(T)
                want[leak] = 1 / len(leak)
            assert torch.allclose(paper[h, t], want), (h, t)


@pytest.mark.parametrize("T,G,nh,nkv,masked", [(16, 4, 4, 2, False), (13, 4, 4, 2, True), (18, 8, 4, 1, True),
                                                  (12, 4, 6, 2, False), (20, 6, 2, 2, True)])
def test_s2_against_its_definition_with_gradients(T, G, nh, nkv, masked):
    torch.manual_seed(T + G)
    q = torch.randn(2, nh, T, 8, requires_grad=True)
    k = torch.randn(2, nkv, T, 8, requires_grad=True)
    v = torch.randn(2, nkv, T, 8, requires_grad=True)
    mask = None
    if masked:  # two packed examples in row 0, left padding in row 1 (each query sees itself at least)
        seq = torch.zeros(2, T, dtype=torch.long)
        seq[0, T // 3:] = 1
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        pad = torch.ones(2, T, dtype=torch.bool)
        pad[1, :3] = False
        mask = (causal & (seq[:, :, None] == seq[:, None, :]) & pad[:, None, :]) | torch.eye(T, dtype=torch.bool)
        mask = mask[:, None]
    out = shifted_attention(q, k, v, mask, G, sdpa)
    want = dense_s2(q, k, v, mask, G)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    want_grads = torch.autograd.grad(want, (q, k, v), g.double())
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- the method -------------------------------------------------------------------------------------------------
def tiny(seed: int = 0, max_pos: int = 32) -> Decoder:
    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos)
    return init_weights(Decoder(cfg), seed, std=0.1)


def _names(model) -> set[str]:
    return {n for n, _ in model.named_parameters()}


def test_longlora_trains_lora_embed_norms_and_extends_rope(tmp_path):
    from slimtune.models.attention import Attention

    torch.manual_seed(0)
    model = tiny(max_pos=16)
    base_names, base_inv = _names(model), model._rotary["full_attention"].inv["cpu"].clone()
    apply_method(model, {"method": "longlora", "rope_factor": 4, "r": 4})
    assert model.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert model.config.max_position_embeddings == 64
    torch.testing.assert_close(model._rotary["full_attention"].inv["cpu"], base_inv / 4)
    assert {m.s2_group for m in model.modules() if isinstance(m, Attention)} == {16}  # a quarter of 64
    freeze_base(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    kinds = {n.split(".modules_to_save")[0].rsplit(".", 1)[-1] for n in trained if "modules_to_save" in n}
    assert kinds == {"embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"}
    assert {n.rsplit(".", 3)[0].rsplit(".", 1)[-1] for n in trained if "lora_" in n} == {"q_proj", "k_proj",
                                                                                         "v_proj", "o_proj"}
    ids = torch.randint(0, 300, (2, 64))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):  # S^2-Attn in training: groups of 16 over rows of 64
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        want = model(ids)
    save_adapter(model, tmp_path / "ll")
    fresh = tiny(max_pos=16)
    load_adapter(fresh, tmp_path / "ll")
    assert fresh.config.rope_scaling == model.config.rope_scaling
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids), want, rtol=0, atol=1e-6)
    # deleting removes everything: wrappers, copies, S^2-Attn, the RoPE scaling
    delete_adapter(fresh, "default")
    assert _names(fresh) == base_names and fresh.config.rope_scaling is None
    assert fresh.config.max_position_embeddings == 16 and torch.equal(fresh._rotary["full_attention"].inv["cpu"], base_inv)
    assert {m.s2_group for m in fresh.modules() if isinstance(m, Attention)} == {None}
    # merging keeps the extended RoPE and the trained embeddings / norms
    merged = merge_and_unload(model)
    assert _names(merged) == base_names and merged.config.rope_scaling["factor"] == 4.0
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), want, rtol=1e-5, atol=1e-5)


def test_longlora_written_file_loads_in_peft_as_lora(tmp_path):
    """PEFT reads the adapter as LoRA + modules_to_save; on a transformers base with the same rope_scaling the logits
    equal slimtune's."""
    import transformers

    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    model = tiny(2)
    from slimtune.models.save import save_model

    save_model(model, tmp_path / "base")
    apply_method(model, {"method": "longlora", "rope_factor": 2, "r": 4, "init_lora_weights": False})
    with torch.no_grad():
        for p in adapter_parameters(model, "default"):
            p.add_(torch.randn_like(p) * 0.05)
    save_adapter(model, tmp_path / "ll")
    hc = transformers.AutoConfig.from_pretrained(tmp_path / "base")
    hc.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": hc.rope_parameters["rope_theta"]}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", config=hc, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ll")).eval()
    ids = torch.randint(0, 300, (2, 60))
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, model.eval()(ids), rtol=1e-4, atol=1e-4)


def test_longlora_refusals():
    from conftest import make_hf_model

    from slimtune.errors import ConfigError

    with pytest.raises(ConfigError, match="slimtune's Decoder"):
        apply_method(make_hf_model("llama2"), {"method": "longlora"})
    scaled = tiny()
    scaled.config.rope_scaling = {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ConfigError, match="already scales RoPE"):
        apply_method(scaled, {"method": "longlora"})
    apply_method(scaled, {"method": "longlora", "rope_type": "none"})  # keeps the base's scaling
    for bad in ({"rope_type": "ntk"}, {"rope_factor": 0.5}, {"s2_group": 7}):
        with pytest.raises(ConfigError):
            apply_method(tiny(), {"method": "longlora", **bad})


def test_finetune_method_longlora_runs(tmp_path):
    import json

    from slimtune.cli import main
    from slimtune.data import sample_path
    from slimtune.models.save import save_model
    from slimtune.models.tiny import builtin_tokenizer

    save_model(tiny(3, max_pos=32), tmp_path / "base", tokenizer=builtin_tokenizer())
    rc = main(["finetune", "configs/longlora.yaml", f"model={tmp_path / 'base'}", f"data={sample_path()}",
               "data_limit=16", "data_format=auto", "max_length=64", "rope_factor=2", "s2_group=16", "batch_size=2",
               "grad_accum=1", "max_steps=3", "eval_every=0", "save_every=0", "lr=1e-3", "progress=false",
               "plot=false", "grad_ckpt=false", "precision=fp32", f"out_dir={tmp_path / 'out'}", "--json"])
    assert rc == 0
    cfg = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["slimtune_method"] == "longlora" and cfg["rope_factor"] == 2
    assert "embed_tokens" in cfg["modules_to_save"]
