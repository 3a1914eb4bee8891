"""The optimizer of a run: torch AdamW (fused on CUDA), AdamW with fp32 state for bf16 weights, 8-bit AdamW (torchao or
bitsandbytes), SGD with momentum, CPU-offloaded AdamW, or GaLore (its state in a low-rank projection of the
gradients; 8-bit with galore8bit). `OPTIMIZERS` is the one list of their names."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from slimtune.errors import ConfigError
from slimtune.optim.adamw import AdamWFp32State
from slimtune.optim.galore import GaLoreAdamW
from slimtune.optim.offload import CPUOffloadAdamW, param_groups

OPTIMIZERS = ("adamw", "adamw8bit", "sgd", "galore", "galore8bit")
SGD_MOMENTUM = 0.9


def _adamw8bit(groups, lr: float, betas, eps: float, weight_decay: float):
    """torchao's AdamW8bit (blocks of 256, dynamic-tree quantized states), else bitsandbytes' AdamW8bit."""
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        try:
            from bitsandbytes.optim import AdamW8bit
        except ImportError:
            raise ConfigError("optimizer adamw8bit needs torchao or bitsandbytes; fix: pip install torchao "
                              "(or pip install bitsandbytes on CUDA), or use optimizer adamw") from None
    return AdamW8bit(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def make_optimizer(params: Iterable, name: str = "adamw", lr: float = 1e-4, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), fused: bool | None = None, offload: bool = False,
                   eps: float = 1e-8, momentum: float = SGD_MOMENTUM, stochastic_rounding: bool = False):
    """An optimizer over `params` (tensors or param groups; a group's own 'weight_decay' wins).

    Args:
        name: adamw | adamw8bit | sgd | galore | galore8bit (GaLore projects the groups that carry `rank`, see
            `optim.galore.galore_groups`). fused: torch AdamW's fused kernel (default: on when every parameter is on
            CUDA). offload: keep fp32 masters and states on the CPU and update there (adamw only).
        momentum: SGD's momentum. stochastic_rounding: bf16 weights take their update rounded stochastically
            (AdamW with fp32 state, GaLore).
    Returns:
        a torch.optim.Optimizer, or a CPUOffloadAdamW (same step / zero_grad / param_groups / state_dict API). For
        adamw over parameters that are not all fp32 (bf16-true): `AdamWFp32State`.
    Raises:
        ConfigError: unknown name, offload with another optimizer than adamw, adamw8bit without torchao or
            bitsandbytes installed.
    """
    groups = param_groups(params)
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if offload:
        if name != "adamw":
            raise ConfigError(f"offload_optimizer works with optimizer adamw, not {name}; fix: optimizer=adamw")
        return CPUOffloadAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw8bit":
        return _adamw8bit(groups, lr, betas, eps, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name.startswith("galore"):
        return GaLoreAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                           eight_bit=name == "galore8bit", stochastic_rounding=stochastic_rounding)
    ps = [p for g in groups for p in g["params"]]
    if any(p.dtype != torch.float32 for p in ps):
        return AdamWFp32State(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                              stochastic_rounding=stochastic_rounding)
    if fused is None:
        fused = all(p.is_cuda for p in ps)
    # capturable: its step count lives on the device, so that a training step can be replayed as a CUDA graph
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None,
                             capturable=bool(fused))


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters in two groups: matrices with `weight_decay`, vectors (norms, biases) without.

    Raises:
        ConfigError: nothing is trainable.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the method left no trainable parameter; check targets / method options")
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
