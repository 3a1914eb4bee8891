"""LoRA and DoRA on slimtune's decoder: identity at start, training touches only the adapter, merge == unmerge ==
unload, several adapters, the three combinations against a direct computation of the summed update, meta counting."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import slimtune.peft as P
from slimtune.errors import ConfigError
from slimtune.models.config import ModelConfig
from slimtune.models.decoder import Decoder, init_weights
from slimtune.peft.lora import LoraConfig, LoraLinear

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)


def tiny(seed: int = 0) -> Decoder:
    return init_weights(Decoder(CFG), seed, std=0.08).eval()


def ids(seed: int = 1, B: int = 2, T: int = 11) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize(model: nn.Module, name: str = "default", seed: int = 3, std: float = 0.1) -> None:
    """Give adapter `name` a nonzero update (B starts at zero) and, for DoRA, a magnitude away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear) and name in m.lora_B:
                w = m.lora_B[name].weight
                w.copy_(torch.randn(w.shape, generator=g) * std)
                if name in m.lora_magnitude_vector:
                    v = m.lora_magnitude_vector[name]
                    v.mul_(1 + 0.2 * torch.rand(v.shape, generator=g))


def lora(**kw) -> LoraConfig:
    base = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    base.update(kw)
    return LoraConfig(**base)


PINNED = (4.969533, 3.892663)  # first and last loss of the 'lora' variant, torch 2.x CPU fp32
VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True, "r": 8},
            "patterns": {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers.1.self_attn.q_proj": 3.0}}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_starts_equal_to_base_then_trains_only_the_adapter(variant):
    torch.manual_seed(0)
    model, x = tiny(), ids()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    y0 = model(x)
    P.apply_method(model, lora(**VARIANTS[variant]))
    assert torch.equal(model(x), y0)  # B = 0 (and m = ||W0||): exactly the base
    n = P.freeze_base(model)
    rep = P.trainable_report(model, print_line=False)
    assert rep["trainable"] == n > 0 and rep["total"] == sum(p.numel() for p in model.parameters())
    trainable = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    assert all(("lora_" in k) for k in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, CFG.vocab_size), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    if variant == "lora":  # pinned: any change of the numerics shows here
        assert losses[0] == pytest.approx(PINNED[0], abs=1e-4) and losses[-1] == pytest.approx(PINNED[1], abs=1e-4), \
            losses
    after = model.state_dict()
    for k, v in base_sd.items():  # the base weights sit under base_layer now
        k2 = k if k in after else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after[k2], v), k
    changed = [k for k, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[k])]
    assert set(changed) == set(trainable)  # A, B (and m) all moved


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merged_equals_unmerged_equals_unloaded(variant):
    model, x = tiny(), ids()
    P.apply_method(model, lora(**VARIANTS[variant]))
    randomize(model)
    y = model(x)
    with P.disable_adapters(model):
        y_base = model(x)
    assert (y - y_base).abs().max() > 1e-2  # the adapter does something
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    w0 = [m.base_layer.weight.clone() for m in layers]
    for m in layers:
        m.merge()
    y_merged = model(x)
    assert (y_merged - y).abs().max() <= 1e-5
    for m, w in zip(layers, w0):
        m.unmerge()
        assert (m.base_layer.weight - w).abs().max() <= 1e-6
    assert (model(x) - y).abs().max() <= 1e-5
    P.merge_and_unload(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert set(model.state_dict()) == set(tiny().state_dict())
    assert (model(x) - y).abs().max() <= 1e-5
    fresh = tiny()
    P.apply_method(fresh, lora(**VARIANTS[variant]))
    P.unload(fresh)
    assert torch.equal(fresh(x), y_base)


def test_dora_matches_its_definition():
    """DoRA weight = m * (W0 + s B A) / ||W0 + s B A||_row, checked in float64 on one layer."""
    torch.manual_seed(0)
    lin = nn.Linear(24, 16, dtype=torch.float64)
    layer = LoraLinear(lin)
    layer.add("d", r=3, alpha=6.0, dora=True)
    layer.set_active(["d"])
    with torch.no_grad():
        layer.lora_B["d"].weight.normal_(0, 0.3)
        layer.lora_magnitude_vector["d"].mul_(torch.rand(16, dtype=torch.float64) + 0.5)
    x = torch.randn(5, 24, dtype=torch.float64)
    W = lin.weight + 2.0 * layer.lora_B["d"].weight @ layer.lora_A["d"].weight
    Wd = layer.lora_magnitude_vector["d"][:, None] * W / W.norm(dim=1, keepdim=True)
    assert torch.allclose(layer(x), x @ Wd.T + lin.bias, atol=1e-12)


def test_adapter_stays_fp32_on_16bit_base_and_on_a_quantized_base():
    lin = nn.Linear(32, 48).to(torch.bfloat16)
    layer = LoraLinear(lin)
    layer.add("a", r=4, alpha=4)
    layer.set_active(["a"])
    assert layer.lora_A["a"].weight.dtype == torch.float32
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16

    class FakeQuant(nn.Module):  # no float weight: in/out features and dequantize(), as QuantLinear
        def __init__(self, w: torch.Tensor) -> None:
            super().__init__()
            self.in_features, self.out_features = w.shape[1], w.shape[0]
            self.register_buffer("codes", (w * 100).round().to(torch.int8))
            self.bias = None

        def dequantize(self, dtype=None):
            return self.codes.to(dtype or torch.float32) / 100

        def forward(self, x):
            return x @ self.dequantize(x.dtype).T

    q = LoraLinear(FakeQuant(torch.randn(16, 8) * 0.5))
    q.add("a", r=2, alpha=2)
    q.set_active(["a"])
    with torch.no_grad():
        q.lora_B["a"].weight.normal_()
    x = torch.randn(4, 8)
    y = q(x)
    q.merge()
    assert isinstance(q.base_layer, nn.Linear)  # merging dequantizes once into a dense layer
    assert (q(x) - y).abs().max() < 1e-5


def test_several_adapters_switch_disable_delete():
    model, x = tiny(), ids()
    y_base = model(x)
    P.apply_method(model, lora(), "a")
    randomize(model, "a", seed=1)
    P.apply_method(model, lora(target_modules=["k_proj", "up_proj"], r=2), "b")
    randomize(model, "b", seed=2)
    assert P.active_adapters(model) == ["b"]
    y_b = model(x)
    P.set_adapter(model, "a")
    y_a = model(x)
    P.set_adapter(model, ["a", "b"])
    y_ab = model(x)
    with P.disable_adapters(model):
        assert torch.equal(model(x), y_base)
    assert torch.equal(model(x), y_ab)
    # references: one fresh model per adapter, loaded through files
    for name, y in (("a", y_a), ("b", y_b)):
        assert (y - y_base).abs().max() > 1e-2
        ref = tiny()
        P.save_adapter(model, f"/tmp/slimtune-test-{name}", name)
        P.load_adapter(ref, f"/tmp/slimtune-test-{name}")
        assert torch.allclose(ref(x), y, atol=1e-6)
    assert not torch.allclose(y_a, y_b) and not torch.allclose(y_ab, y_a)
    P.freeze_base(model, "a")
    assert all("lora_A.a" in k or "lora_B.a" in k for k, p in model.named_parameters() if p.requires_grad)
    P.delete_adapter(model, "a")
    assert P.active_adapters(model) == ["b"] and torch.allclose(model(x), y_b, atol=1e-6)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)  # unwrapped: no adapter left there
    with pytest.raises(ConfigError, match="no adapter named 'a'"):
        P.set_adapter(model, "a")
    P.delete_adapter(model, "b")
    assert torch.equal(model(x), y_base) and not any(isinstance(m, LoraLinear) for m in model.modules())


