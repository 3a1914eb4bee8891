"""Good inputs for the reliability tests (a tiny model folder, a LoRA adapter on it, a data file, a short finished run
with checkpoints) and the small tools that damage copies of them (rewrite a JSON file, a safetensors header)."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

CONTEXT = 96  # the tiny model's max_position_embeddings: a prompt longer than this is refused
RECORDS = [{"instruction": f"Say the word number {i}.", "output": f"Word {i} is {'abc' * (i % 5 + 1)}."}
           for i in range(24)]


def run_overrides(ws: Path, out: Path, **kw: Any) -> list[str]:
    """`finetune` key=value arguments of a tiny LoRA run on the workspace's model and data."""
    base = dict(model=ws / "model", data=ws / "data.jsonl", out_dir=out, method="lora", rank=2, targets="q_proj,v_proj",
                max_length=48, batch_size=4, max_steps=2, save_every=1, keep_last=3, lr=1e-3, progress="false",
                plot="false", save_final="false", seed=1)
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def build_workspace(ws: Path) -> Path:
    """ws/model (tiny llama, fp32, builtin byte tokenizer), ws/adapter (LoRA r=2 with random B), ws/data.jsonl,
    ws/run (a finished 2-step run with checkpoints step-1 and step-2)."""
    from slimtune.models.config import ModelConfig
    from slimtune.models.decoder import Decoder, init_weights
    from slimtune.models.save import save_model
    from slimtune.models.tiny import builtin_tokenizer
    from slimtune.peft import apply_method, save_adapter
    from slimtune.peft.lora import LoraConfig
    from slimtune.train import load_config, train

    ws.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=CONTEXT, bos_token_id=1, eos_token_id=[2, 6],
                      pad_token_id=0)
    model = init_weights(Decoder(cfg), 7)
    save_model(model, ws / "model", tokenizer=builtin_tokenizer())
    apply_method(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, ws / "adapter", base_model_name_or_path=str(ws / "model"))
    (ws / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    train(load_config(None, run_overrides(ws, ws / "run")), log=lambda m: None)
    return ws


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, change) -> None:
    """Replace the JSON in `path` by change(old) (a dict to update with, or a function old -> new)."""
    old = json.loads(path.read_text())
    new = change(old) if callable(change) else {**old, **change}
    path.write_text(json.dumps(new))


def read_st(path: Path) -> tuple[dict, bytes]:
    """(header, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header: Any, data: bytes, header_bytes: bytes | None = None) -> None:
    """A safetensors file with any header (even an invalid one) and data."""
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_header(path: Path, change) -> None:
    """Rewrite a safetensors file's header as change(header) (the data left as it is)."""
    header, data = read_st(path)
    write_st(path, change(header), data)


def first_weight(header: dict) -> str:
    """The name of the first 2-D tensor in a header."""
    return next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)


def poison(path: Path, name_part: str = "") -> str:
    """Write NaN into the first float tensor of a safetensors file whose name contains `name_part`; returns it."""
    header, data = read_st(path)
    name = next(k for k, v in header.items() if k != "__metadata__" and name_part in k and v["dtype"] == "F32")
    b, _ = header[name]["data_offsets"]
    data = data[:b] + struct.pack("<f", float("nan")) + data[b + 4:]
    write_st(path, header, data)
    return name
