"""Quantization: the weight formats (`codecs`: NF4 / FP4 in bitsandbytes' layout, int8, int4 / int3 / int2, fp8, W8A8,
ternary), the quantized linear layer that dispatches to them (`linear`), post-training quantization of checkpoints
(`ptq`) with mixed-bit budgets (`mixed`), fake quantization for QAT (`fake`), BitNet b1.58 (`bitnet`) and the QLoRA
merge (`qlora`). Each module's docstring lists its API.
"""
from slimtune.quant.codecs import CODECS, QUANT_FORMATS, get_codec  # noqa: F401
from slimtune.quant.codecs.fourbit import Quant4bit, dequantize_4bit, quantize_4bit  # noqa: F401
from slimtune.quant.linear import (  # noqa: F401
    QuantLinear,
    QuantReport,
    linear_names,
    prepare_quantized,
    quantize_model,
)
