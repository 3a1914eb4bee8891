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
from slimtune.models.fallback import is_transformers_model
from slimtune.precision.formats import dtype_name, parse_dtype
from slimtune.precision.guard import check_cast, check_finite, require_float

NOT_WRITTEN = "nothing was written; the weights are damaged (a diverged run or a bad merge)"
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
        _write_tokenizer(tmp, tokenizer, tokenizer_dir)

    return write_folder_atomically(Path(path), fill)


def _write_tokenizer(tmp: Path, tokenizer, tokenizer_dir: str | Path | None) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    elif tokenizer_dir is not None:
        copy_tokenizer_files(Path(tokenizer_dir), tmp)


def save_transformers_model(model: nn.Module, path: str | Path, dtype: torch.dtype | None = None,
                            max_shard_size: int = DEFAULT_SHARD, tokenizer=None,
                            tokenizer_dir: str | Path | None = None, force: bool = False) -> Path:
    """A transformers model (the fallback for architectures the decoder does not cover) through its own
    `save_pretrained` (safetensors, its config, tied weights once), written into a temporary folder and renamed;
    `dtype`: a cast copy of each tensor (precision-guarded unless force) is written, the model stays as it is."""
    sd = None
    if dtype is not None:
        sd = {}
        for k, t in model.state_dict().items():
            if t.is_floating_point() and t.dtype != dtype:
                if not force:
                    check_cast(k, t, dtype)
                t = t.to(dtype)
            sd[k] = t

    def fill(tmp: Path) -> None:
        before = model.config.dtype
        model.config.dtype = dtype or before
        try:
            model.save_pretrained(str(tmp), state_dict=sd, max_shard_size=max_shard_size)
        finally:
            model.config.dtype = before
        _write_tokenizer(tmp, tokenizer, tokenizer_dir)

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
        PrecisionError: a tensor holding NaN or inf, a non-float dtype, a tensor `dtype` cannot hold (unless force);
            all checked before anything is written.
    """
    dtype = parse_dtype(dtype)
    if dtype is not None:
        require_float(dtype, "--dtype")
    if is_transformers_model(model):  # the fallback: transformers writes its own folder
        return save_transformers_model(model, path, dtype, max_shard_size, tokenizer, tokenizer_dir, force)
    sd = _cpu_state(model) if state is None else dict(state)
    for k, t in sd.items():
        check_finite(k, t, fix=NOT_WRITTEN)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            if not force:
                check_cast(k, t, dtype)
            sd[k] = t.to(dtype)
    out_dtype = dtype or next(iter(sd.values())).dtype
    hf = model.config.replace(dtype=dtype_name(out_dtype)).to_hf()
    return write_model_folder(path, hf, sd, max_shard_size, tokenizer, tokenizer_dir)


def save_quantized(model: nn.Module, out: str | Path, qcfg: dict[str, Any], tokenizer=None,
                   tokenizer_dir: str | Path | None = None) -> Path:
    """Write a quantized `Decoder` as a folder: config.json with a `quantization_config`, each QuantLinear's
    buffers (4-bit and int8 layers in bitsandbytes' key layout), the other tensors as they are, the tokenizer;
    atomically. The config is bitsandbytes' (`quant.bnb_config`, what transformers loads) where every quantized
    layer is one bitsandbytes kind (nf4, fp4, int8), else slimtune's `qcfg`."""
    from slimtune.quant.bnb_config import bnb_config

    hf = model.config.replace(dtype=dtype_name(model.model.embed_tokens.weight.dtype)).to_hf()
    hf["quantization_config"] = bnb_config(model) or qcfg
    sd = _cpu_state(model)
    for k, t in sd.items():
        check_finite(k, t, fix=NOT_WRITTEN)
    return write_model_folder(out, hf, sd, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir)