def _deltas(model, name):
    return {p: m.delta_weight(name).detach() for p, m in model.named_modules()
            if isinstance(m, LoraLinear) and name in m.lora_A}


def test_combinations_against_direct_summed_update():
    model, x = tiny(), ids()
    P.apply_method(model, lora(r=4, lora_alpha=8), "a")
    randomize(model, "a", seed=1)
    P.apply_method(model, lora(r=4, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "o_proj"]), "b")
    randomize(model, "b", seed=2)
    w = [0.7, -0.4]
    da, db = _deltas(model, "a"), _deltas(model, "b")
    summed = {p: w[0] * da.get(p, 0) + w[1] * db.get(p, 0) for p in set(da) | set(db)}
    layers = dict(model.named_modules())

    P.combine_adapters(model, ["a", "b"], w, mode="cat", new_name="cat")
    dc = _deltas(model, "cat")
    assert set(dc) == set(summed)
    for p, d in summed.items():
        assert (dc[p] - d).abs().max() < 1e-6
        r = (4 if p in da else 0) + (4 if p in db else 0)
        assert layers[p].lora_A["cat"].weight.shape[0] == r  # rank is the sum

    P.combine_adapters(model, ["a", "b"], w, mode="svd", rank=8, new_name="svd8")  # full rank: exact
    for p, d in _deltas(model, "svd8").items():
        assert (d - summed[p]).abs().max() < 1e-5
    P.combine_adapters(model, ["a", "b"], w, mode="svd", rank=3, new_name="svd3")
    for p, d in _deltas(model, "svd3").items():
        s = torch.linalg.svdvals(summed[p].double())
        # Eckart-Young: the best rank-3 error is the norm of the dropped singular values
        assert abs((d - summed[p]).double().norm() - s[3:].norm()) < 1e-5
        assert torch.linalg.matrix_rank(d.double(), atol=1e-6) <= 3

    P.combine_adapters(model, ["a", "b"], w, mode="linear", new_name="lin")
    for p, d in _deltas(model, "lin").items():
        m = layers[p]
        cs = [(wi * m.scaling[n], n) for wi, n in zip(w, ["a", "b"]) if n in m.lora_A]
        A = sum(math.sqrt(abs(c)) * m.lora_A[n].weight for c, n in cs)
        B = sum(math.copysign(math.sqrt(abs(c)), c) * m.lora_B[n].weight for c, n in cs)
        assert (d - B @ A).abs().max() < 1e-6
    # the combined adapter computes with its summed update: logits equal a direct merge of it into the base
    P.set_adapter(model, "cat")
    y = model(x)
    ref = tiny()
    with torch.no_grad():
        for p, d in summed.items():
            ref.get_submodule(p).weight += d
    assert (ref(x) - y).abs().max() < 1e-5
    with pytest.raises(ConfigError, match="unknown combination mode"):
        P.combine_adapters(model, ["a"], [1.0], mode="ties", new_name="t")


