"""`slimtune merge` against the real mergekit 0.1.5 on tiny random Llama models: the same YAML through both, the same
tensors out (max |diff| <= 1e-6 in fp32 where the method is deterministic; DARE / DELLA: equal statistics, and exact
at density 1), the same config.json layer count and vocab_size, the same tokenizer vocabulary and chat template.

How mergekit is obtained: it is in the `test` extra (`pip install -e .[test]` installs mergekit==0.1.5, whose
requirements agree with slimtune's: transformers 5, torch >= 2). When the running interpreter lacks it, the test
builds a venv under $XDG_CACHE_HOME/slimtune-tests/mergekit-0.1.5 (reused afterwards) whose `.pth` file points at
this interpreter's site-packages, so pip adds only mergekit and its few missing requirements (no second torch); the
module is skipped, with the reason, only when that install fails (PyPI unreachable). All configs of the module run
in one mergekit process (`run_merge`, mergekit's own entry point behind `mergekit-yaml`), with HF_HUB_OFFLINE=1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from slimtune.merge import load_config, merge

MERGEKIT = "0.1.5"
TOL = 1e-6
DRIVER = """
import json, sys, traceback, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for path, out, seed in json.load(open(sys.argv[1])):
    text = open(path).read()
    try:
        conf = MergeConfiguration.model_validate(yaml.safe_load(text))
        run_merge(conf, out, options=MergeOptions(random_seed=seed, write_model_card=False, quiet=True),
                  config_source=text)
    except Exception:
        open(out + ".error", "w").write(traceback.format_exc())
"""


def mergekit_python() -> str:
    """An interpreter that imports mergekit 0.1.5: this one, else a cached venv layered on this one's packages."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        if version("mergekit") == MERGEKIT:
            return sys.executable
    except PackageNotFoundError:
        pass
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slimtune-tests" / f"mergekit-{MERGEKIT}"
    py = cache / "bin" / "python"
    ok = cache / "installed"
    if not ok.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(cache)], check=True, capture_output=True)
            site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip()
            Path(site, "parent-site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
            subprocess.run([str(py), "-m", "pip", "install", "-q", f"mergekit=={MERGEKIT}"], check=True,
                           capture_output=True, text=True, timeout=900)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            last = ((getattr(e, "stderr", "") or "").strip().splitlines() or ["timeout"])[-1]
            pytest.skip(f"mergekit {MERGEKIT} could not be installed (PyPI unreachable?): {last}")
        ok.write_text(MERGEKIT)
    return str(py)


def write_model(folder: Path, seed: int, layers: int = 4, extra_token: str | None = None, vocab: int = 320) -> str:
    """A tiny random Llama (hidden 64, every weight random, norms too) with the built-in byte tokenizer (264 tokens;
    with vocab < 264 the last tokens have no embedding row)."""
    import transformers

    from slimtune.models.tiny import builtin_tokenizer

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.05)
    model.save_pretrained(folder)
    tok = builtin_tokenizer()
    if extra_token:
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken(extra_token, special=True)])
    tok.save_pretrained(folder)
    return str(folder)


