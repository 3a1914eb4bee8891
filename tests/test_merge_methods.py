"""Merge math on known tensors: every expectation is computed directly here (float64, torch.topk), not by the code under
test; plus mergekit-style config parsing (gradients, filters) and its one-line refusals."""
from __future__ import annotations

import math

import pytest
import torch

from slimtune.errors import ConfigError
from slimtune.merge import methods as M
from slimtune.merge.config import depth, evaluate, parse_config


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


# ---- reference implementations, written from the papers' definitions --------------------------------------------
def ref_trim(delta, density):
    """Keep exactly the top-k |delta| (k = int(density * n)) via torch.topk indices."""
    if density >= 1:
        return delta.clone()
    k = int(density * delta.numel())
    idx = torch.topk(delta.abs().reshape(-1), k).indices
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[idx] = True
    return delta * mask.view(delta.shape)


def ref_gta(base, deltas, weights, consensus, normalize, lam):
    base, deltas = base.double(), [d.double() for d in deltas]
    wd = torch.stack([d * w for d, w in zip(deltas, weights)])
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * base.dim()))
    if consensus:
        sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(wd) == sign).double()
        mixed, div = (wd * agree).sum(0), (w * agree).sum(0)
        div[div == 0] = 1
    else:
        mixed, div = wd.sum(0), sum(weights)
    if normalize:
        mixed = mixed / div
    return base + lam * mixed


# ---- linear / task arithmetic -------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_weighted_average(normalize):
    xs = [rand(7, 5, seed=i) for i in range(3)]
    w = [0.2, 0.5, 0.9]
    want = sum(wi * x.double() for wi, x in zip(w, xs))
    if normalize:
        want = want / sum(w)
    close(M.linear(xs, w, normalize), want)


@pytest.mark.parametrize("normalize,lam", [(False, 1.0), (True, 0.7), (False, 1.5)])
def test_task_arithmetic(normalize, lam):
    base, a, b = rand(6, 4, seed=1), rand(6, 4, seed=2), rand(6, 4, seed=3)
    w = [0.3, 0.8]
    mix = w[0] * (a - base).double() + w[1] * (b - base).double()
    want = base.double() + lam * mix / (sum(w) if normalize else 1)
    close(M.task_arithmetic(base, [a, b], w, normalize, lam), want)


# ---- TIES -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 7, 500, 999, 1000])
def test_topk_threshold_is_exact_kth_largest(k):
    x = rand(1000, seed=4).abs()
    (thr,) = M.topk_thresholds(lambda: [[x]], [k])
    assert thr == torch.topk(x, k).values[-1].item()
    assert int((x >= thr).sum()) == k  # continuous values: no ties at the threshold


def test_topk_threshold_over_chunks_and_streams():
    xs = [rand(3000, seed=5).abs(), rand(3000, seed=6).abs() * 1e-3]
    ks = [17, 2100]
    chunks = lambda: ([x[i:i + 700] for x in xs] for i in range(0, 3000, 700))  # noqa: E731
    got = M.topk_thresholds(chunks, ks)
    assert got == [torch.topk(x, k).values[-1].item() for x, k in zip(xs, ks)]


def test_magnitude_trim_keeps_topk():
    d = rand(40, 30, seed=7)
    for dens in (0.05, 0.3, 1.0):
        assert torch.equal(M.magnitude_trim(d, dens), ref_trim(d, dens))


@pytest.mark.parametrize("normalize,lam", [(True, 1.0), (False, 1.0), (True, 0.6)])
def test_ties_known_tensors(normalize, lam):
    base = rand(20, 16, seed=8)
    models = [base + rand(20, 16, seed=9 + i) * 0.1 for i in range(3)]
    w, dens = [1.0, 0.5, 0.8], [0.3, 0.6, 1.0]
    want = ref_gta(base, [ref_trim(m - base, d) for m, d in zip(models, dens)], w, True, normalize, lam)
    close(M.ties(base, models, w, dens, normalize, lam), want)


def test_ties_sign_election_by_hand():
    # one entry, three models: weighted deltas +3, -1, -1 -> elected +, only the first is kept
    base = torch.zeros(1) + 0.5
    models = [base + 3, base - 1, base - 1]
    got = M.ties(base, models, [1.0, 1.0, 1.0], [1.0] * 3, normalize=True)
    assert got.item() == pytest.approx(0.5 + 3.0)
    # weighted: 0.1 * 3 = 0.3 < 2 * 1: elected -, disjoint weighted mean of the two agreeing = -1
    got = M.ties(base, models, [0.1, 1.0, 1.0], [1.0] * 3, normalize=True)
    assert got.item() == pytest.approx(0.5 - 1.0)
    got = M.ties(base, models, [0.1, 1.0, 1.0], [1.0] * 3, normalize=False)  # disjoint sum
    assert got.item() == pytest.approx(0.5 - 2.0)


