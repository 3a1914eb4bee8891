"""Shared pieces of the per-channel and group-wise integer / fp8 codecs: shape checks and the row absmax."""
from __future__ import annotations

from torch import Tensor

from slimtune.errors import ConfigError


def check_2d(name: str, w: Tensor) -> None:
    """Raise a one-line ConfigError unless `w` is a 2-D floating-point linear weight."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ConfigError(f"tensor {name}: expected a 2-D floating-point linear weight, got {tuple(w.shape)} "
                          f"{w.dtype}")


def row_absmax(w: Tensor) -> Tensor:
    """max |W[r]| per output row, fp32 (out,)."""
    return w.detach().abs().amax(1).float()  # (out,)
