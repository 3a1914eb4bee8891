"""Checkpoint I/O: sharding, the precision guard, truncated and missing files, and CLI errors (one line, exit 2)."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from slimtune.models.load import load_model
from slimtune.models.save import save_model
from slimtune.precision.guard import check_cast
from slimtune.errors import CheckpointError, PrecisionError
from slimtune.models.tiny import builtin_model, write_builtin


def slimtune(*args):
    return subprocess.run([sys.executable, "-m", "slimtune", *map(str, args)], capture_output=True, text=True)


def assert_one_line_error(r, *words):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_sharded_round_trip(tmp_path):
    model = builtin_model(seed=5)
    out = save_model(model, tmp_path / "sharded", max_shard_size=400_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and (out / "model.safetensors.index.json").exists()
    back, _ = load_model(out)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_dtype_declared_and_cast(tmp_path):
    out = write_builtin(tmp_path / "bf", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    m, cfg = load_model(out)
    assert m.lm_head.weight.dtype == torch.bfloat16
    m32, _ = load_model(out, dtype="fp32")
    assert m32.lm_head.weight.dtype == torch.float32


def test_precision_guard_refuses_bf16_as_fp16(tmp_path):
    model = builtin_model(seed=1).to(torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 7] = 1e5
    out = save_model(model, tmp_path / "big")
    with pytest.raises(PrecisionError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*99840.*bfloat16"):
        load_model(out, dtype="fp16")
    forced, _ = load_model(out, dtype="fp16", force=True)
    assert torch.isinf(forced.model.layers[1].mlp.down_proj.weight).any()
    r = slimtune("generate", "--model", out, "--dtype", "fp16", "--max-new-tokens", "2")
    assert_one_line_error(r, "down_proj.weight", "overflows", "--force")


def test_guard_flush_to_zero_and_widening():
    with pytest.raises(PrecisionError, match="flush to zero"):
        check_cast("w", torch.full((4,), 1e-30), torch.float16)
    check_cast("w", torch.randn(8, dtype=torch.bfloat16) * 1e30, torch.float32)  # widening: never refused
    with pytest.raises(PrecisionError, match="overflows float8_e4m3fn"):
        check_cast("w", torch.tensor([500.0]), torch.float8_e4m3fn)


def test_truncated_and_missing_shard(tmp_path):
    out = save_model(builtin_model(), tmp_path / "m", max_shard_size=400_000)
    shards = sorted(out.glob("model-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(out)
    assert_one_line_error(slimtune("generate", "--model", out), shards[1].name, "truncated")
    shards[2].unlink()
    assert_one_line_error(slimtune("generate", "--model", out), shards[2].name, "missing")


def test_cli_bad_inputs(tmp_path):
    assert_one_line_error(slimtune("generate", "--model", tmp_path / "nope"), "not found")
    bad = tmp_path / "odd"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "notamodel", "vocab_size": 10}))
    assert_one_line_error(slimtune("generate", "--model", bad), "notamodel", "llama", "mistral", "qwen2", "qwen3")
    assert_one_line_error(slimtune("shapes", "llama9-1t"), "llama9-1t", "llama3-8b", "gpt3-175b")
    notst = tmp_path / "junk"
    save_model(builtin_model(), notst)
    (notst / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!!}")
    assert_one_line_error(slimtune("generate", "--model", notst), "model.safetensors")


def test_state_dict_mismatch_names_tensor(tmp_path):
    out = write_builtin(tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    cfg["intermediate_size"] = 700
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight has shape \((688, 256|256, 688)\), config\.json implies"):
        load_model(out)


def test_bin_checkpoint_refused_unless_converted_with_trust(tmp_path):
    """A pytorch_model.bin is refused everywhere (pointing to convert --trust-pickle, never to weights_only=False);
    convert --trust-pickle reads it, zip or legacy format, through the weights-only unpickler."""
    out = write_builtin(tmp_path / "m")
    from slimtune.io.safetensors import iter_tensors
    sd = dict(iter_tensors(out))
    (out / "model.safetensors").unlink()
    for legacy in (False, True):
        torch.save(sd, out / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError, match="--trust-pickle"):
            load_model(out)
        r = slimtune("generate", "--model", out, "--max-new-tokens", "2")
        assert_one_line_error(r, "pytorch_model.bin", "slimtune convert", "--trust-pickle")
        assert "weights_only" not in r.stderr
        conv = tmp_path / f"conv-{legacy}"
        r = slimtune("convert", out, conv, "--trust-pickle")
        assert r.returncode == 0, r.stderr
        back, _ = load_model(conv)
        assert torch.equal(back.lm_head.weight, sd["lm_head.weight"])
    save_file({"x": torch.ones(1)}, str(tmp_path / "unused.safetensors"))


def test_cli_json_outputs_one_object(tmp_path):
    r = slimtune("generate", "--json", "--max-new-tokens", "4", "--prompt", "ab", "--prompt", "c")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert len(obj["outputs"]) == 2 and obj["new_tokens"] <= 4
    r = slimtune("shapes", "--json")
    shapes = {s["name"]: s["params"] for s in json.loads(r.stdout)["shapes"]}
    assert shapes["llama3-8b"] == 8_030_261_248 and shapes["llama2-7b"] == 6_738_415_616
    r = slimtune("convert", "builtin", tmp_path / "c", "--dtype", "bf16", "--json")
    assert r.returncode == 0 and "model.safetensors" in json.loads(r.stdout)["files"]


def test_quantize_while_loading_equals_quantize_after(hf_folder):
    """load_model(quantize=nf4) quantizes each weight as it is read; same layers as quantizing the loaded model."""
    from slimtune.quant.linear import QuantLinear, quantize_model

    arch, folder, _ = hf_folder
    a, _ = load_model(folder, quantize="nf4")
    b, _ = load_model(folder)
    quantize_model(b, "nf4")
    assert isinstance(a.model.layers[1].mlp.down_proj, QuantLinear) and a.model.layers[1].mlp.down_proj.double_quant
    assert not any(t.is_meta for t in [*a.parameters(), *a.buffers()])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
