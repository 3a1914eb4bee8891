"""The weight formats of `QuantLinear`, one codec module per format family: 4-bit block-wise NF4 / FP4
(`fourbit`), per-channel int8 and W8A8 (`int8`), group-wise int4 / int3 / int2 (`intk`), fp8 e4m3 (`fp8`) and BitNet
ternary (`ternary`). `CODECS` is the one list of formats; `get_codec(name)` looks one up."""
from __future__ import annotations

from slimtune.errors import ConfigError
from slimtune.quant.codecs.base import Codec
from slimtune.quant.codecs.bnb import FourBitCodec
from slimtune.quant.codecs.fp8 import Fp8Codec
from slimtune.quant.codecs.int8 import Int8Codec, W8A8Codec
from slimtune.quant.codecs.intk import IntKCodec
from slimtune.quant.codecs.ternary import TernaryCodec

CODECS: dict[str, Codec] = {c.name: c for c in (
    FourBitCodec("nf4"), FourBitCodec("fp4"), Int8Codec(), IntKCodec(4), IntKCodec(3), IntKCodec(2), Fp8Codec(),
    W8A8Codec(), TernaryCodec())}
QUANT_FORMATS = tuple(CODECS)
GROUPED = tuple(n for n, c in CODECS.items() if c.default_group)  # formats with a block / group size


def get_codec(fmt: str) -> Codec:
    """The codec of format `fmt`.

    Raises:
        ConfigError: unknown format (listing the known ones).
    """
    if fmt not in CODECS:
        raise ConfigError(f"unknown quantization format {fmt!r}; choose one of {', '.join(QUANT_FORMATS)}")
    return CODECS[fmt]
