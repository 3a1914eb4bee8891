"""Breadcrumbs, DELLA, Model Stock and NuSLERP math against references written here from their definitions (sorts,
float64 formulas); streaming in row chunks == whole tensors for every method, layer stacking and vocabulary
re-indexing; bad slices and tokenizer settings refused with one line."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from test_merge_mergekit import sd, write_model

from slimtune.cli import main
from slimtune.merge import geometric as G
from slimtune.merge import load_config, merge
from slimtune.merge import sparsify as S


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- breadcrumbs ----------------------------------------------------------------------------------------------------
def ref_breadcrumbs(delta, density, gamma):
    """Sort |delta| ascending; keep positions [n - keep - top, n - top) (the top shrinks when keep + top > n)."""
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = delta.abs().reshape(-1).argsort()
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[bottom:bottom + keep]] = True
    return delta * mask.view(delta.shape)


@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.9, 0.05), (0.7, 0.5), (0.3, 0.0), (0.001, 0.2)])
def test_breadcrumbs_band_is_exact(density, gamma):
    d = rand(37, 29, seed=1)
    got = S.breadcrumbs_trim(d, density, gamma)
    assert torch.equal(got, ref_breadcrumbs(d, density, gamma))
    assert int((got != 0).sum()) == int(density * d.numel())


# ---- DELLA ----------------------------------------------------------------------------------------------------------
def test_della_probabilities_by_rank():
    x = rand(6, 50, seed=2).abs()
    p = S.della_probs(x, 0.4, 0.1)
    torch.testing.assert_close(p.mean(1), torch.full((6,), 0.4), rtol=0, atol=1e-6)  # rows average the density
    for r in range(6):
        order = x[r].argsort()
        assert p[r, order[0]].item() == pytest.approx(0.3) and p[r, order[-1]].item() == pytest.approx(0.5)
        assert bool((p[r, order].diff() > 0).all())  # larger magnitude, kept more often
    assert S.check_della(0.9, 0.15) and S.check_della(0.1, 0.1) and S.check_della(0.5, 0.2) is None


def test_della_drop_keeps_density_and_l1():
    d = rand(200, 300, seed=3)
    u = torch.rand(d.shape, generator=torch.Generator().manual_seed(4))
    out = S.della(d, 0.5, 0.2, u, rescale=True)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    assert out.abs().double().sum().item() == pytest.approx(d.abs().double().sum().item(), rel=1e-6)
    assert d.abs()[kept].mean() > d.abs()[~kept].mean()  # magnitude-aware
    assert torch.equal(S.della(d, 1.0, 0.2, u, rescale=True), d)


# ---- Model Stock ----------------------------------------------------------------------------------------------------
def ref_stock(base, models):
    """Jang et al. 2024: t = k cos / (1 + (k - 1) cos), cos the mean pairwise cosine of the offsets (float64)."""
    offs = [(m - base).double().reshape(-1) for m in models]
    cos = [torch.dot(offs[i], offs[j]) / (offs[i].norm() * offs[j].norm())
           for i in range(len(offs)) for j in range(i + 1, len(offs))]
    c = sum(cos) / len(cos)
    k = len(models)
    t = k * c / (1 + (k - 1) * c)
    return t * sum(m.double() for m in models) / k + (1 - t) * base.double()


def test_model_stock_matches_formula_and_rows():
    base = rand(12, 9, seed=5)
    models = [base + rand(12, 9, seed=6 + i) * 0.1 + 0.05 for i in range(3)]
    torch.testing.assert_close(G.model_stock(base, models).double(), ref_stock(base, models), rtol=1e-5, atol=1e-6)
    rows = G.model_stock(base, models, filter_wise=True)
    for r in range(12):
        torch.testing.assert_close(rows[r].double(), ref_stock(base[r], [m[r] for m in models]), rtol=1e-5,
                                   atol=1e-6)
    same = G.model_stock(base, [base + 0.2, base + 0.2])  # parallel offsets: cos 1, t 1: their mean
    torch.testing.assert_close(same, base + 0.2)


# ---- NuSLERP --------------------------------------------------------------------------------------------------------
def test_nuslerp_arcs_rows_and_columns():
    v0, v1 = torch.zeros(3, 4), torch.zeros(3, 4)
    v0[0, 0], v1[1, 1] = 2.0, 2.0  # orthogonal, equal norms
    for t in (0.0, 0.3, 1.0):
        want = math.cos(t * math.pi / 2) * v0 + math.sin(t * math.pi / 2) * v1
        torch.testing.assert_close(G.nuslerp(t, v0, v1), want, rtol=1e-6, atol=1e-6)
    a, b = rand(7, 5, seed=8), rand(7, 5, seed=9)
    per_row = G.nuslerp(0.4, a, b, flatten=False)
    for r in range(7):
        torch.testing.assert_close(per_row[r], G.nuslerp(0.4, a[r], b[r]))
    cols = G.nuslerp(0.4, a, b, flatten=False, row_wise=True)
    torch.testing.assert_close(cols, G.nuslerp(0.4, a.T, b.T, flatten=False).T)
    torch.testing.assert_close(G.nuslerp(0.4, a, 3 * a), 0.6 * a + 0.4 * 3 * a)  # colinear: lerp
    assert G.nuslerp_t([0.3, 0.9]) == pytest.approx(0.75) and G.nuslerp_t([1.0, -1.0]) == 0.5


# ---- end to end on tiny checkpoints: chunked == whole ------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three 4-layer Llamas of hidden 64 (every weight random), m2's tokenizer with one more token."""
    root = tmp_path_factory.mktemp("more")
    for s in range(3):
        write_model(root / f"m{s}", seed=s, extra_token="<|tool|>" if s == 2 else None)
    return root


