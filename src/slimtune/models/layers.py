"""The decoder's non-attention layers: RMSNorm (or LayerNorm for GPT shapes) and the MLP (SwiGLU or plain). On CUDA
RMSNorm and SwiGLU run as fused kernels and gate / up as one fused projection (`slimtune.kernels`, whose files hold
the PyTorch reference of each, which runs elsewhere)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.kernels.rmsnorm import rms_norm
from slimtune.kernels.swiglu import swiglu
from slimtune.models.config import ModelConfig
from slimtune.models.projections import project

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), the statistic in fp32, the product in the input dtype (as transformers)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, cfg.rms_norm_eps) if cfg.norm_type == "rms" else nn.LayerNorm(dim, eps=cfg.rms_norm_eps)


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)); or, ungated (GPT), down(act(up(x)))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        if cfg.mlp_gated:
            self.gate_proj = nn.Linear(d, f, bias=b)
        self.up_proj = nn.Linear(d, f, bias=b)
        self.down_proj = nn.Linear(f, d, bias=b)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "gate_proj"):
            gate, up = project(x, [self.gate_proj, self.up_proj])  # (..., f) each
            h = swiglu(gate, up) if self.act is F.silu else self.act(gate) * up
        else:
            h = self.act(self.up_proj(x))
        return project(h, [self.down_proj])[0]