def test_dora_cannot_be_combined():
    model = tiny()
    P.apply_method(model, lora(use_dora=True), "a")
    with pytest.raises(ConfigError, match="DoRA"):
        P.combine_adapters(model, ["a"], [1.0], mode="cat", new_name="c")


def test_counts_on_meta_reproduce_the_lora_paper_gpt3_rows():
    """LoRA paper (Hu et al. 2021), Table 4: GPT-3 175B, r_q = r_v = 8: 37.7M; r_q = r_k = r_v = r_o = 64: 603.8M.

    The exact count is 2 r d_model per adapted matrix (96 layers, d 12288): 37,748,736 and 603,979,776; the paper
    truncates to one decimal and prints the second as twice its 301.9M row (301,989,888), hence 603.8."""
    from slimtune.models.shapes import build_meta, get_shape

    for targets, r, want in ((["q_proj", "v_proj"], 8, 37.7e6), (["q_proj", "k_proj", "v_proj", "o_proj"], 64,
                                                                   603.8e6)):
        model = build_meta(get_shape("gpt3-175b"))
        P.apply_method(model, {"method": "lora", "r": r, "lora_alpha": r, "target_modules": targets})
        n = P.freeze_base(model)
        assert n == 2 * r * 12288 * 96 * len(targets)
        assert abs(n - want) < 0.25e6, n
        assert next(model.parameters()).device.type == "meta"


def test_config_errors_are_one_line():
    model = tiny()
    with pytest.raises(ConfigError, match=r"^LoRA rank r must be a positive integer, got 0$"):
        P.apply_method(model, {"method": "lora", "r": 0})
    with pytest.raises(ConfigError, match=r"unknown fine-tuning method 'lorra'; known methods: .*lora"):
        P.apply_method(model, {"method": "lorra"})
    with pytest.raises(ConfigError, match=r"target module 'qproj' matches no linear module of Decoder; linear "
                                          r"modules here: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj"):
        P.apply_method(model, {"method": "lora", "target_modules": ["q_proj", "qproj"]})
    with pytest.raises(ConfigError, match="unknown lora option 'rank'"):
        P.method_config_from_dict({"method": "lora", "rank": 4})
    for e in (ConfigError,):
        try:
            P.apply_method(model, {"method": "lora", "r": -2})
        except e as err:
            assert "\n" not in str(err)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # nothing half-applied


def test_target_selection():
    from slimtune.peft.targets import find_targets

    model = tiny()
    assert find_targets(model, "all-linear")[-1] == "model.layers.1.mlp.down_proj"  # lm_head excluded
    assert len(find_targets(model, "all-linear")) == 14
    assert find_targets(model, r".*\.layers\.1\..*_proj", layers_to_transform=None)[0] == \
        "model.layers.1.self_attn.q_proj"
    assert find_targets(model, ["q_proj"], layers_to_transform=[1]) == ["model.layers.1.self_attn.q_proj"]
    assert find_targets(model, ["model.layers.0.mlp.up_proj"]) == ["model.layers.0.mlp.up_proj"]
    assert find_targets(model, "q_proj,v_proj", exclude_modules=["layers.0.self_attn.v_proj"]) == \
        ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    P.apply_method(model, lora())
    assert "model.layers.0.self_attn.q_proj" in find_targets(model, "all-linear")  # wrapped: still by its name
    assert not any("base_layer" in p or "lora_" in p for p in find_targets(model, "all-linear"))


def test_lora_on_slimtune_quantlinear():
    """QLoRA's layout: LoraLinear over a QuantLinear (no float weight); forward adds the fp32 update, merge
    dequantizes once into a dense layer."""
    quant = pytest.importorskip("slimtune.quant.linear")
    torch.manual_seed(0)
    q = quant.QuantLinear.from_linear(nn.Linear(128, 64), "nf4")
    layer = LoraLinear(q)
    for dora in (False, True):
        layer.add("a", r=4, alpha=8, dora=dora)
        layer.set_active(["a"])
        with torch.no_grad():
            layer.lora_B["a"].weight.normal_(0, 0.2)
        x = torch.randn(3, 128)
        ref = x @ (q.dequantize(torch.float32) + 2.0 * layer.lora_B["a"].weight @ layer.lora_A["a"].weight).T + q.bias
        if not dora:
            assert (layer(x) - ref).abs().max() < 1e-5
        y = layer(x)
        assert layer.lora_A["a"].weight.dtype == torch.float32
    layer.merge()
    assert isinstance(layer.base_layer, nn.Linear) and (layer(x) - y).abs().max() < 1e-5
