"""`slimtune quickstart` in a shortened setting: trains, lowers the validation loss, and leaves the adapter (PEFT
format, loadable), metrics, loss plot, effective config and a sample answer; ends with the command for real data."""
from __future__ import annotations

import json

from slimtune.cli import main


def test_quickstart_leaves_everything(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--steps", "8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "TINY" in text and "validation loss:" in text and "before ->" in text
    assert "slimtune finetune configs/lora.yaml model=" in text.strip().splitlines()[-1]
    for f in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "loss.png",
              "sample_answer.txt", "config.yaml"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len([r for r in rows if "loss" in r]) == 8 and len(val) == 2 and val[1] < val[0]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16
    assert (out / "sample_answer.txt").read_text().startswith("prompt: Give three tips")

    # the adapter loads back onto the built-in model and changes its output
    import torch

    from slimtune.models.load import load_model
    from slimtune.peft import load_adapter

    base, _ = load_model("builtin")
    ids = torch.randint(8, 200, (1, 16))
    ref = base(ids)
    load_adapter(base, out / "adapter")
    assert not torch.allclose(base(ids), ref)