# ---- DARE -----------------------------------------------------------------------------------------------------------
def test_dare_density_one_equals_task_arithmetic():
    base = rand(9, 11, seed=10)
    models = [rand(9, 11, seed=11), rand(9, 11, seed=12)]
    w = [0.4, 0.9]
    ta = M.task_arithmetic(base, models, w)
    assert torch.equal(M.dare(base, models, w, [1.0, 1.0], seed=3, name="x", use_ties=False), ta)
    ties1 = M.ties(base, models, w, [1.0, 1.0], normalize=False)
    assert torch.equal(M.dare(base, models, w, [1.0, 1.0], seed=3, name="x", use_ties=True), ties1)


def test_dare_same_seed_same_result_and_rescale():
    base, m = rand(64, 64, seed=13), rand(64, 64, seed=14)
    args = (base, [m], [1.0], [0.3])
    a = M.dare(*args, seed=5, name="layer.w", use_ties=False)
    assert torch.equal(a, M.dare(*args, seed=5, name="layer.w", use_ties=False))
    assert not torch.equal(a, M.dare(*args, seed=6, name="layer.w", use_ties=False))
    assert not torch.equal(a, M.dare(*args, seed=5, name="other.w", use_ties=False))
    # survivors are delta / density, the rest exactly base; about 30% survive
    kept = a != base
    close((a - base)[kept], (m - base)[kept] / 0.3, 1e-5)
    assert abs(kept.float().mean().item() - 0.3) < 0.03


def test_dare_mask_independent_of_chunking():
    n = M.DARE_BLOCK * 2 + 12345  # spans three generator blocks
    whole = M.dare_keep(1, "t#0", n, 0, n, 0.4)
    parts = torch.cat([M.dare_keep(1, "t#0", n, s, min(n, s + 700_001) - s, 0.4) for s in range(0, n, 700_001)])
    assert torch.equal(whole, parts)


def test_dare_ties_matches_reference_with_its_mask():
    base = rand(30, 8, seed=15)
    models = [base + rand(30, 8, seed=16 + i) for i in range(2)]
    w, dens = [0.7, 0.5], [0.5, 0.8]
    deltas = []
    for i, (m, d) in enumerate(zip(models, dens)):
        keep = M.dare_keep(2, f"w#{i}", base.numel(), 0, base.numel(), d).view(base.shape)
        deltas.append((m - base) * keep / d)
    want = ref_gta(base, deltas, w, consensus=True, normalize=False, lam=1.0)
    close(M.dare(base, models, w, dens, seed=2, name="w", use_ties=True), want)


# ---- SLERP ----------------------------------------------------------------------------------------------------------
def test_slerp_orthogonal_follows_the_arc():
    v0 = torch.zeros(4, 4)
    v0[0, 0] = 2.0
    v1 = torch.zeros(4, 4)
    v1[1, 2] = 2.0
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        want = math.cos(t * math.pi / 2) * v0 + math.sin(t * math.pi / 2) * v1
        close(M.slerp(t, v0, v1), want, 1e-6)


def test_slerp_general_angle_and_parallel_fallback():
    a, b = rand(50, seed=17), rand(50, seed=18)
    t = 0.3
    ua, ub = a.double() / a.double().norm(), b.double() / b.double().norm()
    th = math.acos(float((ua * ub).sum()))
    want = math.sin((1 - t) * th) / math.sin(th) * a.double() + math.sin(t * th) / math.sin(th) * b.double()
    close(M.slerp(t, a, b), want)
    c = 2.5 * a  # parallel: lerp
    close(M.slerp(t, a, c), (1 - t) * a.double() + t * c.double())


# ---- merging a model with itself returns it ------------------------------------------------------------------------
def test_self_merge_returns_the_model():
    base, m = rand(12, 10, seed=19), rand(12, 10, seed=20)
    close(M.linear([m, m], [0.3, 0.7]), m, 1e-6)
    close(M.task_arithmetic(base, [m], [1.0]), m, 1e-6)
    close(M.task_arithmetic(m, [m, m], [0.5, 0.5]), m, 0)
    close(M.ties(base, [m, m], [0.3, 0.7], [1.0, 1.0]), m, 1e-6)
    close(M.ties(m, [m], [1.0], [0.2]), m, 0)
    for t in (0.0, 0.37, 1.0):
        close(M.slerp(t, m, m), m, 1e-6)


# ---- config: settings, gradients, refusals ------------------------------------------------------------------------
def test_gradient_and_filter_schedule_like_mergekit():
    t = [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.5}]
    L = 5
    for i in range(L):
        pos = depth(f"model.layers.{i}.self_attn.q_proj.weight", L)
        assert pos == i / 4
        x = pos * 2  # gradient of 3 points: 2 segments
        i0 = min(int(x), 1)
        want = [0, 0.5, 1][int(x)] if x == int(x) else (1 - (x - i0)) * [0, 0.5, 1][i0] + (x - i0) * [0, 0.5, 1][i0 + 1]
        assert evaluate(t, f"model.layers.{i}.self_attn.q_proj.weight", pos) == pytest.approx(want)
        assert evaluate(t, f"model.layers.{i}.mlp.up_proj.weight", pos) == 0.5
    # mergekit plans everything outside the layers at t = 0 (embeddings, final norm, lm_head alike)
    assert depth("model.embed_tokens.weight", L) == 0.0 and depth("lm_head.weight", L) == 0.0
    assert depth("model.norm.weight", L) == 0.0
    assert evaluate([0.2, 0.4, 1.0], "x", 0.75) == pytest.approx(0.7)


