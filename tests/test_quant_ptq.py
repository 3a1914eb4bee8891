"""`slimtune quantize`: each format round-trips through its folder (logits equal to the in-memory quantized model),
generates, reports sizes / errors / perplexity; bad input exits 2 with one line; the mixed-bit allocation is the exact
optimum (brute force) and meets the budget exactly when reachable, and the CLI report agrees with the saved model."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from slimtune.cli import main
from slimtune.quant.mixed import BIT_CHOICES, allocate_bits

FAST = ["--eval-limit", "24", "--max-length", "64"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from slimtune.models.save import save_model
    from slimtune.models.config import ModelConfig
    from slimtune.models.decoder import Decoder, init_weights
    from slimtune.models.tiny import builtin_tokenizer

    cfg = ModelConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=[2, 6],
                      pad_token_id=0)
    return save_model(init_weights(Decoder(cfg), 3), tmp_path_factory.mktemp("ptq") / "model",
                      tokenizer=builtin_tokenizer())


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4", "fp4", "fp8", "w8a8"])
def test_round_trip_each_format(tiny, tmp_path, capsys, fmt):
    from slimtune.models.load import load_model
    from slimtune.quant import quantize_model
    from slimtune.quant.linear import QuantLinear

    rep = run_json(capsys, ["quantize", str(tiny), "--format", fmt, "--out", str(tmp_path / "q"), "--no-eval"])
    assert rep["layers"] == 14 and rep["bytes_after"] < rep["bytes_before"]
    assert 0 < rep["weight_rel_error"] < 0.3 and rep["max_layer_rel_error"] >= rep["weight_rel_error"] * 0.9
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    if fmt in ("int8", "nf4", "fp4"):  # bitsandbytes' kinds: its dialect, so that transformers loads the folder
        assert cfg["quant_method"] == "bitsandbytes" and cfg["llm_int8_skip_modules"] == ["lm_head"]
    else:
        assert cfg["quant_method"] == "slimtune" and set(cfg["layers"].values()) == {fmt}
    loaded, _ = load_model(tmp_path / "q")
    ref, _ = load_model(tiny)
    quantize_model(ref, fmt)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QuantLinear)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), ref(ids), rtol=0, atol=0)
    size = sum(f.stat().st_size for f in (tmp_path / "q").glob("*.safetensors"))
    assert size < rep["bytes_before"] and abs(size - rep["bytes_after"]) < 0.1 * rep["bytes_after"]


def test_report_perplexity_and_generate(tiny, tmp_path, capsys):
    rep = run_json(capsys, ["quantize", str(tiny), "--format", "int4", "--group", "32", "--out", str(tmp_path / "q")]
                   + FAST)
    assert rep["group_size"] == 32 and rep["eval_rows"] > 0
    assert rep["ppl_before"] == pytest.approx(torch.tensor(rep["loss_before"]).exp().item())
    assert rep["ppl_change"] == pytest.approx(rep["ppl_after"] - rep["ppl_before"]) and rep["ppl_change"] != 0
    assert rep["bits_codes"] == 4 and rep["bits_overhead"] == pytest.approx(40 / 32)
    out = run_json(capsys, ["generate", "--model", str(tmp_path / "q"), "--prompt", "Hello", "--max-new-tokens",
                            "6", "--device", "cpu"])
    assert out["new_tokens"] >= 1
    assert main(["quantize", str(tiny), "--format", "nf4", "--out", str(tmp_path / "t")] + FAST) == 0
    text = capsys.readouterr().out
    assert "size:" in text and "perplexity on" in text and "relative error" in text


def test_bad_input_exits_2(tiny, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    for argv in (["--format", "int5"], ["--format", "int4", "--group", "48"], ["--format", "int8", "--group", "64"],
                 ["--format", "int4", "--bits", "3"], ["--bits", "9"]):
        assert main(["quantize", str(tiny), *argv, "--out", str(tmp_path / "x"), "--no-eval"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fmt, key in (("int4", "model.layers.0.self_attn.q_proj.scales"),
                     ("nf4", "model.layers.1.mlp.up_proj.weight.absmax")):
        q = tmp_path / fmt
        assert main(["quantize", str(tiny), "--format", fmt, "--out", str(q), "--no-eval"]) == 0
        sd = load_file(str(q / "model.safetensors"))
        del sd[key]
        save_file(sd, str(q / "model.safetensors"))
        capsys.readouterr()
        assert main(["generate", "--model", str(q), "--max-new-tokens", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and key in err, err


def brute_force(sizes: dict[str, int], sens: dict[str, dict[int, float]], budget: float):
    """The best allocation by enumeration: exact budget if any combination reaches it, else the closest below."""
    names, N = list(sizes), sum(sizes.values())
    best = None
    for combo in itertools.product(BIT_CHOICES, repeat=len(names)):
        cost = sum(sizes[n] * b for n, b in zip(names, combo))
        if cost > budget * N + 1e-9:
            continue
        key = (-cost, sum(sens[n][b] for n, b in zip(names, combo)))
        if best is None or key < best[0]:
            best = (key, dict(zip(names, combo)))
    return best[1]


@pytest.mark.parametrize("sizes,budget,exact", [
    ({"a": 4096, "b": 1024, "c": 1024, "d": 2048, "e": 8192, "f": 4096}, 3.5, True),
    ({"a": 4096, "b": 1024, "c": 1024, "d": 2048, "e": 8192, "f": 4096}, 2.75, True),
    ({"a": 3, "b": 5}, 3.5, False),  # 3 x + 5 y = 28 has no solution with x, y in {2, 3, 4, 8}
])
def test_allocation_is_the_exact_optimum(sizes, budget, exact):
    g = torch.Generator().manual_seed(7)
    sens = {n: dict(zip(BIT_CHOICES, sorted(torch.rand(4, generator=g).tolist(), reverse=True))) for n in sizes}
    got, is_exact = allocate_bits(sizes, sens, budget)
    want = brute_force(sizes, sens, budget)
    N = sum(sizes.values())
    avg = sum(sizes[n] * b for n, b in got.items()) / N
    assert is_exact == exact
    assert (avg == budget) if exact else avg < budget
    assert avg == pytest.approx(sum(sizes[n] * b for n, b in want.items()) / N)
    assert sum(sens[n][b] for n, b in got.items()) == pytest.approx(sum(sens[n][b] for n, b in want.items()))


def test_mixed_budget_cli_report_is_consistent(tiny, tmp_path, capsys):
    from slimtune.models.load import load_model
    from slimtune.quant.codecs import get_codec

    rep = run_json(capsys, ["quantize", str(tiny), "--bits", "3.5", "--calib-rows", "2", "--out",
                            str(tmp_path / "m")] + FAST)
    alloc = rep["allocation"]
    N = sum(r["params"] for r in alloc)
    assert rep["exact"] and sum(r["params"] * r["bits"] for r in alloc) == 3.5 * N and rep["bits_codes"] == 3.5
    assert len({r["bits"] for r in alloc}) >= 2  # really mixed
    loaded, _ = load_model(tmp_path / "m")
    bits = {f: get_codec(f).code_bits for f in ("int2", "int3", "int4", "int8")}
    for r in alloc:
        layer = loaded.get_submodule(r["layer"])
        assert layer.fmt == r["format"] and bits[layer.fmt] == r["bits"]
        assert set(r["sensitivity"]) == {"2", "3", "4", "8"}
        assert r["rel_error"] == pytest.approx(rep["layer_errors"][r["layer"]])
    # overhead: int8 pays 32 bits per row of `in` weights, the rest 40 bits per group of 64
    over = sum(r["params"] * (32 / (256 if "down" in r["layer"] else 128) if r["bits"] == 8 else 40 / 64)
               for r in alloc) / N
    assert rep["bits_overhead"] == pytest.approx(over)


def test_plain_text_eval_file(tiny, tmp_path, capsys):
    from slimtune.data import sample_path

    recs = json.loads(Path(sample_path()).read_text())[:30]
    txt = tmp_path / "eval.txt"
    txt.write_text("\n\n".join(r["output"] for r in recs), encoding="utf-8")
    rep = run_json(capsys, ["quantize", str(tiny), "--format", "nf4", "--eval", str(txt), "--max-length", "64",
                            "--out", str(tmp_path / "q")])
    n_tok = len(txt.read_text().encode("utf-8"))  # the byte-level tokenizer: one token per byte
    assert rep["eval_rows"] == (n_tok // 64) // 2 and rep["ppl_after"] > 1
    (tmp_path / "short.txt").write_text("too short")
    assert main(["quantize", str(tiny), "--format", "nf4", "--eval", str(tmp_path / "short.txt"), "--out",
                 str(tmp_path / "x")]) == 2
