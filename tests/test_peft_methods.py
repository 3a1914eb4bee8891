"""IA3, BitFit, Houlsby, prompt / prefix / P-tuning, partial and full fine-tuning on slimtune's tiny decoder and on a
tiny transformers Llama: (a) identity at the start, (b) training changes only the method's parameters, (c) save ->
load gives the same logits; plus each method's math against a direct computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_model

from slimtune.errors import CheckpointError, ConfigError
from slimtune.models.cache import KVCache
from slimtune.models.tiny import builtin_model
from slimtune.peft import (adapter_parameters, apply_method, disable_adapters, freeze_base, load_adapter,
                           merge_and_unload, save_adapter)
from slimtune.peft.prompt import forward_with_prompts, get_encoder

CASES = {  # name -> (config, starts as the identity)
    "ia3": ({"method": "ia3"}, True),
    "houlsby": ({"method": "houlsby", "r": 4}, True),
    "houlsby_gelu": ({"method": "houlsby", "r": 2, "non_linearity": "gelu", "layers_to_transform": [1]}, True),
    "bitfit": ({"method": "bitfit", "add_bias": True}, True),
    "prompt": ({"method": "prompt", "num_virtual_tokens": 4}, False),
    "ptuning_mlp": ({"method": "ptuning", "num_virtual_tokens": 4, "encoder_hidden_size": 32}, False),
    "ptuning_lstm": ({"method": "ptuning", "num_virtual_tokens": 3, "encoder_reparameterization_type": "LSTM",
                      "encoder_hidden_size": 16}, False),
    "prefix": ({"method": "prefix", "num_virtual_tokens": 4}, False),
    "prefix_mlp": ({"method": "prefix", "num_virtual_tokens": 4, "prefix_projection": True,
                    "encoder_hidden_size": 32}, False),
    "partial": ({"method": "partial", "last_k": 1, "trainable_modules": ["lm_head"]}, True),
    "full": ({"method": "full"}, True),
}
PROMPT_METHODS = ("prompt", "ptuning", "prefix")
KINDS = ("slimtune", "transformers")


def small_decoder(seed: int = 0) -> torch.nn.Module:
    """slimtune's decoder at the width of the transformers fixture (d 64, 2 layers): training tests stay fast."""
    from slimtune.models.config import ModelConfig
    from slimtune.models.decoder import Decoder, init_weights

    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return init_weights(Decoder(cfg), seed, std=0.08)


def make(kind: str, seed: int = 0) -> torch.nn.Module:
    """builtin: slimtune's built-in tiny model; slimtune: its decoder at d 64; transformers: a tiny LlamaForCausalLM."""
    return {"builtin": builtin_model, "slimtune": small_decoder}.get(kind, lambda s: make_hf_model("llama3", s))(seed)


def logits(model, x, method: str, mask=None):
    if method in PROMPT_METHODS:
        return forward_with_prompts(model, x, attention_mask=mask).logits
    out = model(x, attention_mask=mask)
    return out if isinstance(out, torch.Tensor) else out.logits


def loss(model, x, method: str):
    if method in PROMPT_METHODS:
        return forward_with_prompts(model, x, labels=x).loss
    lg = logits(model, x, method)
    return F.cross_entropy(lg[:, :-1].flatten(0, 1), x[:, 1:].flatten())


def params(case: str, kind: str):
    return CASES[case]


