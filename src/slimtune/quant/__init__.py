"""Quantization for slimtune: numeric formats, block-wise 4-bit (NF4/FP4, bitsandbytes layout), INT8/INT4/FP8 weights,
quantized linear layers, fake quantization for QAT and BitNet b1.58.

Entry points: `quantize_model(model, fmt)` (in place, layer by layer), `QuantLinear.from_weight(...)` (one layer, for
loaders), `quantize_4bit` / `dequantize_4bit` (tensors), `prepare_qat` / `convert_qat`, `prepare_bitnet` /
`export_bitnet`, `FORMATS` (the format table). Each module's docstring lists its API.
"""
from slimtune.quant.blockwise import Quant4bit, dequantize_4bit, quantize_4bit  # noqa: F401
from slimtune.quant.formats import FORMATS, get_format  # noqa: F401
from slimtune.quant.linear import (  # noqa: F401
    QUANT_FORMATS,
    QuantLinear,
    QuantReport,
    linear_names,
    prepare_quantized,
    quantize_model,
)
