"""Save a `Decoder` (16-bit, or quantized by `slimtune quantize`) as a Hugging Face folder with its tokenizer files,
written atomically (`slimtune.io.folders`): config.json, safetensors (sharded above a size), tokenizer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.io.folders import write_folder_atomically
from slimtune.io.safetensors import DEFAULT_SHARD, save_state_dict
from slimtune.precision.formats import dtype_name, parse_dtype
from slimtune.precision.guard import check_cast

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer files present in folder `src` into `dst`."""
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def write_model_folder(path: str | Path, hf: dict[str, Any], sd: dict[str, Tensor],
                       max_shard_size: int = DEFAULT_SHARD, tokenizer=None,
                       tokenizer_dir: str | Path | None = None) -> Path:
    """Write config.json (`hf`), the tensors `sd` and the tokenizer (an object, or the files of a folder) into
    `path`, atomically."""
    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        save_state_dict(sd, tmp, max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        elif tokenizer_dir is not None:
            copy_tokenizer_files(Path(tokenizer_dir), tmp)

    return write_folder_atomically(Path(path), fill)


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict on the CPU, contiguous; a tied lm_head is left out (transformers re-ties it)."""
    tied = model.config.tie_word_embeddings
    return {k: t.detach().to("cpu").contiguous() for k, t in model.state_dict().items()
            if not (tied and k == "lm_head.weight")}


def save_model(model, path: str | Path, dtype: str | torch.dtype | None = None,
               max_shard_size: int = DEFAULT_SHARD, tokenizer=None, tokenizer_dir: str | Path | None = None,
               force: bool = False, state: dict[str, Tensor] | None = None) -> Path:
    """Save a `Decoder` as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads.

    Args:
        model: the decoder (its `config` supplies config.json).
        path: output folder; written atomically (a failed save leaves the old folder as it was).
        dtype: cast the weights (precision-guarded) and declare it as torch_dtype; default: as they are.
        max_shard_size: bytes per safetensors shard; above it, shards plus model.safetensors.index.json.
        tokenizer: a transformers tokenizer to save beside, or tokenizer_dir: a folder whose tokenizer files to copy.
        force: cast even where the precision guard refuses.
        state: the weights already gathered on the CPU (a model sharded over several processes), instead of the
            model's own.
    Raises:
        PrecisionError: a tensor `dtype` cannot hold (unless force).
    """
    dtype = parse_dtype(dtype)
    sd = _cpu_state(model) if state is None else dict(state)
    for k, t in sd.items():
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            if not force:
                check_cast(k, t, dtype)
            sd[k] = t.to(dtype)
    out_dtype = dtype or next(iter(sd.values())).dtype
    hf = model.config.replace(dtype=dtype_name(out_dtype)).to_hf()
    return write_model_folder(path, hf, sd, max_shard_size, tokenizer, tokenizer_dir)


def save_quantized(model: nn.Module, out: str | Path, qcfg: dict[str, Any], tokenizer=None,
                   tokenizer_dir: str | Path | None = None) -> Path:
    """Write a quantized `Decoder` as a folder: config.json with `quantization_config` = `qcfg`, each QuantLinear's
    buffers (4-bit layers in bitsandbytes' key layout), the other tensors as they are, the tokenizer; atomically."""
    hf = model.config.replace(dtype=dtype_name(model.model.embed_tokens.weight.dtype)).to_hf()
    hf["quantization_config"] = qcfg
    return write_model_folder(out, hf, _cpu_state(model), tokenizer=tokenizer, tokenizer_dir=tokenizer_dir)
