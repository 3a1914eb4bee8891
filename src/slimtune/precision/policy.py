"""Precision policies: which dtype each kind of weight is stored in, which dtype the matmuls run in, and loss scaling.

fp32: everything fp32. bf16-mixed: bf16 autocast, fp32 trainable (master) weights and optimizer state. fp16-mixed:
fp16 autocast plus dynamic loss scaling (torch.amp.GradScaler: a step whose gradients hold inf/NaN is skipped and the
scale halves; after `growth_interval` good steps it doubles). bf16-true: weights stored in bf16, optimizer state fp32.
Under every 16-bit policy the frozen base of an adapter method is 16-bit and the adapter's weights stay fp32.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from slimtune.errors import PrecisionError
from slimtune.precision.formats import DTYPES, FLOAT_NAMES
from slimtune.precision.guard import check_cast

# policy -> (compute dtype (None: fp32), reached through autocast, dynamic loss scaling)
POLICIES: dict[str, tuple[torch.dtype | None, bool, bool]] = {
    "fp32": (None, False, False),
    "bf16-mixed": (torch.bfloat16, True, False),
    "fp16-mixed": (torch.float16, True, True),
    "bf16-true": (torch.bfloat16, False, False),
}
PRECISIONS = ("auto", *POLICIES)  # what a config may say
BASE_DTYPES = ("auto", *FLOAT_NAMES)  # storage of the frozen weights


@dataclass(frozen=True)
class Precision:
    """A resolved policy.

    name: the policy. compute_dtype: the dtype the matmuls run in (None: fp32). autocast: reach it through
    torch.autocast (the mixed policies) rather than through the stored weights (bf16-true). weight_dtype: storage
    of trainable weights (bf16 only for full fine-tuning under bf16-true; adapters and other trainable parts of a
    frozen model are always fp32). frozen_dtype: storage of frozen weights. loss_scaling: use a GradScaler.
    """

    name: str
    compute_dtype: torch.dtype | None
    autocast: bool
    weight_dtype: torch.dtype
    frozen_dtype: torch.dtype
    loss_scaling: bool

    def context(self, device_type: str, cache: bool = True) -> contextlib.AbstractContextManager:
        """The autocast context of the forward pass (a null context for fp32 and bf16-true); `cache=False` while a
        CUDA graph is captured (autocast's cache of cast weights would outlive the capture)."""
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.compute_dtype, cache_enabled=cache)

    def make_scaler(self, device_type: str) -> "torch.amp.GradScaler | None":
        """A dynamic loss scaler for fp16-mixed (initial scale 2^16, x0.5 on overflow, x2 after 2000 good steps)."""
        return torch.amp.GradScaler(device_type) if self.loss_scaling else None

    def describe(self) -> str:
        n = lambda d: str(d)[6:] if d is not None else "float32"  # noqa: E731
        how = " (autocast)" if self.autocast else ""
        s = (f"precision {self.name}: matmuls in {n(self.compute_dtype)}{how}, frozen weights {n(self.frozen_dtype)},"
             f" trainable weights {n(self.weight_dtype)}, optimizer state float32")
        return s + (", dynamic loss scaling" if self.loss_scaling else "")


def bf16_supported(device: torch.device | str) -> bool:
    """True on the CPU and on GPUs with native bf16 (compute capability >= 8.0)."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    return torch.cuda.is_bf16_supported(including_emulation=False)


def make_policy(name: str, base_dtype: str = "auto", full: bool = False) -> Precision:
    """The policy `name` (a key of POLICIES) without looking at any device (the memory estimator uses this too).

    Args:
        base_dtype: storage of frozen weights: auto (the compute dtype) or fp32 / bf16 / fp16.
        full: full fine-tuning (every weight trainable, none frozen): bf16-true then stores weights in bf16.
    Raises:
        PrecisionError: an unknown name.
    """
    if name not in POLICIES:
        raise PrecisionError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    compute, autocast, scaling = POLICIES[name]
    weight = torch.bfloat16 if name == "bf16-true" and full else torch.float32
    frozen = DTYPES[base_dtype] if base_dtype != "auto" else (compute or torch.float32)
    return Precision(name, compute, autocast, weight, frozen, scaling)


def resolve_precision(name: str, device: torch.device | str, base_dtype: str = "auto",
                      full: bool = False) -> Precision:
    """The policy `name` for a run on `device`.

    Args:
        name: auto, fp32, bf16-mixed, fp16-mixed or bf16-true. auto: bf16-mixed on a GPU with bf16, fp16-mixed on
            an older GPU, fp32 on the CPU.
        base_dtype, full: as `make_policy`.
    Raises:
        PrecisionError: a bf16 policy on a GPU without bf16 (suggesting fp16-mixed), or an unknown name.
    """
    device = torch.device(device)
    if name == "auto":
        name = "fp32" if device.type != "cuda" else ("bf16-mixed" if bf16_supported(device) else "fp16-mixed")
    if name.startswith("bf16") and not bf16_supported(device):
        gpu = torch.cuda.get_device_name(device)
        raise PrecisionError(f"precision={name}: this GPU ({gpu}) has no native bf16; fix: use precision=fp16-mixed "
                             "(or fp32)")
    return make_policy(name, base_dtype, full)


def apply_precision(model: nn.Module, prec: Precision) -> None:
    """Cast the model's parameters in place to the policy's storage dtypes: trainable ones to `weight_dtype`, frozen
    ones to `frozen_dtype` (precision-guarded: a value fp16 cannot hold is refused). Tied parameters are cast once;
    buffers and integer parameters are left alone.

    Raises:
        PrecisionError: a frozen weight that overflows the narrower dtype.
    """
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.is_floating_point():
            continue
        seen.add(id(p))
        dtype = prec.weight_dtype if p.requires_grad else prec.frozen_dtype
        if p.dtype != dtype:
            check_cast(name, p.data, dtype)
            p.data = p.data.to(dtype)
