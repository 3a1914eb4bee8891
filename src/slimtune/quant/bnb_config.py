"""Quantized folders in the transformers + bitsandbytes dialect: the `quantization_config` that transformers'
`BitsAndBytesConfig` writes (nf4 / fp4 4-bit, int8), and the layer map read back from such a folder's tensors.

The tensors need no translation: the 4-bit codec stores bitsandbytes' `Linear4bit` keys (`weight`, `weight.absmax`,
`weight.quant_map`, `weight.nested_*`, `weight.quant_state.bitsandbytes__<fmt>`) and the int8 codec its
`Linear8bitLt` keys (`weight` int8, `SCB`; bitsandbytes adds `weight_format`, 0 = row-major). A model whose quantized
layers are all one of these formats is saved in this dialect (so `AutoModelForCausalLM.from_pretrained` loads it);
every other format, and mixed budgets, keep slimtune's own (`quant.ptq.quant_config`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from slimtune.errors import CheckpointError
from slimtune.precision.formats import dtype_name

BNB_METHOD = "bitsandbytes"
BNB_FORMATS = ("nf4", "fp4", "int8")
# the block sizes bitsandbytes' quantize_4bit takes (bitsandbytes/functional.py: 4096 ... 64; 32 only on some
# backends), so a folder with one of them loads in bitsandbytes everywhere
BNB_BLOCKS = (64, 128, 256, 512, 1024, 2048, 4096)
ROW_FORMAT = 0  # bitsandbytes' `weight_format` code of a row-major int8 weight (the only one since 0.45)


def bnb_config(model: nn.Module) -> dict[str, Any] | None:
    """transformers' `BitsAndBytesConfig.to_dict()` fields for `model`, or None when its quantized layers are not
    all of one bitsandbytes kind (nf4 or fp4 with one block size of `BNB_BLOCKS` and one double-quant setting, or
    int8). The linear layers left unquantized are listed in `llm_int8_skip_modules` by full path."""
    from slimtune.quant.linear import QuantLinear, linear_names

    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    kinds = {(m.fmt, m.group_size if m.fmt != "int8" else None, m.double_quant) for m in quant}
    if len(kinds) != 1:
        return None
    ((fmt, block, nested),) = kinds
    if fmt not in BNB_FORMATS or (fmt != "int8" and block not in BNB_BLOCKS):
        return None
    four = fmt != "int8"
    return {"quant_method": BNB_METHOD, "load_in_4bit": four, "load_in_8bit": not four, "_load_in_4bit": four,
            "_load_in_8bit": not four, "bnb_4bit_quant_type": fmt if four else "fp4",
            "bnb_4bit_use_double_quant": nested, "bnb_4bit_compute_dtype": dtype_name(quant[0].compute_dtype),
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": linear_names(model, ()),
            "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def bnb_layers(folder: Path, qc: dict[str, Any]) -> dict[str, tuple[str, int | None, bool]]:
    """name -> (format, block size or None, double quant) of every quantized linear of a bitsandbytes folder, read
    from its tensors: a 4-bit layer's quant-state JSON, an int8 layer's `SCB` (only headers and those few bytes are
    read).

    Raises:
        CheckpointError: an 8-bit folder saved with fp16 weights, a non-row-major int8 layout (bitsandbytes < 0.45
            on a GPU), a damaged quant state, no quantized tensor at all.
    """
    from slimtune.io.safetensors import read_tensor, tensor_index
    from slimtune.quant.codecs.bnb import quant_state_meta

    where = folder / "config.json"
    if qc.get("load_in_8bit") and qc.get("llm_int8_has_fp16_weight"):
        raise CheckpointError(f"{where}: an 8-bit bitsandbytes folder with llm_int8_has_fp16_weight=true holds 16-bit "
                              "weights; load it with transformers, or save it again without that option")
    out: dict[str, tuple[str, int | None, bool]] = {}
    for key, loc in tensor_index(folder).items():
        if ".weight.quant_state.bitsandbytes__" in key:
            meta = quant_state_meta(read_tensor(loc), key)
            out[key.split(".weight.quant_state.", 1)[0]] = (meta["quant_type"], int(meta["blocksize"]),
                                                           "nested_offset" in meta)
        elif key.endswith(".SCB"):
            out[key[: -len(".SCB")]] = ("int8", None, False)
        elif key.endswith(".weight_format") and int(read_tensor(loc).reshape(-1)[0]) != ROW_FORMAT:
            raise CheckpointError(f"{folder}: {key} is not the row-major int8 layout (a folder saved by bitsandbytes "
                                  "< 0.45 on a GPU); load and save it again with bitsandbytes >= 0.45")
    if not out:
        raise CheckpointError(f"{where}: quant_method is bitsandbytes but no tensor is quantized (no "
                              "weight.quant_state.* or SCB entries); the folder is incomplete")
    return out
