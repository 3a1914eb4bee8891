"""Shared bits of the slimtune.kernels tests: where the Triton path runs (CUDA, else Triton's CPU interpreter, which
tests/conftest.py switches on) and a relative error."""
from __future__ import annotations

import pytest
import torch

from slimtune.kernels import enabled

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not enabled(DEV, True), reason="Triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
