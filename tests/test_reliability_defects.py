"""The five defects of issue 16, each reproduced through the real CLI (forked from one zygote) and now refused in one
line with nothing written: an int8 torch_dtype under merge-adapter; merges, adapters and weights that are not finite;
non-finite or out-of-range training numbers and a checkpoint saved from non-finite weights; damaged inputs (swept in
test_reliability_sweep); a refused resume that rewrote config.yaml. Plus: one-line usage errors, the full help only
with --help, and no dtype name read from a file is ever looked up on the torch module."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reliability_assets import copy_of, edit_json, poison, run_overrides
from reliability_cases import CASES
from reliability_harness import one_clean_line, tree_hash

import reliability_cases_more  # noqa: F401  (adds its cases to CASES)

SRC = Path(__file__).resolve().parents[1] / "src" / "slimtune"




def refused(zygote, argv, cwd: Path, *words: str, roots: tuple[Path, ...] = ()) -> str:
    """Run argv; assert exit 2, one line holding every word, and no change under cwd and `roots`."""
    before = tree_hash(cwd, *roots)
    line = one_clean_line(zygote.run(argv, cwd))
    for w in words:
        assert w in line, (w, line)
    assert tree_hash(cwd, *roots) == before
    return line


# ---- 1. merge-adapter onto a base whose config.json says torch_dtype int8 ------------------------------------------
def test_int8_torch_dtype_is_refused_and_never_cast(ws, zygote, tmp_path):
    base = copy_of(ws / "model", tmp_path / "base")
    edit_json(base / "config.json", {"torch_dtype": "int8"})
    refused(zygote, ["merge-adapter", "--model", base, "--adapter", ws / "adapter", "--out", tmp_path / "out"],
            tmp_path, "torch_dtype", "int8", "config.json")
    for flags in (["--dtype", "int8"], ["--dtype", "int8", "--force"]):  # --force never allows an integer cast
        refused(zygote, ["merge-adapter", "--model", ws / "model", "--adapter", ws / "adapter", "--out",
                         tmp_path / "out", *flags], tmp_path, "int8")
        refused(zygote, ["convert", ws / "model", tmp_path / "out", *flags], tmp_path, "int8")


def test_merge_adapter_auto_dtype_keeps_the_declared_float(ws, zygote, tmp_path):
    base = tmp_path / "bf16"
    assert zygote.run(["convert", ws / "model", base, "--dtype", "bf16"], tmp_path).code == 0
    r = zygote.run(["merge-adapter", "--model", base, "--adapter", ws / "adapter", "--out", tmp_path / "out"],
                   tmp_path)
    assert r.code == 0, r.err
    assert {t.dtype for t in load_file(str(tmp_path / "out" / "model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_no_dtype_name_from_a_file_is_looked_up_on_torch():
    hits = [f"{p.relative_to(SRC)}:{i + 1}" for p in SRC.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines()) if re.search(r"getattr\(torch,", line)]
    assert hits == []


# ---- 2. merges, adapters and weights that are not finite ----------------------------------------------------------
LINEAR = "merge_method: linear\nmodels:\n  - model: {m}\n    parameters: {{weight: {a}}}\n" \
         "  - model: {m}\n    parameters: {{weight: {b}}}\n"


@pytest.mark.parametrize("a, b, word", [("1.0", "-1.0", "sum to 0"), (".nan", "1.0", "weight"),
                                        ("1.0", ".inf", "weight")])
def test_merge_weights_that_cancel_or_are_not_finite(ws, zygote, tmp_path, a, b, word):
    (tmp_path / "m.yaml").write_text(LINEAR.format(m=ws / "model", a=a, b=b))
    refused(zygote, ["merge", tmp_path / "m.yaml", tmp_path / "out"], tmp_path, word, roots=(ws,))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_merge_of_a_nan_model_writes_nothing(ws, zygote, tmp_path):
    bad = copy_of(ws / "model", tmp_path / "nan")
    name = poison(bad / "model.safetensors", "mlp")
    cfg = f"merge_method: task_arithmetic\nbase_model: {ws / 'model'}\nmodels:\n  - model: {bad}\n" \
          "    parameters: {weight: 0.5}\n"
    (tmp_path / "m.yaml").write_text(cfg)
    line = refused(zygote, ["merge", tmp_path / "m.yaml", tmp_path / "out"], tmp_path, name, roots=(ws,))
    assert "NaN" in line and not (tmp_path / "out").exists()


def test_nan_adapter_is_refused_by_merge_adapter_and_generate(ws, zygote, tmp_path):
    bad = copy_of(ws / "adapter", tmp_path / "a")
    name = poison(bad / "adapter_model.safetensors", "lora_B")
    refused(zygote, ["merge-adapter", "--model", ws / "model", "--adapter", bad, "--out", tmp_path / "out"],
            tmp_path, name, "NaN", roots=(ws,))
    refused(zygote, ["generate", "--model", ws / "model", "--adapter", bad, "--prompt", "hi"], tmp_path, name)


@pytest.mark.parametrize("cmd", ["convert", "generate", "quantize", "finetune"])
def test_nan_weights_are_refused_everywhere(ws, zygote, tmp_path, cmd):
    m = copy_of(ws / "model", tmp_path / "m")
    name = poison(m / "model.safetensors", "k_proj")
    argv = {"convert": ["convert", m, tmp_path / "out"],
            "generate": ["generate", "--model", m, "--prompt", "hi"],
            "quantize": ["quantize", m, "--format", "int8", "--no-eval", "--out", tmp_path / "out"],
            "finetune": ["finetune", *run_overrides(ws, tmp_path / "out", model=m)]}[cmd]
    refused(zygote, argv, tmp_path, name, "NaN")


def test_check_finite_names_the_first_bad_element():
    from slimtune.errors import PrecisionError
    from slimtune.precision.guard import check_finite

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn):
        t = torch.randn(37, 29, generator=g).to(dtype)
        check_finite("w", t)  # finite: no error
        i = int(torch.randint(0, t.numel(), (), generator=g))
        t.view(-1)[i] = float("nan") if dtype == torch.float8_e4m3fn else [float("nan"), float("inf")][i % 2]
        with pytest.raises(PrecisionError, match=rf"tensor w holds NaN or inf \(first at flat index {i}\)"):
            check_finite("w", t)


# ---- 3. training numbers, and "the last good checkpoint" ---------------------------------------------------------
@pytest.mark.parametrize("kv", ["lr=.inf", "weight_decay=.nan", "lr=.nan", "betas=[1.5,0.999]", "device=tpu",
                                "max_grad_norm=.inf", "epochs=.nan"])
def test_training_numbers_out_of_range(ws, zygote, tmp_path, kv):
    key = kv.split("=")[0]
    refused(zygote, ["finetune", *run_overrides(ws, tmp_path / "out"), kv, *(["max_steps=null"] if key == "epochs"
                                                                                 else [])],
            tmp_path, key, roots=(ws,))
    assert not (tmp_path / "out").exists()


POISON_AT_STEP_3 = """
import torch, slimtune.train.loop as loop
orig, n = loop.train_step, [0]
def step(model, *a, **k):
    r = orig(model, *a, **k)
    n[0] += 1
    if n[0] == 3:  # the optimizer step left a weight non-finite (as an lr of 1e39 does)
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("inf")
    return r
