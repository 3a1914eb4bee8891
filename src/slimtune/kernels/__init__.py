"""Fused GPU kernels for training (issues 11, 12): each in its own file beside a plain PyTorch reference of the same
math, which runs wherever the kernel cannot (CPU, no Triton, `SLIMTUNE_KERNELS=off`).

- `nf4.py`: packed 4-bit codes + (double-quantized) absmax -> a bf16/fp16/fp32 weight in one pass.
- `lora.py`: y = x W^T + b + sum_i s_i (x A_i^T) B_i^T for one or several projections sharing x (q,k,v; gate,up),
  the base weight re-dequantized in backward, adapters in the compute dtype, a hand-written backward.
- `rmsnorm.py`, `rope.py`, `swiglu.py`: the decoder's RMSNorm, rotate-half RoPE on q and k, silu(gate) * up.
- `cross_entropy.py`: chunked LM head + cross-entropy that never builds the (B, T, V) logits.

Dispatch (`enabled`): Triton runs on CUDA tensors; on CPU tensors only when asked for (kernels=True or
SLIMTUNE_KERNELS=on) under Triton's interpreter (TRITON_INTERPRET=1, the tests); the reference everywhere else.
Triton is imported only when a kernel is first launched (`jit` below), so machines without it lose nothing.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from functools import cache
from typing import Any, Callable

import torch

ENV = "SLIMTUNE_KERNELS"  # "off" / "0" / "false" switches every kernel off
_OFF = ("off", "0", "false", "no")
_ON = ("on", "1", "true", "yes")
MODES = ("auto", "off", "on")
_ENV_MODE = os.environ.get(ENV, "auto").lower()  # read once: the lookup is on every layer's path
_mode: str | None = None  # set by `use` (the run's `kernels` key); None: the environment variable decides


@contextlib.contextmanager
def use(mode: str | bool | None) -> Iterator[None]:
    """Within the block, `enabled` follows `mode` ("auto", "off", "on"; None: the environment) by default."""
    global _mode
    before, _mode = _mode, None if mode is None else ("on" if mode is True else "off" if mode is False else mode)
    try:
        yield
    finally:
        _mode = before


@cache
def triton_available() -> bool:
    """True when the `triton` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def enabled(device: torch.device | str, setting: bool | str | None = None) -> bool:
    """Whether the Triton kernels run for tensors on `device`.

    Args:
        device: where the tensors live.
        setting: False / "off": the reference; None (default): the mode of the enclosing `use` block, else the
            environment variable SLIMTUNE_KERNELS ("auto" when unset); "auto": Triton on CUDA; True / "on": Triton on CUDA, and on the CPU when TRITON_INTERPRET=1 (tests).
    Returns:
        True when the Triton kernel should run.
    """
    mode = (_mode or _ENV_MODE) if setting is None else setting
    mode = "on" if mode is True else "off" if mode is False else str(mode).lower()
    if mode in _OFF or not triton_available():
        return False
    if torch.device(device).type == "cuda":
        return True
    return mode in _ON and interpreting()


def fused(device: torch.device | str) -> bool:
    """Whether the pure-PyTorch fusions (the fused LoRA projections: fewer, larger ops and a hand-written backward)
    run for tensors on `device`: on CUDA unless kernels are off, anywhere when they are forced on."""
    mode = _mode or _ENV_MODE
    if mode in _OFF:
        return False
    return mode in _ON or torch.device(device).type == "cuda"


class LazyKernel:
    """A Triton kernel compiled on first use: `triton.jit` (or the interpreter) is applied then, to this function and
    to every other `LazyKernel` of its module (kernels call helpers by their global name)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.jitted: Any = None

    def build(self) -> Any:
        if self.jitted is None:
            import triton
            import triton.language as tl

            scope = self.fn.__globals__
            for name, obj in list(scope.items()):
                if isinstance(obj, LazyKernel):
                    if obj.fn.__globals__.get("tl") is None:  # kernel modules hold `tl = None` until now
                        obj.fn.__globals__["tl"] = tl
                    obj.jitted = obj.jitted or triton.jit(obj.fn)
                    scope[name] = obj.jitted
        return self.jitted

    def __getitem__(self, grid: Any) -> Any:
        return self.build()[grid]


def jit(fn: Callable[..., Any]) -> LazyKernel:
    """Decorator: a Triton kernel that is compiled (and Triton imported) only when first launched."""
    return LazyKernel(fn)


tl = None  # triton.language, bound when a kernel is first launched


@jit
def cast(x, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """x (fp32) rounded to `dtype` to nearest even. Triton's interpreter truncates fp32 -> bf16, so under it
    (EMULATE_RNE) bf16 is rounded by hand on the bits, as PyTorch does: add 0x7FFF plus the lowest kept bit."""
    if EMULATE_RNE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive integers (grid sizes)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (Triton block sizes must be powers of two)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: the interpreter's grid for row-looping kernels)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