@pytest.mark.parametrize("kind", ("builtin", *KINDS))
@pytest.mark.parametrize("case", [c for c, (_, ident) in CASES.items() if ident])
def test_starts_as_identity(case, kind):
    cfg, _ = params(case, kind)
    model = make(kind).eval()
    x = torch.randint(3, 290, (2, 11))
    with torch.no_grad():
        ref = logits(model, x, cfg["method"])
        apply_method(model, dict(cfg))
        assert torch.equal(logits(model, x, cfg["method"]), ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_train_changes_only_method_params_and_reloads(case, kind, tmp_path):
    cfg, _ = params(case, kind)
    method = cfg["method"]
    torch.manual_seed(1)
    model = make(kind)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    apply_method(model, dict(cfg))
    n = freeze_base(model)
    train = adapter_parameters(model, "default")
    assert n == sum(p.numel() for p in {id(p): p for p in train}.values()) > 0
    assert all(p.requires_grad for p in train)
    x = torch.randint(3, 290, (2, 10))
    opt = torch.optim.Adam(train, lr=1e-2)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        lo = loss(model, x, method)
        lo.backward()
        opt.step()
        losses.append(lo.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    trained = {id(p) for p in train}
    for p in model.parameters():
        if id(p) in trained:
            if id(p) in before:  # a base parameter this method trains (bitfit, partial, full)
                assert not torch.equal(p, before[id(p)])
        else:
            assert id(p) in before, "a parameter the method added does not train"
            assert torch.equal(p, before[id(p)]), "a frozen base weight changed"
    # (c) save -> load into a fresh copy of the base gives identical logits
    model.eval()
    with torch.no_grad():
        want = logits(model, x, method)
    save_adapter(model, tmp_path / case)
    fresh = make(kind).eval()
    load_adapter(fresh, tmp_path / case)
    with torch.no_grad():
        got = logits(fresh, x, method)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if method not in PROMPT_METHODS:  # the loaded adapter does something: the base alone differs
        with torch.no_grad():
            assert (logits(make(kind).eval(), x, method) - got).abs().max() > 1e-4


# ---- IA3 --------------------------------------------------------------------------------------------------------
def _randomize(model, scale=0.3):
    with torch.no_grad():
        for p in adapter_parameters(model, "default"):
            p.add_(torch.randn_like(p) * scale)


def test_ia3_math_merge_unmerge_disable():
    torch.manual_seed(2)
    model = builtin_model(3).eval()
    x = torch.randint(8, 264, (2, 9))
    with torch.no_grad():
        base = model(x)
        apply_method(model, {"method": "ia3"})
        _randomize(model)
        attn = model.model.layers[1].self_attn
        h = torch.randn(2, 5, 256)
        lk, lv = attn.k_proj.ia3_l["default"], attn.v_proj.ia3_l["default"]
        assert lk.shape == (attn.k_proj.out_features, 1)
        torch.testing.assert_close(attn.k_proj(h), attn.k_proj.base_layer(h) * lk[:, 0])
        torch.testing.assert_close(attn.v_proj(h), attn.v_proj.base_layer(h) * lv[:, 0])
        down = model.model.layers[0].mlp.down_proj
        u = torch.randn(2, 5, 688)
        assert down.ia3_l["default"].shape == (1, 688)  # feedforward: scales the input
        torch.testing.assert_close(down(u), down.base_layer(u * down.ia3_l["default"][0]))
        adapted = model(x)
        assert (adapted - base).abs().max() > 1e-3
        with disable_adapters(model):
            assert torch.equal(model(x), base)
        w0 = down.base_layer.weight.clone()
        for _, m in model.named_modules():
            if hasattr(m, "ia3_l"):
                m.merge()
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)
        for _, m in model.named_modules():
            if hasattr(m, "ia3_l"):
                m.unmerge()
        torch.testing.assert_close(down.base_layer.weight, w0, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)
        plain = merge_and_unload(model)
        assert not any(hasattr(m, "ia3_l") for m in plain.modules())
        torch.testing.assert_close(plain(x), adapted, rtol=0, atol=1e-5)


# ---- Houlsby ----------------------------------------------------------------------------------------------------
def test_houlsby_math_and_count():
    torch.manual_seed(4)
    model = builtin_model(5).eval()
    apply_method(model, {"method": "houlsby", "r": 3, "non_linearity": "silu"})
    _randomize(model)
    o = model.model.layers[2].self_attn.o_proj
    h = torch.randn(3, 4, 256)
    with torch.no_grad():
        y = h @ o.base_layer.weight.T
        dn, up = o.adapter_down["default"], o.adapter_up["default"]
        want = y + (F.silu(y @ dn.weight.T + dn.bias) @ up.weight.T + up.bias)
        torch.testing.assert_close(o(h), want)
    d, L = 256, 4  # 2 adapters a block, each 2 d r + r + d (LoRA paper's count of Adapter^H), + 2 L + 1 norms of d
    assert sum(p.numel() for p in adapter_parameters(model, "default")) == 2 * L * (2 * d * 3 + 3 + d) + (2 * L + 1) * d
    bare = apply_method(builtin_model(5), {"method": "houlsby", "r": 3, "train_norms": False})
    assert sum(p.numel() for p in adapter_parameters(bare, "default")) == 2 * L * (2 * d * 3 + 3 + d)
    x = torch.randint(8, 264, (2, 5))
    with torch.no_grad(), disable_adapters(model):
        assert torch.equal(model(x), builtin_model(5)(x))
    with pytest.raises(ConfigError):
        merge_and_unload(model)  # a bottleneck with a nonlinearity does not fold into a linear weight


def test_ia3_named_adapters_switch_and_stack():
    from slimtune.peft import set_adapter

    torch.manual_seed(9)
    model = builtin_model(6).eval()
    apply_method(model, {"method": "ia3", "target_modules": ["v_proj"], "feedforward_modules": []}, "a")
    apply_method(model, {"method": "ia3", "target_modules": ["v_proj"], "feedforward_modules": []}, "b")
    v = model.model.layers[0].self_attn.v_proj
    with torch.no_grad():
        for n in "ab":
            v.ia3_l[n].uniform_(0.5, 1.5)
        h = torch.randn(3, 256)
        y0 = v.base_layer(h)
        assert model.__dict__["slimtune_active"] == ["b"]
        torch.testing.assert_close(v(h), y0 * v.ia3_l["b"][:, 0])
        set_adapter(model, "a")
        torch.testing.assert_close(v(h), y0 * v.ia3_l["a"][:, 0])
        set_adapter(model, ["a", "b"])
        torch.testing.assert_close(v(h), y0 * v.ia3_l["a"][:, 0] * v.ia3_l["b"][:, 0])


# ---- BitFit -----------------------------------------------------------------------------------------------------
def test_bitfit_llama_without_biases_says_so():
    with pytest.raises(ConfigError, match="add_bias"):
        apply_method(builtin_model(0), {"method": "bitfit"})


def test_bitfit_trains_existing_biases_only():
    from slimtune.models.decoder import Decoder, init_weights
    from slimtune.models.shapes import get_shape

    model = init_weights(Decoder(get_shape("tiny-qwen2")), 0)  # q, k, v biases; no others
    apply_method(model, {"method": "bitfit"})
    names = {n for n, p in model.named_parameters() if any(p is q for q in adapter_parameters(model, "default"))}
    assert names == {f"model.layers.{i}.self_attn.{k}_proj.bias" for i in range(2) for k in "qkv"}


# ---- prompt tuning, P-tuning ------------------------------------------------------------------------------------
def test_prompt_padding_and_loss_alignment():
    torch.manual_seed(6)
    model = builtin_model(1).eval()
    apply_method(model, {"method": "prompt", "num_virtual_tokens": 5})
    a = torch.randint(8, 264, (1, 7))
    with torch.no_grad():
        alone = forward_with_prompts(model, a).logits
        # the same row left-padded by 3 in a batch: its real tokens' logits are unchanged
        x = torch.cat([torch.zeros(1, 3, dtype=torch.long), a], 1)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
        padded = forward_with_prompts(model, x, attention_mask=mask).logits
        torch.testing.assert_close(padded[:, 3:], alone, rtol=0, atol=1e-5)
        # the loss: every label, the first included, is predicted from the position before it (a virtual one)
        labels = a.clone()
        labels[0, :2] = -100
        out = forward_with_prompts(model, a, labels=labels)
        emb = torch.cat([get_encoder(model).prompt_embeddings[None], model.model.embed_tokens(a)], 1)
        full = model(inputs_embeds=emb)  # (1, 5 + 7, V)
        want = F.cross_entropy(full[0, 6:-1], a[0, 2:])  # label t sits at 5 + t, predicted from 5 + t - 1
        torch.testing.assert_close(out.loss, want)
        torch.testing.assert_close(out.logits, full[:, 5:])


def test_prompt_init_from_text_and_vocab():
    from slimtune.models.tiny import builtin_tokenizer

    model = builtin_model(0)
    apply_method(model, {"method": "prompt", "num_virtual_tokens": 7, "prompt_tuning_init": "TEXT",
                         "prompt_tuning_init_text": "abc", "tokenizer_name_or_path": "builtin"})
    ids = builtin_tokenizer()("abc", add_special_tokens=False)["input_ids"]
    want = model.model.embed_tokens.weight[(ids * 3)[:7]]
    assert torch.equal(get_encoder(model).prompt_embeddings, want)
    apply_method(model, {"method": "prompt", "num_virtual_tokens": 6}, adapter_name="vocab")
    rows = get_encoder(model, "vocab").prompt_embeddings
    table = model.model.embed_tokens.weight
    assert all(any(torch.equal(r, t) for t in table) for r in rows)  # each a row of the vocabulary
    with pytest.raises(ConfigError):
        apply_method(builtin_model(0), {"method": "prompt", "prompt_tuning_init": "TEXT"})


def test_ptuning_fold_keeps_logits():
    from slimtune.peft.ptuning import fold

    torch.manual_seed(7)
    model = builtin_model(2).eval()
    apply_method(model, {"method": "ptuning", "num_virtual_tokens": 4, "encoder_reparameterization_type": "LSTM"})
    x = torch.randint(8, 264, (2, 6))
    with torch.no_grad():
        before = forward_with_prompts(model, x).logits
        fold(model)
        assert set(n for n, _ in get_encoder(model).named_parameters()) == {"prompt_embeddings"}
        torch.testing.assert_close(forward_with_prompts(model, x).logits, before, rtol=0, atol=1e-6)


# ---- prefix tuning ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [False, True])
def test_prefix_equals_a_prefilled_kv_cache(mask):
    """P prefix key/value pairs at every layer act as a KV cache that already holds P positions (keys stored as
    given, queries at positions P...): an independent path through the decoder."""
    torch.manual_seed(8)
    model = builtin_model(4).eval()
    apply_method(model, {"method": "prefix", "num_virtual_tokens": 3})
    enc = get_encoder(model)
    x = torch.randint(8, 264, (2, 6))
    am = torch.ones(2, 6, dtype=torch.long) if mask else None
    with torch.no_grad():
        got = forward_with_prompts(model, x, attention_mask=am).logits
        for layer in model.model.layers:  # unhook, and put the same tensors into a cache instead
            layer.self_attn.prefix = None
        cache = KVCache(model.config, 2, 16, "cpu", torch.float32)
        for i in range(4):
            k, v = enc.layer_kv(i)  # (nkv, P, hd)
            cache.k[i][:, :, :3], cache.v[i][:, :, :3] = k, v
        cache.pos = 3
        want = model(x, cache=cache, position_ids=torch.arange(3, 9)[None].expand(2, 6))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # PEFT's layout of prompt_embeddings: (P, L * 2 * nkv * hd), axis order (layer, k|v, head, hd)
    flat = enc.flat().view(3, 4, 2, 2, 64)
    assert torch.equal(enc.layer_kv(2)[1], flat[:, 2, 1].permute(1, 0, 2))


def test_prefix_needs_a_decoder_with_a_cache():
    with pytest.raises(ConfigError, match="KV cache"):
        apply_method(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10)), {"method": "prefix"})


