"""The decoder's non-attention layers: RMSNorm (or LayerNorm for GPT shapes) and the MLP (SwiGLU or plain)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.models.config import ModelConfig

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), the statistic in fp32, the product in the input dtype (as transformers)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))
