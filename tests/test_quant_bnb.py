"""Quantized folders move both ways between slimtune and transformers + bitsandbytes (its CPU backend): a folder saved
by transformers loads in `load_model`, one written by `slimtune quantize` loads in `AutoModelForCausalLM`, with equal
dequantized weights and equal logits (int8: equal weights; logits within bitsandbytes' 8-bit activation error)."""
from __future__ import annotations

import json

import pytest
import torch

from slimtune.cli import main
from slimtune.errors import CheckpointError

bnb = pytest.importorskip("bitsandbytes")  # in the test extra (its CPU wheel runs with torch 2.13 CPU)
transformers = pytest.importorskip("transformers")

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def tiny_hf(seed: int = 0):
    """A 2-layer random Llama whose widths are multiples of 64 (bitsandbytes' CPU 4-bit kernel needs that)."""
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in n else torch.randn_like(p) * 0.08)
    return model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from slimtune.models.tiny import builtin_tokenizer

    folder = tmp_path_factory.mktemp("bnb") / "base"
    tiny_hf().save_pretrained(folder)
    builtin_tokenizer().save_pretrained(folder)
    return folder


def reference_kernels(model) -> None:
    """Turn off bitsandbytes' AVX512-BF16 CPU path (it repacks the weight and computes in bf16) so that its layers
    compute as on every other backend: dequantize to the compute dtype, then one fp32 matmul."""
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def bnb_weight(layer) -> torch.Tensor:
    """The dequantized fp32 weight of a bitsandbytes layer."""
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB  # moved to .state by a forward
    return layer.weight.data.float() * (scb / 127)[:, None]


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt,nested", [("nf4", True), ("nf4", False), ("fp4", True), ("int8", False)])
def test_transformers_folder_loads_in_slimtune(base_dir, tmp_path, fmt, nested):
    from slimtune.models.load import load_model
    from slimtune.quant.linear import QuantLinear

    qc = transformers.BitsAndBytesConfig(load_in_8bit=True) if fmt == "int8" else transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=fmt, bnb_4bit_use_double_quant=nested,
        bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=qc, device_map="cpu",
                                                               dtype=torch.float32)
    theirs.save_pretrained(tmp_path / "q")  # before any forward: the CPU kernel repacks weights in place
    ours, _ = load_model(tmp_path / "q")
    for i in range(2):
        for name in LINEARS:
            mine = ours.get_submodule(f"model.layers.{i}.{name}")
            assert isinstance(mine, QuantLinear) and mine.fmt == fmt and mine.double_quant == nested
            assert torch.equal(mine.dequantize(torch.float32), bnb_weight(theirs.get_submodule(f"model.layers.{i}."
                                                                                                f"{name}")))
    assert not isinstance(ours.lm_head, QuantLinear)  # transformers leaves the output head in 16/32 bits
    x = ids()
    with torch.no_grad():
        if fmt == "int8":  # their int8 matmul quantizes the activations too: compare with the dequantized model
            ref = tiny_hf()
            for n, m in ours.named_modules():
                if isinstance(m, QuantLinear):
                    ref.get_submodule(n).weight.copy_(m.dequantize(torch.float32))
            torch.testing.assert_close(ours(x), ref(x).logits, rtol=0, atol=1e-5)
        else:
            reference_kernels(theirs)
            torch.testing.assert_close(ours(x), theirs(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
def test_slimtune_quantize_folder_loads_in_transformers(base_dir, tmp_path, capsys, fmt):
    from slimtune.models.load import load_model

    assert main(["quantize", str(base_dir), "--format", fmt, "--out", str(tmp_path / "q"), "--no-eval",
                 "--json"]) == 0
    capsys.readouterr()
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["llm_int8_skip_modules"] == ["lm_head"]
    assert qc["load_in_4bit"] == (fmt != "int8") and qc["load_in_8bit"] == (fmt == "int8")
    ours, _ = load_model(tmp_path / "q")  # slimtune reads its own folder back through the same dialect
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    layer = theirs.model.layers[1].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt if fmt == "int8" else bnb.nn.Linear4bit)
    for i in range(2):
        for name in LINEARS:
            path = f"model.layers.{i}.{name}"
            assert torch.equal(bnb_weight(theirs.get_submodule(path)), ours.get_submodule(path).dequantize(
                torch.float32)), path
    reference_kernels(theirs)
    x = ids(2)
    with torch.no_grad():
        got, want = theirs(x).logits, ours(x).logits
    if fmt == "int8":  # LLM.int8: fp16 activations quantized to int8 per row (outliers above 6 kept in fp16)
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 0.02, rel
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_other_formats_keep_slimtune_dialect(base_dir, tmp_path, capsys):
    """int4 / mixed budgets and 4-bit block sizes bitsandbytes does not take stay in slimtune's own format."""
    for fmt, extra in (("int4", []), ("nf4", ["--group", "32"])):
        out = tmp_path / f"{fmt}{len(extra)}"
        assert main(["quantize", str(base_dir), "--format", fmt, *extra, "--out", str(out), "--no-eval"]) == 0
        assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "slimtune"
    capsys.readouterr()


def test_damaged_bnb_folders_refused(base_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from slimtune.models.load import load_model

    assert main(["quantize", str(base_dir), "--format", "nf4", "--out", str(tmp_path / "q"), "--no-eval"]) == 0
    capsys.readouterr()
    f = tmp_path / "q" / "model.safetensors"
    sd = load_file(f)
    key = next(k for k in sd if k.endswith("quant_state.bitsandbytes__nf4"))
    sd[key] = torch.tensor(list(b"not json"), dtype=torch.uint8)
    save_file(sd, f)
    with pytest.raises(CheckpointError, match="not a bitsandbytes 4-bit quant state"):
        load_model(tmp_path / "q")
    assert main(["quantize", str(base_dir), "--format", "int8", "--out", str(tmp_path / "i"), "--no-eval"]) == 0
    capsys.readouterr()
    f = tmp_path / "i" / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.mlp.up_proj.weight_format"] = torch.tensor(2, dtype=torch.uint8)  # an old GPU tile layout
    save_file(sd, f)
    with pytest.raises(CheckpointError, match="not the row-major int8 layout"):
        load_model(tmp_path / "i")


def test_qlora_trains_on_a_transformers_nf4_folder(base_dir, tmp_path, capsys):
    """A pre-quantized bitsandbytes folder (as published on the hub) is a QLoRA base as it is."""
    from slimtune.data import sample_path

    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.float32)
    transformers.AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=qc, device_map="cpu",
                                                      dtype=torch.float32).save_pretrained(tmp_path / "q")
    argv = ["finetune", f"model={tmp_path / 'q'}", f"tokenizer={base_dir}", "method=qlora", "targets=all-linear",
            f"data={sample_path()}", "data_limit=8", "max_length=64", "max_steps=2", "batch_size=2", "lr=1e-2",
            f"out_dir={tmp_path / 'o'}", "progress=false", "plot=false", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 2 and (tmp_path / "o" / "adapter" / "adapter_model.safetensors").exists()
