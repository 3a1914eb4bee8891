"""The precision guard for quantization: refuse NaN/inf and measure outliers, naming the tensor.

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
