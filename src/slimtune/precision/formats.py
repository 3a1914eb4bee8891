"""The numeric formats slimtune stores weights in, each derived from its bit layout (not typed in), and the one table of
dtype names (`DTYPES`: 'bf16' / 'bfloat16' / torch.bfloat16 ...).

Floats follow `value = (-1)^s * 2^(e - bias) * (1 + m / 2^M)` (normal) or `2^(1 - bias) * (m / 2^M)` (subnormal);
what the all-ones exponent means depends on the family: IEEE (inf/NaN), "fn" (finite, only all-ones is NaN: fp8
e4m3fn) or none (every pattern finite: fp4 e2m1). Integer and table formats are scaled so their largest code maps to
the block/channel absmax; their `eps` is the step below the largest value relative to it.

API: `FORMATS: dict[str, Format]`, `get_format(name) -> Format`, `decode_float(fmt, pattern) -> float`,
`format_values(name) -> list[float]` (every value of a format of 8 bits or fewer), `NF4_CODE`, `FP4_E2M1_VALUES`;
`DTYPES`, `parse_dtype(name)`, `dtype_name(dtype)`, `dtype_bytes(name)`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from slimtune.errors import CheckpointError, ConfigError

# ---- dtype names ----------------------------------------------------------------------------------------------------
# every name a user or a config.json may give for a storage dtype; torch's own name (after "torch.") is among them
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
}
FLOAT_NAMES = ("fp32", "bf16", "fp16")  # the storage dtypes training and saving offer


def parse_dtype(d: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; None or 'auto' -> None (the checkpoint's own).

    Raises:
        CheckpointError: an unknown name.
    """
    if d is None or isinstance(d, torch.dtype):
        return d
    if d == "auto":
        return None
    key = str(d).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise CheckpointError(f"unknown dtype {d!r}; choose one of {', '.join(sorted(DTYPES))} or auto")
    return DTYPES[key]


def float_named(name: object) -> torch.dtype | None:
    """The storage dtype (fp32, bf16 or fp16) a name read from a file means, else None; the string is only looked up
    in `DTYPES`, never as an attribute of torch."""
    dt = DTYPES.get(str(name).lower().removeprefix("torch."))
    return dt if dt is not None and short_name(dt) in FLOAT_NAMES else None


def declared_float(name: object) -> torch.dtype:
    """The storage dtype a config.json's `dtype` / `torch_dtype` names (`float_named`), float32 for anything else."""
    return float_named(name) or torch.float32


