"""`slimtune params`: weightless counts on the meta device. GPT-3 175B rows of the LoRA paper (Hu et al. 2021,
Table 4), closed-form counts of each method, PEFT's own counts on a tiny transformers model, one-line errors."""
from __future__ import annotations

import json

import pytest
from conftest import make_hf_model

from slimtune.cli import main

D, L = 12288, 96  # GPT-3 175B: d_model, layers (Brown et al. 2020, Table 2.1)


def params(capsys, *argv: str) -> dict:
    assert main(["params", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# (arguments, closed form, the published figure in millions). The paper rounds Houlsby's rows (7,078,080 -> 7.1M)
# and truncates LoRA's (301,989,888 -> 301.9M); its r = 64 q,k,v,o row, 603.8M, is twice that truncated 301.9M,
# while the exact 2 * 4 * 96 * 12288 * 64 = 603,979,776: all four agree with the table to 0.2M (< 0.05%).
# Houlsby also trains the layer norms (as the paper, section 2.1), which the table leaves out: two LayerNorms a block
# and the final one, each a weight and a bias of D.
NORMS = (2 * L + 1) * 2 * D
GPT3_ROWS = [
    (["--method", "lora", "--targets", "q_proj,v_proj", "--rank", "8"], 2 * 2 * L * D * 8, 0, 37.7),
    (["--method", "lora", "--targets", "q_proj,k_proj,v_proj,o_proj", "--rank", "64"], 2 * 4 * L * D * 64, 0, 603.8),
    (["--method", "houlsby", "--rank", "1"], 2 * L * (2 * D * 1 + 1 + D), NORMS, 7.1),
    (["--method", "houlsby", "--rank", "64"], 2 * L * (2 * D * 64 + 64 + D), NORMS, 304.4),
]


@pytest.mark.parametrize("argv,exact,norms,published", GPT3_ROWS, ids=["lora-qv-8", "lora-qkvo-64", "houlsby-1",
                                                                         "houlsby-64"])
def test_gpt3_175b_table(capsys, argv, exact, norms, published):
    out = params(capsys, "--shape", "gpt3-175b", *argv)
    assert out["trainable"] == exact + norms
    assert abs(exact / 1e6 - published) < 0.2
    assert 174.5e9 < out["total"] - out["trainable"] < 175.0e9  # the base: 175B
    assert out["percent"] == pytest.approx(100 * out["trainable"] / out["total"])


def test_counts_of_each_method_on_builtin(capsys):
    d, f, L4, nkv, hd, V = 256, 688, 4, 2, 64, 320  # the built-in model
    base = params(capsys, "--model", "builtin", "--method", "full")["total"]
    assert params(capsys, "--model", "builtin", "--method", "full")["trainable"] == base
    assert params(capsys, "--model", "builtin", "--method", "ia3")["trainable"] == L4 * (2 * nkv * hd + f)
    # zero biases on q (d), k and v (nkv hd each), o (d), gate and up (f each), down (d)
    assert params(capsys, "--model", "builtin", "--method", "bitfit", "--add-bias")["trainable"] == \
        L4 * (d + 2 * nkv * hd + d + 2 * f + d)
    assert params(capsys, "--model", "builtin", "--method", "prompt", "--virtual-tokens", "10")["trainable"] == 10 * d
    assert params(capsys, "--model", "builtin", "--method", "prefix", "--virtual-tokens", "10")["trainable"] == \
        10 * 2 * L4 * nkv * hd
    assert params(capsys, "--model", "builtin", "--method", "partial", "--modules", "lm_head")["trainable"] == V * d
    one_block = params(capsys, "--model", "builtin", "--method", "partial", "--last-k", "1")["trainable"]
    assert params(capsys, "--model", "builtin", "--method", "partial", "--last-k", "3")["trainable"] == 3 * one_block


PEFT_CASES = {
    "ia3": (["--method", "ia3"], lambda p: p.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                        feedforward_modules=["down_proj"], task_type="CAUSAL_LM")),
    "prompt": (["--method", "prompt", "--virtual-tokens", "7"],
               lambda p: p.PromptTuningConfig(num_virtual_tokens=7, task_type="CAUSAL_LM")),
    "ptuning-mlp": (["--method", "ptuning", "--virtual-tokens", "7"],
                    lambda p: p.PromptEncoderConfig(num_virtual_tokens=7, task_type="CAUSAL_LM")),
    "ptuning-lstm": (["--method", "ptuning", "--virtual-tokens", "7", "--encoder", "lstm", "--encoder-hidden", "24"],
                     lambda p: p.PromptEncoderConfig(num_virtual_tokens=7, task_type="CAUSAL_LM",
                                                     encoder_reparameterization_type="LSTM",
                                                     encoder_hidden_size=24)),
    "prefix": (["--method", "prefix", "--virtual-tokens", "7"],
               lambda p: p.PrefixTuningConfig(num_virtual_tokens=7, task_type="CAUSAL_LM")),
    "prefix-mlp": (["--method", "prefix", "--virtual-tokens", "7", "--projection"],
                   lambda p: p.PrefixTuningConfig(num_virtual_tokens=7, task_type="CAUSAL_LM",
                                                  prefix_projection=True)),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_trainable_count_equals_peft(capsys, tmp_path, case):
    peft = pytest.importorskip("peft")
    argv, make_cfg = PEFT_CASES[case]
    hf = make_hf_model("llama3")
    hf.save_pretrained(tmp_path / "m")
    ours = params(capsys, "--model", str(tmp_path / "m"), *argv)
    pm = peft.get_peft_model(hf, make_cfg(peft))
    trainable, _ = pm.get_nb_trainable_parameters()
    assert ours["trainable"] == trainable
    assert ours["total"] == sum(p.numel() for p in make_hf_model("llama3").parameters()) + trainable


@pytest.mark.parametrize("argv,words", [
    (["--shape", "tiny", "--method", "adalora"], "unknown fine-tuning method"),
    (["--shape", "tiny", "--method", "ia3", "--rank", "4"], "--rank does not apply"),
    (["--shape", "tiny", "--method", "lora", "--rank", "0"], "positive integer"),
    (["--shape", "tiny", "--method", "houlsby", "--rank", "-2"], "positive integer"),
    (["--shape", "tiny", "--method", "lora", "--targets", "qq_proj"], "linear modules here"),
    (["--shape", "tiny", "--method", "bitfit"], "add_bias"),
    (["--shape", "tiny", "--method", "partial"], "last_k"),
    (["--shape", "tiny", "--method", "partial", "--last-k", "9"], "only 4 blocks"),
    (["--shape", "tiny", "--method", "prompt", "--virtual-tokens", "0"], "num_virtual_tokens"),
    (["--shape", "tiny", "--method", "ptuning", "--encoder", "gru"], "MLP or LSTM"),
    (["--shape", "nope", "--method", "lora"], "unknown shape"),
    (["--model", "/nonexistent/dir", "--method", "lora"], "config.json"),
    (["--shape", "tiny", "--method", "lora", "--layers", "a,b"], "--layers"),
])
def test_errors_are_one_line_exit_2(capsys, argv, words):
    assert main(["params", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert words in err, err


def test_text_output(capsys):
    assert main(["params", "--shape", "tiny", "--method", "ia3"]) == 0
    line = capsys.readouterr().out.strip()
    assert "trainable" in line and "%" in line and "\n" not in line
