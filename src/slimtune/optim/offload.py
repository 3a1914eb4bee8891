"""`CPUOffloadAdamW`: AdamW whose fp32 master weights and moments live in CPU memory and whose update runs on the CPU.

Step: gradients are copied into pinned CPU buffers (non_blocking, one synchronisation), the CPU AdamW updates the fp32
masters (torch's fused CPU kernel where available), and the masters, cast to each parameter's dtype in pinned buffers,
are copied back (non_blocking). GPU memory keeps only the weights and their gradients.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from slimtune.errors import ConfigError


def param_groups(params) -> list[dict[str, Any]]:
    """Parameters or param-group dicts -> a list of groups (dicts with a 'params' list).

    Raises:
        ConfigError: no parameters at all.
    """
    params = list(params)
    if not params:
        raise ConfigError("the optimizer got no parameters; check which parameters are trainable")
    if isinstance(params[0], dict):
        return [dict(g, params=list(g["params"])) for g in params]
    return [{"params": params}]


class CPUOffloadAdamW:
    """AdamW with fp32 master weights and both moments on the CPU (ZeRO-Offload's split: Ren et al. 2021).

    `param_groups` are the CPU optimizer's groups (set 'lr' there, as with any optimizer); `params[i]` of a group is
    the CPU master of the i-th device parameter. Not for fp16 loss scaling (GradScaler needs a device optimizer).
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, fused: bool | None = None) -> None:
        groups = param_groups(params)
        self.device_params: list[Tensor] = [p for g in groups for p in g["params"]]
        pin = torch.cuda.is_available() and any(p.is_cuda for p in self.device_params)
        self.masters: list[Tensor] = []
        self._grad_buf: list[Tensor] = []  # pinned, in the gradient's dtype
        self._out_buf: list[Tensor] = []  # pinned, in the parameter's dtype (the cast master)
        cpu_groups = []
        for g in groups:
            ms = []
            for p in g["params"]:
                m = p.detach().to("cpu", torch.float32, copy=True)
                ms.append(m)
                self.masters.append(m)
                self._grad_buf.append(torch.empty(p.shape, dtype=p.dtype, pin_memory=pin))
                self._out_buf.append(torch.empty(p.shape, dtype=p.dtype, pin_memory=pin) if p.dtype != torch.float32
                                     else m)
            cpu_groups.append(dict(g, params=ms))
        if fused is None:  # torch's fused AdamW has a CPU kernel since 2.4
            fused = hasattr(torch._C._VariableFunctions, "_fused_adamw_")
        self.inner = torch.optim.AdamW(cpu_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                       fused=fused or None)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.device_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        have = [i for i, p in enumerate(self.device_params) if p.grad is not None]
        for i in have:  # device -> pinned host, queued on the current stream
            self._grad_buf[i].copy_(self.device_params[i].grad, non_blocking=True)
        if any(self.device_params[i].is_cuda for i in have):
            torch.cuda.current_stream().synchronize()
        for i, m in enumerate(self.masters):
            m.grad = self._grad_buf[i].float() if i in have else None
        self.inner.step()
        for i in have:  # master -> (cast, pinned) -> device
            m, p = self.masters[i], self.device_params[i]
            m.grad = None
            out = self._out_buf[i]
            if out is not m:
                out.copy_(m)
            p.copy_(out, non_blocking=True)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The CPU AdamW's state dict plus the fp32 masters (`masters`, in parameter order)."""
        sd = self.inner.state_dict()
        sd["masters"] = [m.clone() for m in self.masters]
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore moments, step counts and masters, and copy the masters into the device parameters."""
        sd = dict(sd)
        masters = sd.pop("masters", None)
        self.inner.load_state_dict(sd)
        if masters is not None:
            if len(masters) != len(self.masters):
                raise ConfigError(f"optimizer state holds {len(masters)} master weights, the model has "
                                  f"{len(self.masters)} trainable tensors; resume with the same method and targets")
            for m, src, p in zip(self.masters, masters, self.device_params):
                m.copy_(src)
                p.copy_(m.to(p.dtype))
