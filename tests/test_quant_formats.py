"""The format table: every figure derived from the bit layout, checked against torch.finfo and against decoding every
bit pattern through torch's own dtypes; `slimtune formats` prints it."""
import json
import math

import pytest
import torch

from slimtune.cli import main
from slimtune.errors import ConfigError
from slimtune.precision.formats import FORMATS, FP4_E2M1_VALUES, NF4_CODE, decode_float, format_values, get_format

TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn,
         "fp8_e5m2": torch.float8_e5m2}


@pytest.mark.parametrize("name", list(TORCH))
def test_against_finfo(name):
    f, fi = get_format(name), torch.finfo(TORCH[name])
    assert f.bits == fi.bits == f.sign + f.exponent + f.mantissa
    assert f.max == fi.max
    assert f.min_normal == fi.smallest_normal
    assert f.eps == fi.eps
    assert f.min_subnormal == fi.smallest_normal * fi.eps  # the smallest subnormal is one ulp of the smallest normal


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2"])
def test_decode_every_pattern_like_torch(name):
    f = get_format(name)
    n = int(f.bits)
    pats = torch.arange(2 ** n, dtype=torch.int64)
    raw = pats.to(torch.int16 if n == 16 else torch.uint8).view(TORCH[name]).float()
    mine = torch.tensor([decode_float(f, int(p)) for p in pats.tolist()], dtype=torch.float32)
    both_nan = torch.isnan(mine) & torch.isnan(raw)
    assert bool((both_nan | (mine == raw)).all())
    fin = mine[torch.isfinite(mine)]
    assert fin.max().item() == f.max
    assert fin[fin > 0].min().item() == f.min_subnormal


def test_e4m3fn_has_no_inf_e5m2_has():
    assert not any(math.isinf(decode_float(get_format("fp8_e4m3"), p)) for p in range(256))
    assert any(math.isinf(decode_float(get_format("fp8_e5m2"), p)) for p in range(256))
    assert len(format_values("fp8_e4m3")) == 253  # 256 patterns - 2 NaN - the duplicate zero


def test_fp4_e2m1_grid_is_ocp():
    assert FP4_E2M1_VALUES == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    f = get_format("fp4_e2m1")
    assert (f.max, f.min_normal, f.min_subnormal, f.eps) == (6.0, 1.0, 0.5, 0.5)


def test_integer_ternary_nf4_rows():
    assert get_format("int8").max == 127 and get_format("int4").max == 7
    assert get_format("int8").eps == pytest.approx(1 / 127)
    t = get_format("ternary")
    assert t.bits == pytest.approx(1.58496, abs=1e-5) and t.storage_bits == 2
    nf4 = get_format("nf4")
    assert nf4.max == 1.0 and nf4.min_normal == NF4_CODE[8] and len(format_values("nf4")) == 16


def test_decimal_digits():
    assert get_format("fp32").decimal_digits == pytest.approx(7.22, abs=0.01)
    assert get_format("fp16").decimal_digits == pytest.approx(3.31, abs=0.01)
    assert get_format("bf16").decimal_digits == pytest.approx(2.41, abs=0.01)


def test_unknown_format_one_line():
    with pytest.raises(ConfigError) as e:
        get_format("fp6")
    assert "\n" not in str(e.value) and "fp6" in str(e.value)


def test_cli_formats(capsys):
    assert main(["formats", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["formats"]
    assert [r["name"] for r in rows] == list(FORMATS)
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    assert "fp8_e4m3" in out and "448" in out and "1/4/3" in out