def short_name(dtype: torch.dtype) -> str:
    """The short name of a dtype: torch.bfloat16 -> 'bf16' (the first name `DTYPES` gives it)."""
    return next(k for k, v in DTYPES.items() if v == dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of a dtype without the module: torch.bfloat16 -> 'bfloat16' (what config.json calls it)."""
    return str(dtype).removeprefix("torch.")


def dtype_bytes(name: str | torch.dtype, what: str = "dtype") -> int:
    """Bytes per element of a dtype name ('bf16', 'float32', ...) or a torch dtype.

    Raises:
        ConfigError: unknown name (naming `what`).
    """
    if isinstance(name, torch.dtype):
        return name.itemsize
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError(f"unknown {what} {name!r}; choose one of fp32, bf16, fp16, fp8, int8")
    return DTYPES[key].itemsize


# NF4 as bitsandbytes stores it (QLoRA, Dettmers et al. 2023, appendix E): index 0..15
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)


@dataclass(frozen=True)
class Format:
    """One row of the format table. Fields that do not apply (an exponent of an integer) are 0 or None."""

    name: str
    kind: str  # "float" | "int" | "table" | "ternary"
    bits: float  # information bits per value (ternary: log2 3)
    storage_bits: int  # bits one value takes when packed
    sign: int
    exponent: int
    mantissa: int
    bias: int | None
    max: float
    min_normal: float | None  # smallest positive normal (ints/tables: smallest positive value)
    min_subnormal: float | None
    eps: float  # floats: 2^-M (gap above 1.0); scaled codes: step below the max / max
    decimal_digits: float  # -log10(eps / 2): digits the unit roundoff preserves
    torch_dtype: str | None
    family: str | None = None  # floats: "ieee" | "fn" | "none" (what the all-ones exponent means)
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _float(name: str, e: int, m: int, family: str, torch_dtype: str | None, note: str = "") -> Format:
    """Derive a binary float's limits from its layout (1 sign bit, `e` exponent bits, `m` mantissa bits)."""
    bias = 2 ** (e - 1) - 1
    top = 2 ** e - 1  # all-ones exponent field
    if family == "ieee":  # all-ones exponent = inf / NaN
        emax, mmax = top - 1, 2 ** m - 1
    elif family == "fn":  # all-ones exponent is finite; only all-ones mantissa there is NaN
        emax, mmax = top, 2 ** m - 2
    elif family == "none":  # every pattern is a finite number
        emax, mmax = top, 2 ** m - 1
    else:
        raise ValueError(family)
    largest = 2.0 ** (emax - bias) * (1 + mmax / 2 ** m)
    eps = 2.0 ** -m
    return Format(name, "float", 1 + e + m, 1 + e + m, 1, e, m, bias, largest, 2.0 ** (1 - bias),
                  2.0 ** (1 - bias - m), eps, -math.log10(eps / 2), torch_dtype, family, note)


def _int(name: str, bits: int, note: str) -> Format:
    """A symmetric signed integer code used as -qmax..qmax with qmax = 2^(bits-1) - 1, times a scale."""
    qmax = 2 ** (bits - 1) - 1
    eps = 1 / qmax
    return Format(name, "int", bits, bits, 1, 0, bits - 1, None, float(qmax), 1.0, None, eps,
                  -math.log10(eps / 2), "int8" if bits == 8 else None, None, note)


def _nf4() -> Format:
    pos = [v for v in NF4_CODE if v > 0]
    eps = (NF4_CODE[-1] - NF4_CODE[-2]) / NF4_CODE[-1]
    return Format("nf4", "table", 4, 4, 1, 0, 0, None, max(NF4_CODE), min(pos), None, eps, -math.log10(eps / 2),
                  None, None, "16 normal quantiles (QLoRA), times the block absmax; exact zero, 7 negative, 8 positive")


def _ternary() -> Format:
    return Format("ternary", "ternary", math.log2(3), 2, 1, 0, 0, None, 1.0, 1.0, None, 1.0, -math.log10(0.5),
                  None, None, "BitNet b1.58: {-1, 0, +1} times the absmean; stored 2 bits (4 per byte)")


FORMATS: dict[str, Format] = {f.name: f for f in (
    _float("fp32", 8, 23, "ieee", "float32", "IEEE 754 binary32"),
    _float("fp16", 5, 10, "ieee", "float16", "IEEE 754 binary16"),
    _float("bf16", 8, 7, "ieee", "bfloat16", "fp32 range, 8-bit significand"),
    _float("fp8_e4m3", 4, 3, "fn", "float8_e4m3fn", "fn variant: no inf, S.1111.111 is NaN"),
    _float("fp8_e5m2", 5, 2, "ieee", "float8_e5m2", "IEEE-like: inf and NaN"),
    _float("fp4_e2m1", 2, 1, "none", None, "OCP MX FP4: no inf/NaN (bitsandbytes 'fp4' is another table)"),
    _nf4(),
    _int("int8", 8, "symmetric -127..127 times a per-channel scale"),
    _int("int4", 4, "group-wise asymmetric 0..15 with a zero point (symmetric view: -7..7)"),
    _ternary(),
)}


def get_format(name: str) -> Format:
    """The `Format` named `name`.

    Raises:
        ConfigError: an unknown name (the message lists the known ones).
    """
    if name not in FORMATS:
        raise ConfigError(f"unknown numeric format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def decode_float(fmt: Format, pattern: int) -> float:
    """The value of the bit pattern `pattern` (sign | exponent | mantissa, most significant first) in float `fmt`."""
    e_bits, m_bits = fmt.exponent, fmt.mantissa
    s = (pattern >> (e_bits + m_bits)) & 1
    e = (pattern >> m_bits) & (2 ** e_bits - 1)
    m = pattern & (2 ** m_bits - 1)
    sign = -1.0 if s else 1.0
    top = 2 ** e_bits - 1
    if e == top and fmt.family == "ieee":
        return sign * math.inf if m == 0 else math.nan
    if e == top and m == 2 ** m_bits - 1 and fmt.family == "fn":
        return math.nan
    if e == 0:
        return sign * 2.0 ** (1 - fmt.bias) * (m / 2 ** m_bits)
    return sign * 2.0 ** (e - fmt.bias) * (1 + m / 2 ** m_bits)


def format_values(name: str) -> list[float]:
    """Every distinct finite value of format `name` (8 bits or fewer), sorted; +0 and -0 count once."""
    fmt = get_format(name)
    if fmt.kind == "float":
        if fmt.bits > 8:
            raise ConfigError(f"format {name} has {fmt.bits} bits; only formats of 8 bits or fewer are enumerated")
        vals = {decode_float(fmt, p) for p in range(2 ** int(fmt.bits))}
        return sorted(v for v in vals if math.isfinite(v))
    if fmt.kind == "table":
        return sorted(NF4_CODE)
    if fmt.kind == "ternary":
        return [-1.0, 0.0, 1.0]
    q = int(fmt.max)
    return [float(v) for v in range(-q, q + 1)]


FP4_E2M1_VALUES = tuple(v for v in format_values("fp4_e2m1") if v >= 0)  # 0, 0.5, 1, 1.5, 2, 3, 4, 6