loop.train_step = step
"""


def all_finite(ckpt: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for f in ("weights", "state")
               for t in load_file(str(ckpt / f"{f}.safetensors")).values() if t.is_floating_point())


def test_no_checkpoint_from_non_finite_weights(ws, zygote, tmp_path):
    out = tmp_path / "run"
    r = zygote.run(["finetune", *run_overrides(ws, out, max_steps=5)], tmp_path, setup=POISON_AT_STEP_3)
    line = one_clean_line(r)
    assert "step 3" in line and "NaN or inf" in line and f"the last good checkpoint is {out}/checkpoints/step-2" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert all_finite(out / "checkpoints" / "step-2")


def test_an_lr_beyond_float32_is_refused(ws, zygote, tmp_path):
    """lr=1e39 is a finite Python float, but the optimizer's float32 arithmetic cannot hold it."""
    refused(zygote, ["finetune", *run_overrides(ws, tmp_path / "run", lr=1e39)], tmp_path, "lr=1e+39", "float32")


# ---- 4. the damaged inputs the issue lists are in the sweep --------------------------------------------------------
ISSUE_LIST = ["st-header-list", "st-no-offsets", "st-negative-shape", "index-list", "config-list", "config-not-utf8",
              "config-kv-heads-0", "config-hidden-size-string", "st-int32-weights", "resume-state-truncated",
              "bin-generate", "bin-convert-untrusted", "data-deep-nesting-jsonl", "generate-empty-prompt",
              "generate-device-cuda", "quantize-device-cuda", "generate-temperature-nan", "quantize-max-length-0",
              "convert-shard-negative", "generate-prompt-longer-than-context", "adapter-nan-merge",
              "merge-weights-cancel", "merge-weight-nan", "st-nan-convert", "st-nan-generate", "adapter-base-int8"]


def test_the_issues_damaged_inputs_are_swept():
    ids = {c.id for c in CASES}
    assert [i for i in ISSUE_LIST if i not in ids] == []


# ---- 5. a refused resume changes nothing, config.yaml included ---------------------------------------------------
def test_refused_resume_leaves_config_yaml(ws, zygote, tmp_path):
    run = copy_of(ws / "run", tmp_path / "run")
    yaml_before = (run / "config.yaml").read_bytes()
    refused(zygote, ["finetune", *run_overrides(ws, run, resume="latest", lr=5e-3, max_steps=3)], tmp_path,
            "lr", "checkpoint", "resume with lr=0.001")
    assert (run / "config.yaml").read_bytes() == yaml_before


# ---- the command line ---------------------------------------------------------------------------------------------
def test_usage_errors_are_one_line_and_help_is_whole(zygote, tmp_path):
    line = one_clean_line(zygote.run(["merge-adapter", "--adapter", "a", "--out", "o"], tmp_path))
    assert line == "slimtune merge-adapter: error: the following arguments are required: --model; see slimtune " \
                   "merge-adapter --help"
    r = zygote.run(["merge-adapter", "--help"], tmp_path)
    assert r.code == 0 and "--adapter" in r.out and len(r.out.splitlines()) > 10