def docs(m):
    w = lambda i, **p: {"model": str(m / f"m{i}"), "parameters": p}  # noqa: E731
    base = {"base_model": str(m / "m0")}
    return {
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", **base, "parameters": {"rescale": True},
                             "models": [w(1, weight=0.6, density=0.5, gamma=0.02), w(2, weight=0.5, density=0.8)]},
        "della": {"merge_method": "della", **base, "models": [w(1, weight=0.6, density=0.5), w(2, weight=0.5)]},
        "model_stock": {"merge_method": "model_stock", **base, "models": [w(1), w(2)]},
        "stock_rows": {"merge_method": "model_stock", **base, "parameters": {"filter_wise": True},
                       "models": [w(1), w(2)]},
        "nuslerp": {"merge_method": "nuslerp", **base, "models": [w(1, weight=0.4), w(2, weight=0.6)]},
        "nuslerp_cols": {"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False,
                                                                   "nuslerp_row_wise": True},
                         "models": [w(1, weight=0.4), w(2, weight=0.6)]},
        "stack": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": str(m / "m0"), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(m / "m1"), "layer_range": [1, 4]}]}]},
        "union": {"merge_method": "ties", **base, "tokenizer": {"source": "union", "pad_to_multiple_of": 64},
                  "models": [w(1, weight=0.6, density=0.5), w(2, weight=0.5, density=0.5)]},
    }


@pytest.mark.parametrize("name", ["breadcrumbs_ties", "della", "model_stock", "stock_rows", "nuslerp", "nuslerp_cols",
                                  "stack", "union"])
def test_chunked_streaming_equals_whole_tensors(models, tmp_path, name):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(docs(models)[name]))
    cfg = load_config(tmp_path / "c.yaml")
    merge(cfg, tmp_path / "whole", seed=4)
    merge(cfg, tmp_path / "chunked", seed=4, chunk=3000)  # embed (320 x 64) in 7 chunks, up_proj (160 x 64) in 4
    a, b = sd(tmp_path / "whole"), sd(tmp_path / "chunked")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6, msg=k)


def test_stack_and_vocabulary_outputs(models, tmp_path):
    import transformers

    d = docs(models)
    for name in ("stack", "union"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(d[name]))
        merge(load_config(tmp_path / f"{name}.yaml"), tmp_path / name)
    conf = json.loads((tmp_path / "stack" / "config.json").read_text())
    assert conf["num_hidden_layers"] == 6
    got, m1 = sd(tmp_path / "stack"), sd(models / "m1")
    assert torch.equal(got["model.layers.5.mlp.up_proj.weight"], m1["model.layers.3.mlp.up_proj.weight"])
    # union: the 264 shared tokens + <|tool|> (only in m2) = 265, padded to 320; the new row is m2's everywhere
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "union"))
    assert len(tok) == 265 and tok.convert_tokens_to_ids("<|tool|>") == 264
    conf = json.loads((tmp_path / "union" / "config.json").read_text())
    emb, e2, e0 = (sd(p)["model.embed_tokens.weight"] for p in (tmp_path / "union", models / "m2", models / "m0"))
    assert conf["vocab_size"] == emb.shape[0] == 320
    torch.testing.assert_close(emb[264], e2[264])  # every model got m2's row: the merge returns it
    pad = emb[265:]
    assert torch.equal(pad, pad[:1].expand_as(pad)) and not torch.equal(emb[:264], e0[:264])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "union"))
    assert torch.isfinite(model(torch.tensor([[5, 264, 9]])).logits).all()


@pytest.mark.parametrize("change,msg", [
    (lambda d: d["slices"][1]["sources"][0].update(layer_range=[2, 6]), "goes past its 4 layers"),
    (lambda d: d["slices"][0].update(residual_weight=0.5), "residual_weight is not supported"),
    (lambda d: d.update(tokenizer={"source": "union", "tokens": {"<x>": {"source": {"kind": "one"}}}}),
     "must be a model path"),
    (lambda d: d.update(tokenizer={"source": "nowhere"}), "is not base, union or a model folder"),
    (lambda d: d.update(chat_template="x"), "is not a template"),
])
def test_bad_slices_and_tokenizer_refused(models, tmp_path, capsys, change, msg):
    doc = docs(models)["stack"]
    change(doc)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    assert main(["merge", str(tmp_path / "c.yaml"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()
