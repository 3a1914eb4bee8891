"""The precision guards. `check_cast`: a cast into a narrower float format must not overflow to inf or flush a whole
tensor to zero (the Llama 2 bf16-read-as-fp16 failure), and a float weight is never cast to an integer type.
`check_finite`: a tensor read or about to be written holds no NaN or inf. `scan_weight`: a weight about to be
quantized must be finite, and extreme outliers are measured, naming the tensor.

A NaN or inf in a block would spread over its whole block (the absmax becomes NaN/inf), so it is an error. An extreme
outlier (max |w| many times the tensor's RMS) is legal but costs every other weight of its block or channel its
resolution, so it is reported by name.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from slimtune.errors import PrecisionError

OUTLIER_SIGMA = 64.0  # max|w| / rms(w) above this is reported (a Gaussian of 1e9 values reaches about 6)


def check_cast(name: str, t: Tensor, dtype: torch.dtype) -> None:
    """Refuse a cast of tensor `name` into `dtype` that would overflow to inf or flush the whole tensor to zero.

    Only casts into a narrower range are scanned (fp32/bf16 -> fp16, anything -> fp8); widening is always safe. A
    float tensor is never cast to a non-float dtype (that would round every weight to an integer).

    Raises:
        PrecisionError: naming the tensor, its max |value| and a dtype that would hold it.
    """
    if t.is_floating_point():
        require_float(dtype, f"tensor {name}")
    if not (t.is_floating_point() and dtype.is_floating_point) or t.numel() == 0:
        return
    src, dst = torch.finfo(t.dtype), torch.finfo(dtype)
    if dst.max >= src.max and dst.smallest_normal <= src.smallest_normal:
        return
    a = t.detach().abs()
    amax = a.max().float().item()
    if not math.isfinite(amax):
        raise PrecisionError(f"tensor {name} already holds NaN or inf; the checkpoint is damaged")
    if amax > dst.max:
        holder = "bfloat16" if amax <= torch.finfo(torch.bfloat16).max else "float32"
        raise PrecisionError(f"tensor {name}: max |value| {amax:.6g} overflows {str(dtype)[6:]} (max {dst.max:.6g}); "
                             f"load it as {holder} instead, or pass --force to cast anyway")
    tiny = dst.smallest_normal * dst.eps  # the smallest subnormal; below half of it a value rounds to 0
    if amax > 0 and amax < tiny / 2:
        raise PrecisionError(f"tensor {name}: every value (max |value| {amax:.3g}) would flush to zero in "
                             f"{str(dtype)[6:]}; load it as float32 instead, or pass --force")


def require_float(dtype: torch.dtype, what: str = "the weights") -> None:
    """Weights are cast only to float dtypes, whatever --force says.

    Raises:
        PrecisionError: `dtype` is an integer (or bool) type.
    """
    if not dtype.is_floating_point:
        raise PrecisionError(f"{what}: casting float weights to {str(dtype).removeprefix('torch.')} would round every "
                             "value to an integer; use float32, bfloat16 or float16")


DAMAGED = "the file is damaged; re-download or re-save it"


def check_finite(name: str, t: Tensor, where: str = "", fix: str = DAMAGED) -> None:
    """Refuse a float tensor holding NaN or inf (one max-|x| reduction, no temporary of t's size).

    Raises:
        PrecisionError: "<where>: tensor <name> holds NaN or inf (first at flat index i); <fix>".
    """
    if not t.is_floating_point() or t.numel() == 0:
        return
    x = t.detach().float() if t.element_size() == 1 else t.detach()  # fp8: no reductions of its own
    if math.isfinite(torch.linalg.vector_norm(x, float("inf")).item()):
        return
    first = int((~torch.isfinite(x.reshape(-1))).nonzero()[0, 0])
    raise PrecisionError(f"{where + ': ' if where else ''}tensor {name} holds NaN or inf (first at flat index "
                         f"{first}); {fix}")


def scan_weight(name: str, w: Tensor, fmt: str) -> float:
    """Check `w` before quantizing it to `fmt`; returns max|w| / rms(w) (0 for an all-zero tensor).

    Two reductions over `w` (max |w| and the fp32 sum of squares), neither allocating a tensor of w's size.

    Raises:
        PrecisionError: `w` holds NaN or inf (names the tensor and the first bad row).
    """
    if w.numel() == 0:
        return 0.0
    amax = torch.linalg.vector_norm(w.detach(), float("inf")).float().item()  # max|w|, no |w| temporary
    if not math.isfinite(amax):
        bad = (~torch.isfinite(w.detach())).reshape(w.shape[0], -1).any(-1).nonzero()[0, 0].item()
        raise PrecisionError(f"tensor {name} holds NaN or inf (first in row {bad}); quantizing it to {fmt} would "
                             "spread them over their blocks; the checkpoint is damaged, re-download or re-save it")
    rms = torch.linalg.vector_norm(w.detach(), dtype=torch.float32).item() / math.sqrt(w.numel())
    return amax / rms if rms > 0 else 0.0


def outlier_message(name: str, ratio: float, sigma: float = OUTLIER_SIGMA) -> str | None:
    """A one-line report when `ratio` (from `scan_weight`) exceeds `sigma`, else None."""
    if ratio <= sigma:
        return None
    return (f"tensor {name}: extreme outlier, max |w| = {ratio:.0f} x rms; block-wise formats keep it, but the "
            "rest of its block/channel loses resolution (consider skipping this layer)")