def test_config_values_and_defaults():
    cfg = parse_config({"merge_method": "ties", "base_model": "b", "parameters": {"lambda": 0.5},
                        "models": [{"model": "a", "parameters": {"weight": [1.0, 0.0], "density": 0.4}},
                                   {"model": "c", "parameters": {"weight": 0.3}}, {"model": "b"}]})
    assert cfg.value("normalize", "x", 3) is True and cfg.value("lambda", "x", 3) == 0.5
    assert cfg.value("weight", "model.layers.1.mlp.w", 3, 0) == pytest.approx(0.5)
    assert cfg.value("density", "x", 3, 1) == 1.0


@pytest.mark.parametrize("doc,msg", [
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"wieght": 1}}]},
     "did you mean 'weight'"),
    ({"merge_method": "ties", "base_modle": "b", "models": [{"model": "a"}]}, "did you mean 'base_model'"),
    ({"merge_method": "slerpp", "models": [{"model": "a"}]}, "did you mean 'slerp'"),
    ({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "c"}],
      "parameters": {"t": [{"filter": "mlp", "value": [0, 1.2]}, {"value": 0.5}]}}, "outside [0, 1]"),
    ({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "c"}],
      "parameters": {"t": -0.1}}, "outside [0, 1]"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1,
                                                                                        "density": 0}}]},
     "outside (0, 1]"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "c"}]},
     "1 weights for 2 models"),
    ({"merge_method": "task_arithmetic", "models": [{"model": "a", "parameters": {"weight": 1}}]},
     "needs a base_model"),
    ({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "c"}]}, "needs parameters"),
    ({"merge_method": "linear", "tokenizer_source": "union", "tokenizer": {"source": "base"},
      "models": [{"model": "a", "parameters": {"weight": 1}}]}, "tokenizer_source or tokenizer"),
    ({"merge_method": "linear", "chat_template": "llama3", "models": [{"model": "a", "parameters": {"weight": 1}}]},
     "paste the Jinja text"),
    ({"merge_method": "slerp", "base_model": "a", "models": [{"model": "c"}, {"model": "d"}],
      "parameters": {"t": 0.5}}, "exactly one other model"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                                             {"model": "c", "layer_range": [0, 2]}]}]},
     "exactly one model per slice"),
    ({"merge_method": "ties", "base_model": "b", "slices": [{"sources": [
        {"model": "a", "layer_range": [0, 2], "parameters": {"weight": 1}}]}]}, "not among the sources in slices[0]"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [2, 1]}]}]},
     "0 <= first < end"),
    ({"merge_method": "nuslerp", "models": [{"model": "a", "parameters": {"weight": 1}}]}, "exactly two models"),
    ({"merge_method": "model_stock", "base_model": "b", "models": [{"model": "a"}]}, "at least two models"),
    ({"merge_method": "breadcrumbs", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1,
                                                                                               "gamma": 1.5}}]},
     "outside [0, 1)"),
    ({"merge_method": "linear", "models": [{"model": "a", "layer_range": [0, 2], "parameters": {"weight": 1}}]},
     "only read in slices"),
])
def test_config_refusals_are_one_line(doc, msg):
    with pytest.raises(ConfigError) as e:
        parse_config(doc, "cfg.yaml")
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_mergekit_readme_configs_parse_unchanged():
    import yaml

    ties_doc = yaml.safe_load("""
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""")
    cfg = parse_config(ties_doc)
    mid = "model.layers.20.mlp.up_proj.weight"  # depth 20 / 39 of 40 layers
    pos = 20 / 39
    assert cfg.value("density", mid, 40, 0) == pytest.approx((1 - (2 * pos - 1)) * 0.7 + (2 * pos - 1) * 0.1)
    x = 3 * pos
    assert cfg.value("weight", mid, 40, 1) == pytest.approx((1 - (x - 1)) * 0.3 + (x - 1) * 0.7)
    assert cfg.value("weight", mid, 40, 2) == 0.5
    assert cfg.value("weight", "model.layers.20.self_attn.q_proj.weight", 40, 2) == 0
    assert cfg.value("density", "model.embed_tokens.weight", 40, 0) == 1  # embeddings sit at depth 0
    assert any("int8_mask" in n for n in cfg.notes)
    slerp_doc = yaml.safe_load("""
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
""")
    cfg = parse_config(slerp_doc)
    assert [m.layer_range for m in cfg.models] == [(0, 40), (0, 40)]
    assert cfg.value("t", "model.layers.0.self_attn.k_proj.weight", 40) == 0
    assert cfg.value("t", "model.layers.39.mlp.down_proj.weight", 40) == 0
    x = 4 * 13 / 39  # segment 1 of [0, 0.5, 0.3, 0.7, 1]: from 0.5 down to 0.3
    assert cfg.value("t", "model.layers.13.self_attn.k_proj.weight", 40) == pytest.approx(0.5 + (x - 1) * -0.2)
    assert cfg.value("t", "model.norm.weight", 40) == 0.5