def sd(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def configs(m: dict[str, str]) -> dict[str, tuple[dict, int]]:
    """name -> (mergekit YAML document, seed) of every merge compared here."""
    f32 = {"dtype": "float32"}
    w = lambda path, **p: {"model": path, "parameters": p}  # noqa: E731
    two = lambda method, **p: {"merge_method": method, "base_model": m["a"], **f32,  # noqa: E731
                               "models": [w(m["b"], weight=0.7, **p), w(m["c"], weight=[0.2, 0.9], **p)]}
    return {
        # issue 17 item 3: a per-layer schedule, the base not listed (final norm / lm_head at t = 0)
        "slerp_schedule": ({"merge_method": "slerp", "base_model": m["a"], "models": [{"model": m["b"]}],
                            "parameters": {"t": [0, 0.2, 0.7, 1]}, **f32}, 0),
        "linear_gradient": ({"merge_method": "linear", **f32,
                             "models": [w(m["a"], weight=[0.2, 0.9]), w(m["b"], weight=0.5)]}, 0),
        "task_arithmetic": ({**two("task_arithmetic"), "parameters": {"lambda": 0.8}}, 0),
        "ties": (two("ties", density=[0.3, 0.8]), 0),
        "breadcrumbs": (two("breadcrumbs", density=0.7, gamma=0.05), 0),
        "breadcrumbs_ties": ({**two("breadcrumbs_ties", density=0.6, gamma=0.1), "parameters": {"rescale": True}}, 0),
        "della_d1": (two("della", density=1.0), 0),
        "della_linear_d1": (two("della_linear", density=1.0), 0),
        "dare_ties_d1": (two("dare_ties", density=1.0), 0),
        "dare_linear_stats": ({"merge_method": "dare_linear", "base_model": m["a"], **f32,
                               "models": [w(m["b"], weight=1.0, density=0.4)]}, 3),
        "della_stats": ({"merge_method": "della_linear", "base_model": m["a"], **f32,
                         "models": [w(m["b"], weight=1.0, density=0.5, epsilon=0.2)]}, 3),
        "della_ties_stats": (two("della", density=0.6, epsilon=0.15), 5),
        "model_stock": ({"merge_method": "model_stock", "base_model": m["a"], **f32,
                         "models": [{"model": m["b"]}, {"model": m["c"]}]}, 0),
        "model_stock_rows": ({"merge_method": "model_stock", "base_model": m["a"], **f32,
                              "parameters": {"filter_wise": True},
                              "models": [{"model": m["a"]}, {"model": m["b"]}, {"model": m["c"]}]}, 0),
        "nuslerp": ({"merge_method": "nuslerp", **f32, "models": [w(m["b"], weight=0.3), w(m["c"], weight=0.7)]}, 0),
        "nuslerp_base_rows": ({"merge_method": "nuslerp", "base_model": m["a"], **f32,
                               "parameters": {"nuslerp_flatten": False},
                               "models": [w(m["b"], weight=1.0), w(m["c"], weight=[0.5, 2.0])]}, 0),
        "nuslerp_cols": ({"merge_method": "nuslerp", **f32,
                          "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                          "models": [w(m["b"], weight=0.6), w(m["c"], weight=0.4)]}, 0),
        # frankenmerge: 3 + 3 + 4 layers from three models, one slice scaled; 10 layers out
        "passthrough_stack": ({"merge_method": "passthrough", **f32, "slices": [
            {"sources": [{"model": m["a"], "layer_range": [0, 3]}]},
            {"sources": [{"model": m["b"], "layer_range": [1, 4]}], "parameters": {"scale": [
                {"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}},
            {"sources": [{"model": m["deep"], "layer_range": [2, 6]}]}]}, 0),
        # two slices of different lengths, each merged with its own t gradient
        "slerp_slices": ({"merge_method": "slerp", "base_model": m["a"], **f32, "parameters": {"t": [0.1, 0.9]},
                          "slices": [{"sources": [{"model": m["a"], "layer_range": [0, 1]},
                                                  {"model": m["b"], "layer_range": [0, 1]}]},
                                     {"sources": [{"model": m["a"], "layer_range": [1, 4]},
                                                  {"model": m["deep"], "layer_range": [3, 6]}],
                                      "parameters": {"t": [{"filter": "mlp", "value": [1, 0]}, {"value": 0.3}]}}]},
                         0),
        "tokenizer_base": ({**two("ties", density=0.5), "tokenizer": {"source": "base"}}, 0),
        "tokenizer_union": ({"merge_method": "linear", "base_model": m["a"], **f32, "tokenizer_source": "union",
                             "models": [w(m["a"], weight=0.4), w(m["tok"], weight=0.6)]}, 0),
        "tokenizer_tokens": ({**two("task_arithmetic"), "chat_template": "chatml", "tokenizer": {
            "source": "union", "pad_to_multiple_of": 16, "tokens": {
                "<|tool|>": {"source": {"kind": "model_token", "model": m["b"], "token": "<|user|>"}},
                "<|end|>": {"source": m["tok"], "force": True}, "<|new|>": {"source": {"kind": "zero"}}}},
            "models": [w(m["b"], weight=0.7), w(m["tok"], weight=0.5)]}, 0),
        "tokenizer_model": ({"merge_method": "linear", **f32, "tokenizer": {"source": m["tok"]},
                             "chat_template": "auto",
                             "models": [w(m["a"], weight=1.0), w(m["tok"], weight=[1.0, 3.0])]}, 0),
        # the base's tokenizer has 4 tokens past its 260 embedding rows: they are stripped from the output's
        "tokenizer_strip": ({"merge_method": "task_arithmetic", "base_model": m["short"], **f32,
                             "tokenizer": {"source": "base"}, "models": [w(m["short2"], weight=0.5)]}, 0),
        "chat_template_inline": ({"merge_method": "linear", **f32,
                                  "chat_template": "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                                                   "{% endfor %}",
                                  "models": [w(m["a"], weight=1.0), w(m["b"], weight=1.0)]}, 0),
    }


def _run_all(root: Path) -> None:
    models = {"a": write_model(root / "a", 1), "b": write_model(root / "b", 2), "c": write_model(root / "c", 3),
              "deep": write_model(root / "deep", 4, layers=6),
              "tok": write_model(root / "tok", 5, extra_token="<|tool|>"),
              "short": write_model(root / "short", 6, vocab=260), "short2": write_model(root / "short2", 7, vocab=260)}
    jobs = []
    for name, (doc, seed) in configs(models).items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        jobs.append((str(path), str(root / f"{name}.mk"), seed))
        try:
            merge(load_config(path), root / f"{name}.st", seed=seed)
        except Exception as e:  # reported by the test of this config
            Path(f"{root / name}.st.error").write_text(f"{type(e).__name__}: {e}")
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "driver.py").write_text(DRIVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([mergekit_python(), str(root / "driver.py"), str(root / "jobs.json")], env=env, check=True,
                   capture_output=True, timeout=900)
    (root / "done").write_text("ok")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every config merged by mergekit (one process) and by slimtune: name -> (mergekit out, slimtune out). Under
    pytest-xdist the workers share one run (a lock in the session's common temp folder)."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    root = shared / "mergekit-runs"
    with FileLock(str(shared / "mergekit-runs.lock")):
        if not (root / "done").exists():
            root.mkdir(exist_ok=True)
            _run_all(root)
    names = configs(dict.fromkeys(["a", "b", "c", "deep", "tok", "short", "short2"], ""))
    return {name: (root / f"{name}.mk", root / f"{name}.st") for name in names}


def outputs(runs, name):
    mk, st = runs[name]
    if Path(f"{mk}.error").exists():
        pytest.fail(f"mergekit failed on {name}: {Path(f'{mk}.error').read_text().splitlines()[-1]}")
    if Path(f"{st}.error").exists():
        pytest.fail(f"slimtune failed on {name}: {Path(f'{st}.error').read_text()}")
    return sd(mk), sd(st), json.loads((mk / "config.json").read_text()), json.loads((st / "config.json").read_text())


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        assert a[k].shape == b[k].shape, k
        worst = max(worst, (a[k].double() - b[k].double()).abs().max().item())
    return worst


EXACT = ["slerp_schedule", "linear_gradient", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties",
         "della_d1", "della_linear_d1", "dare_ties_d1", "model_stock", "model_stock_rows", "nuslerp",
         "nuslerp_base_rows", "nuslerp_cols", "passthrough_stack", "slerp_slices", "tokenizer_base",
         "tokenizer_union", "tokenizer_tokens", "tokenizer_model", "tokenizer_strip", "chat_template_inline"]


@pytest.mark.parametrize("name", EXACT)
def test_same_tensors_and_config_as_mergekit(runs, name):
    a, b, ca, cb = outputs(runs, name)
    assert max_diff(a, b) <= (0 if name == "passthrough_stack" else TOL), name
    for k in ("num_hidden_layers", "vocab_size", "hidden_size"):
        assert ca[k] == cb[k], k


def test_schedule_reaches_every_layer_and_the_head(runs):
    """Item 3: the gradient moves the layers, and the final norm / lm_head are the base's (t = 0)."""
    a, b, _, _ = outputs(runs, "slerp_schedule")
    base = sd(Path(runs["slerp_schedule"][0]).parent / "a")
    assert torch.equal(b["model.norm.weight"], base["model.norm.weight"])
    assert torch.equal(b["lm_head.weight"], base["lm_head.weight"])
    q = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(b[q.format(0)], base[q.format(0)]) and not torch.equal(b[q.format(2)], base[q.format(2)])


def test_stacked_layers_config_and_loading(runs):
    import transformers

    _, b, ca, cb = outputs(runs, "passthrough_stack")
    assert cb["num_hidden_layers"] == ca["num_hidden_layers"] == 10
    src = {k: sd(Path(runs["passthrough_stack"][0]).parent / k) for k in ("a", "b", "deep")}
    q = "model.layers.{}.self_attn.{}.weight"
    assert torch.equal(b[q.format(4, "q_proj")], src["b"][q.format(2, "q_proj")])  # slice 2 starts at b's layer 1
    assert torch.equal(b[q.format(4, "o_proj")], src["b"][q.format(2, "o_proj")] * 0.5)
    assert torch.equal(b[q.format(9, "q_proj")], src["deep"][q.format(5, "q_proj")])
    m = transformers.AutoModelForCausalLM.from_pretrained(str(runs["passthrough_stack"][1]))
    assert len(m.model.layers) == 10 and torch.isfinite(m(torch.randint(8, 260, (1, 9))).logits).all()


@pytest.mark.parametrize("name", ["tokenizer_base", "tokenizer_union", "tokenizer_tokens", "tokenizer_model",
                                  "tokenizer_strip", "chat_template_inline"])
def test_same_tokenizer_as_mergekit(runs, name):
    from transformers import AutoTokenizer

    mk, st = (AutoTokenizer.from_pretrained(str(p)) for p in runs[name])
    assert mk.get_vocab() == st.get_vocab()
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert mk.apply_chat_template(chat, tokenize=False) == st.apply_chat_template(chat, tokenize=False)
    text = "say <|tool|> and <|new|> ok"
    assert mk(text)["input_ids"] == st(text)["input_ids"]


def _delta_stats(runs, name):
    """Per big tensor: (share of entries changed, ||merged - base||_1 / ||model - base||_1) for both outputs."""
    root = Path(runs[name][0]).parent
    base, model = sd(root / "a"), sd(root / "b")
    stats = []
    for out in outputs(runs, name)[:2]:
        kept, l1 = [], []
        for k, x in out.items():
            if x.dim() == 2:
                d, full = x.double() - base[k].double(), model[k].double() - base[k].double()
                kept.append((d != 0).double().mean().item())
                l1.append((d.abs().sum() / full.abs().sum()).item())
        stats.append((sum(kept) / len(kept), sum(l1) / len(l1)))
    return stats


def test_dare_statistics_match(runs):
    (mk_keep, mk_l1), (st_keep, st_l1) = _delta_stats(runs, "dare_linear_stats")
    assert abs(mk_keep - 0.4) < 0.01 and abs(st_keep - 0.4) < 0.01
    assert abs(mk_l1 - 1) < 1e-4 and abs(st_l1 - 1) < 0.01  # mergekit: exact L1 rescale; slimtune: 1 / density


def test_della_statistics_match(runs):
    (mk_keep, mk_l1), (st_keep, st_l1) = _delta_stats(runs, "della_stats")
    assert abs(mk_keep - 0.5) < 0.01 and abs(st_keep - 0.5) < 0.01
    assert abs(mk_l1 - 1) < 1e-4 and abs(st_l1 - 1) < 1e-4  # both rescale by the realised L1 ratio
    a, b, _, _ = outputs(runs, "della_ties_stats")
    root = Path(runs["della_ties_stats"][0]).parent
    base = sd(root / "a")
    for k in ("model.layers.1.mlp.up_proj.weight", "lm_head.weight"):
        na, nb = ((x[k] - base[k]).norm().item() for x in (a, b))
        assert abs(na / nb - 1) < 0.03, (k, na, nb)