# ---- partial / full ---------------------------------------------------------------------------------------------
def test_partial_selection():
    model = builtin_model(0)
    apply_method(model, {"method": "partial", "last_k": 2})
    names = {n for n, p in model.named_parameters() if any(p is q for q in adapter_parameters(model, "default"))}
    assert names == {n for n, _ in model.named_parameters() if n.startswith(("model.layers.2.", "model.layers.3."))}
    model = builtin_model(0)
    apply_method(model, {"method": "partial", "skip_first": 3})
    names = {n for n, p in model.named_parameters() if any(p is q for q in adapter_parameters(model, "default"))}
    assert names == {n for n, _ in model.named_parameters() if not n.startswith(("model.layers.0.", "model.layers.1.",
                                                                                  "model.layers.2."))}
    for bad in ({"method": "partial"}, {"method": "partial", "last_k": 9}, {"method": "partial", "last_k": -1},
                {"method": "partial", "trainable_modules": ["nope"]}):
        with pytest.raises(ConfigError):
            apply_method(builtin_model(0), bad)


def test_wrong_base_refused_before_anything_changes(tmp_path):
    model = builtin_model(0)
    apply_method(model, {"method": "houlsby", "r": 2})
    save_adapter(model, tmp_path / "h")
    other = make_hf_model("llama3")  # width 64, not 256
    with pytest.raises(CheckpointError, match="this model needs"):
        load_adapter(other, tmp_path / "h")
    assert not any(hasattr(m, "adapter_down") for m in other.modules())


@pytest.mark.parametrize("method", ["ia3", "houlsby"])
def test_on_a_quantized_base(method):
    """The wrappers need only the base layer's forward: they sit on an NF4 QuantLinear too (QLoRA-style)."""
    from slimtune.quant.linear import quantize_model

    model = small_decoder(3).eval()
    quantize_model(model, "nf4")
    x = torch.randint(3, 290, (2, 7))
    with torch.no_grad():
        ref = model(x)
        apply_method(model, {"method": method, "r": 2} if method == "houlsby" else {"method": method})
        assert torch.equal(model(x), ref)
        _randomize(model)
        assert (model(x) - ref).abs().max() > 1e-4
    with pytest.raises(ConfigError):
        merge_and_unload(model)
