"""`slimtune merge` end to end on tiny checkpoints: outputs against expectations computed here from the input tensors,
loading in transformers and PEFT, streaming in chunks == whole tensors, LoRA inputs and outputs, and bad input refused
with one line, exit code 2 and no output folder."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from slimtune.cli import main
from slimtune.merge import load_config, merge
from slimtune.merge import methods as M
from slimtune.models.tiny import write_builtin

Q = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    for s in range(3):
        write_builtin(root / f"m{s}", seed=s)
    return root


def sd(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run(tmp_path, doc, out="out", *extra):
    cfg = tmp_path / f"{out}.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    return main(["merge", str(cfg), str(tmp_path / out), "--json", *extra])


def both(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].double(), b[k].double(), rtol=tol, atol=tol, msg=k)


def test_ties_output_loads_in_transformers_and_matches(models, tmp_path, capsys):
    import transformers

    doc = {"merge_method": "ties", "base_model": str(models / "m0"), "dtype": "bfloat16",
           "models": [{"model": str(models / "m1"), "parameters": {"weight": 0.6, "density": 0.5}},
                      {"model": str(models / "m2"), "parameters": {"weight": 0.4, "density": 0.3}}]}
    assert run(tmp_path, doc) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tensors"] == 39 and r["method"] == "ties"
    m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert m.dtype == torch.bfloat16
    got = m.state_dict()
    s0, s1, s2 = sd(models / "m0"), sd(models / "m1"), sd(models / "m2")
    for k in s0:
        want = M.ties(s0[k], [s1[k], s2[k]], [0.6, 0.4], [0.5, 0.3]).to(torch.bfloat16)
        assert torch.equal(got[k], want), k
    ids = torch.randint(8, 260, (1, 12))
    assert torch.isfinite(m(ids).logits).all()
    assert (tmp_path / "out" / "tokenizer.json").exists()


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "dare_linear", "dare_ties"])
def test_each_method_matches_direct_computation(models, tmp_path, method):
    base = str(models / "m0")
    entries = [{"model": str(models / f"m{i}"), "parameters": {"weight": w, "density": d}}
               for i, w, d in ((1, 0.7, 0.4), (2, 0.5, 0.9))]
    if method in ("linear", "task_arithmetic"):
        for e in entries:
            del e["parameters"]["density"]
    doc = {"merge_method": method, "base_model": base, "models": entries, "parameters": {"normalize": True}}
    assert run(tmp_path, doc, "out", "--seed", "11") == 0
    s0, s1, s2 = sd(models / "m0"), sd(models / "m1"), sd(models / "m2")
    want = {}
    for k in s0:
        if method == "linear":
            want[k] = M.linear([s1[k], s2[k]], [0.7, 0.5], True)
        elif method == "task_arithmetic":
            want[k] = M.task_arithmetic(s0[k], [s1[k], s2[k]], [0.7, 0.5], normalize=True)
        else:  # drop masks keyed by tensor name and the model's index in the config
            want[k] = M.dare(s0[k], [s1[k], s2[k]], [0.7, 0.5], [0.4, 0.9], seed=11, name=k,
                             use_ties=method == "dare_ties", normalize=True)
    both(sd(tmp_path / "out"), want)


def test_chunked_streaming_equals_whole_tensors(models, tmp_path):
    for method, params in (("ties", {"density": 0.35}), ("dare_ties", {"density": 0.5}), ("slerp", {})):
        doc = {"merge_method": method, "base_model": str(models / "m0"),
               "models": [{"model": str(models / "m1"), "parameters": {"weight": 0.8, **params}},
                          {"model": str(models / "m2"), "parameters": {"weight": 0.5, **params}}]}
        if method == "slerp":
            doc["models"] = [{"model": str(models / "m0")}, {"model": str(models / "m2")}]
            doc["parameters"] = {"t": 0.3}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
        cfg = load_config(tmp_path / "c.yaml")
        merge(cfg, tmp_path / "whole", seed=4)
        merge(cfg, tmp_path / "chunked", seed=4, chunk=5000)  # embed (320 x 256) in 17 chunks
        both(sd(tmp_path / "whole"), sd(tmp_path / "chunked"), 1e-6)


def test_slerp_layer_schedule(models, tmp_path):
    t = [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.25}]
    doc = {"merge_method": "slerp", "base_model": str(models / "m0"), "parameters": {"t": t},
           "models": [{"model": str(models / "m0")}, {"model": str(models / "m1")}]}
    assert run(tmp_path, doc) == 0
    s0, s1, got = sd(models / "m0"), sd(models / "m1"), sd(tmp_path / "out")
    # 4 layers: depth of layer i is i / 3; the self_attn gradient [0, .5, 1] is linear, so t = i / 3
    for i in range(4):
        k = f"model.layers.{i}.self_attn.o_proj.weight"
        torch.testing.assert_close(got[k], M.slerp(i / 3, s0[k], s1[k]))
        k = f"model.layers.{i}.mlp.down_proj.weight"
        torch.testing.assert_close(got[k], M.slerp(0.25, s0[k], s1[k]))
    k = "model.layers.0.self_attn.o_proj.weight"
    torch.testing.assert_close(got[k], s0[k])  # t = 0 at layer 0: the base
    # the same merge in mergekit's usual slerp layout (one slice over all layers) gives the same model
    sliced = {"merge_method": "slerp", "base_model": str(models / "m0"), "parameters": {"t": t},
              "slices": [{"sources": [{"model": str(models / f"m{i}"), "layer_range": [0, 4]} for i in (0, 1)]}]}
    assert run(tmp_path, sliced, "sliced") == 0
    both(sd(tmp_path / "sliced"), got, 0)
    sliced["slices"][0]["sources"][1]["layer_range"] = [0, 3]
    assert run(tmp_path, sliced, "partial") == 2 and not (tmp_path / "partial").exists()


def test_self_merges_return_the_model(models, tmp_path):
    m1 = str(models / "m1")
    docs = {
        "linear": {"merge_method": "linear", "models": [{"model": m1, "parameters": {"weight": 0.3}},
                                                        {"model": m1, "parameters": {"weight": 0.7}}]},
        "ta": {"merge_method": "task_arithmetic", "base_model": str(models / "m0"),
               "models": [{"model": m1, "parameters": {"weight": 1.0}}]},
        "ties": {"merge_method": "ties", "base_model": str(models / "m0"),
                 "models": [{"model": m1, "parameters": {"weight": 0.4, "density": 1.0}},
                            {"model": m1, "parameters": {"weight": 0.9, "density": 1.0}}]},
        "slerp": {"merge_method": "slerp", "base_model": m1, "parameters": {"t": 0.61},
                  "models": [{"model": m1}, {"model": m1}]},
    }
    want = sd(models / "m1")
    for name, doc in docs.items():
        if name == "slerp":  # mergekit needs one model besides the base: a copy of the same weights
            shutil.copytree(models / "m1", tmp_path / "m1copy", dirs_exist_ok=True)
            doc["models"][1]["model"] = str(tmp_path / "m1copy")
        assert run(tmp_path, doc, name) == 0, name
        both(sd(tmp_path / name), want, 1e-6)


def test_dare_seed_and_density_one(models, tmp_path):
    def doc(method, dens):
        return {"merge_method": method, "base_model": str(models / "m0"),
                "models": [{"model": str(models / f"m{i}"), "parameters": {"weight": 0.5, "density": dens}}
                           for i in (1, 2)]}
    assert run(tmp_path, doc("dare_linear", 0.3), "a", "--seed", "1") == 0
    assert run(tmp_path, doc("dare_linear", 0.3), "b", "--seed", "1") == 0
    assert run(tmp_path, doc("dare_linear", 0.3), "c", "--seed", "2") == 0
    a, b, c = sd(tmp_path / "a"), sd(tmp_path / "b"), sd(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[Q], c[Q])
    assert run(tmp_path, doc("dare_linear", 1.0), "d") == 0  # p = 0
    ta = {"merge_method": "task_arithmetic", "base_model": str(models / "m0"),
          "models": [{"model": str(models / f"m{i}"), "parameters": {"weight": 0.5}} for i in (1, 2)]}
    assert run(tmp_path, ta, "e") == 0
    d, e = sd(tmp_path / "d"), sd(tmp_path / "e")
    assert all(torch.equal(d[k], e[k]) for k in d)


def test_sharded_output_loads(models, tmp_path):
    import transformers

    doc = {"merge_method": "linear", "models": [{"model": str(models / f"m{i}"), "parameters": {"weight": 1.0}}
                                                for i in (1, 2)]}
    assert run(tmp_path, doc, "out", "--shard-size", "3MB") == 0
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) >= 3 and (tmp_path / "out" / "model.safetensors.index.json").exists()
    m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    s1, s2 = sd(models / "m1"), sd(models / "m2")
    torch.testing.assert_close(m.state_dict()[Q], (s1[Q] + s2[Q]) / 2)


# ---- LoRA adapters ------------------------------------------------------------------------------------------------
def make_adapter(folder, base, seed, r, alpha, modules=("q_proj", "v_proj")):
    g = torch.Generator().manual_seed(seed)
    sdb = sd(base)
    t = {}
    for i in range(4):
        for mod in modules:
            name = f"model.layers.{i}.self_attn.{mod}"
            out_f, in_f = sdb[name + ".weight"].shape
            t[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.1
            t[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.1
    folder.mkdir()
    save_file(t, str(folder / "adapter_model.safetensors"))
    conf = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(modules), "lora_dropout": 0.0,
            "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "use_rslora": False,
            "use_dora": False}
    (folder / "adapter_config.json").write_text(json.dumps(conf))
    return t


def test_lora_inputs_and_adapter_output(models, tmp_path):
    import transformers
    from peft import PeftModel

    a1 = make_adapter(tmp_path / "a1", models / "m0", 1, r=4, alpha=8)
    a2 = make_adapter(tmp_path / "a2", models / "m0", 2, r=2, alpha=2)
    doc = {"merge_method": "task_arithmetic", "base_model": str(models / "m0"),
           "models": [{"model": str(tmp_path / "a1"), "parameters": {"weight": 0.7}},
                      {"model": f"{models / 'm0'}+{tmp_path / 'a2'}", "parameters": {"weight": 0.4}}]}
    assert run(tmp_path, doc, "full") == 0
    s0, got = sd(models / "m0"), sd(tmp_path / "full")
    p = "base_model.model.model.layers.2.self_attn.v_proj."
    # scale = alpha / r: 8 / 4 = 2 for adapter 1, 2 / 2 = 1 for adapter 2
    want = (s0["model.layers.2.self_attn.v_proj.weight"] + 0.7 * 2.0 * a1[p + "lora_B.weight"] @ a1[p + "lora_A.weight"]
            + 0.4 * 1.0 * a2[p + "lora_B.weight"] @ a2[p + "lora_A.weight"])
    torch.testing.assert_close(got["model.layers.2.self_attn.v_proj.weight"], want)
    torch.testing.assert_close(got["model.layers.2.mlp.up_proj.weight"], s0["model.layers.2.mlp.up_proj.weight"])
    # PEFT agrees on what adapter 1 means (scale = alpha / r, keys)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(models / "m0"))
    merged1 = PeftModel.from_pretrained(hf, str(tmp_path / "a1")).merge_and_unload().state_dict()
    k = "model.layers.2.self_attn.v_proj.weight"
    torch.testing.assert_close(merged1[k], s0[k] + 2.0 * a1[p + "lora_B.weight"] @ a1[p + "lora_A.weight"])
    # the same merge written back as one adapter of rank 4 + 2 is exact; PEFT loads it and reproduces the full merge
    assert run(tmp_path, doc, "adapter", "--adapter-rank", "6") == 0
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 6
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(models / "m0"))
    back = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).merge_and_unload().state_dict()
    for k in got:
        torch.testing.assert_close(back[k], got[k], rtol=1e-4, atol=1e-5)


# ---- bad input: one line, exit 2, nothing left behind -------------------------------------------------------------
def bad_models(models, tmp_path):
    arch = tmp_path / "arch"
    shutil.copytree(models / "m1", arch)
    c = json.loads((arch / "config.json").read_text())
    c["model_type"] = "mistral"
    (arch / "config.json").write_text(json.dumps(c))
    shape = tmp_path / "shape"
    shutil.copytree(models / "m1", shape)
    c = json.loads((shape / "config.json").read_text())
    c["intermediate_size"] = 512
    (shape / "config.json").write_text(json.dumps(c))
    miss = tmp_path / "miss"
    shutil.copytree(models / "m1", miss)
    t = load_file(str(miss / "model.safetensors"))
    del t["model.layers.2.mlp.gate_proj.weight"]
    save_file(t, str(miss / "model.safetensors"))
    huge = tmp_path / "huge"
    shutil.copytree(models / "m1", huge)
    t = load_file(str(huge / "model.safetensors"))
    t["model.norm.weight"] = t["model.norm.weight"] * 1e6  # overflows fp16 only when written
    save_file(t, str(huge / "model.safetensors"))
    return arch, shape, miss, huge


def test_bad_input_one_line_exit_2_no_output(models, tmp_path, capsys):
    arch, shape, miss, huge = bad_models(models, tmp_path)
    b = str(models / "m0")

    def ties(*paths, **extra):
        return {"merge_method": "ties", "base_model": b, **extra,
                "models": [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.5}} for p in paths]}

    w_missing = ties(models / "m1", models / "m2")
    del w_missing["models"][1]["parameters"]["weight"]
    t_out = {"merge_method": "slerp", "base_model": b, "parameters": {"t": 1.3},
             "models": [{"model": b}, {"model": str(models / "m1")}]}
    cases = [
        (ties(models / "m1", arch), "model_type 'mistral' differs"),
        (ties(models / "m1", shape), "intermediate_size = 512 differs"),
        (ties(miss), "tensor model.layers.2.mlp.gate_proj.weight is missing"),
        (w_missing, "1 weights for 2 models"),
        (t_out, "outside [0, 1]"),
        (ties(tmp_path / "nowhere"), "not found"),
        (ties(huge, out_dtype="float16"), "overflows float16"),  # fails while writing: still nothing left
    ]
    for i, (doc, msg) in enumerate(cases):
        out = f"bad{i}"
        assert run(tmp_path, doc, out) == 2, msg
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err
        assert not (tmp_path / out).exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out}")]  # no temp folder either


def test_output_may_not_be_an_input(models, tmp_path, capsys):
    doc = {"merge_method": "linear", "models": [{"model": str(models / "m1"), "parameters": {"weight": 1.0}}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    assert main(["merge", str(tmp_path / "c.yaml"), str(models / "m1")]) == 2
    assert "one of the inputs" in capsys.readouterr().err
    assert (models / "m1" / "model.safetensors").exists()
