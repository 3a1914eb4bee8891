"""The decoder's non-attention layers: RMSNorm (Gemma's (1 + w) form too; LayerNorm for GPT shapes), the token
embedding (scaled by sqrt(d) for Gemma) and the MLP (SwiGLU / GeGLU, Phi-3's fused gate_up_proj, or plain). On CUDA
RMSNorm and SwiGLU run as fused kernels and gate / up as one fused projection (`slimtune.kernels`, whose files hold
the PyTorch reference of each, which runs elsewhere); Gemma's offset norm and GeGLU run in PyTorch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.kernels.rmsnorm import rms_norm
from slimtune.kernels.swiglu import swiglu
from slimtune.models.config import ModelConfig
from slimtune.models.projections import project
from slimtune.models.recompute import capturing

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), the statistic in fp32, the product in the input dtype (as transformers).

    offset (Gemma): y = (x / rms(x)) * (1 + w) with the product in fp32 too, then cast (transformers' Gemma2RMSNorm:
    "Llama does x.to(float16) * w whilst Gemma2 is (x * w).to(float16)"); w starts at 0 there.
    """

    def __init__(self, dim: int, eps: float, offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: Tensor) -> Tensor:
        if not self.offset:
            return rms_norm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """The config's norm over `dim` features: RMSNorm (with Gemma's offset if set) or LayerNorm (GPT shapes)."""
    if cfg.norm_type == "rms":
        return RMSNorm(dim, cfg.rms_norm_eps, cfg.norm_offset)
    return nn.LayerNorm(dim, eps=cfg.rms_norm_eps)


class ScaledEmbedding(nn.Embedding):
    """Gemma's token embedding: E[ids] * sqrt(d), the factor rounded to the weights' dtype first (in bf16
    sqrt(3072) = 55.4256 becomes 55.5, as transformers' Gemma2TextScaledWordEmbedding). `inputs_embeds` given to the
    decoder skip it, as in transformers."""

    def forward(self, ids: Tensor) -> Tensor:
        scale = float(torch.tensor(self.embedding_dim ** 0.5).to(self.weight.dtype))  # fp32, then the dtype's
        return super().forward(ids) * scale


class MLP(nn.Module):
    """Gated: down(act(gate(x)) * up(x)) (SwiGLU with silu, GeGLU with gelu_pytorch_tanh); `fused_proj` (Phi-3): one
    gate_up_proj whose output's first half is the gate, second half the up projection; ungated (GPT): down(act(up(x))).

    `tile` (tokens; the decoder sets it under grad_ckpt): in training, a sequence longer than `tile` runs in pieces of
    `tile` tokens, each under a non-reentrant checkpoint when grad is on, so that backward holds one piece's
    (B, tile, f) intermediates instead of the sequence's (B, T, f); the MLP acts on each token alone, so the pieces'
    outputs concatenated are the MLP's output. Cost: one more MLP forward per piece in backward.
    """

    tile: int | None = None
    base_last: bool = False  # the down projection's frozen base product after its adapters (`kernels.lora`)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        if cfg.fused_proj:
            self.gate_up_proj = nn.Linear(d, 2 * f, bias=b)
        else:
            if cfg.mlp_gated:
                self.gate_proj = nn.Linear(d, f, bias=b)
            self.up_proj = nn.Linear(d, f, bias=b)
        self.down_proj = nn.Linear(f, d, bias=b)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        if self.tile is not None and self.training and x.shape[-2] > self.tile:
            return self._tiled(x, self.tile)
        return self._mlp(x)

    def _tiled(self, x: Tensor, tile: int) -> Tensor:
        """x (B, T, d) -> (B, T, d) in pieces x[:, i:i+tile]. With grad on, each piece is a checkpoint that keeps only
        its input (a view of x) and recomputes its (B, tile, f) gate, up and product in backward, where the pieces'
        backwards run one after the other (each piece's autograd nodes come after the previous piece's). Without grad
        (the offloaded block's forward, which its backward recomputes with grad) the pieces run plainly, drawing the
        RNG (LoRA dropout) piece by piece as the recompute will. Each piece's recompute replays the RNG state of its
        forward, except while a CUDA graph is captured (the state cannot be read then; graphed steps run no dropout)."""
        pieces = x.split(tile, dim=-2)  # views (B, <=tile, d)
        if not torch.is_grad_enabled():
            return torch.cat([self._piece(p) for p in pieces], dim=-2)
        from torch.utils.checkpoint import checkpoint

        keep_rng = not capturing(x)
        outs = [checkpoint(self._piece, p, use_reentrant=False, preserve_rng_state=keep_rng) for p in pieces]
        return torch.cat(outs, dim=-2)  # (B, T, d); its backward hands each piece a view of dL/dy

    def _piece(self, p: Tensor) -> Tensor:
        return self._mlp(p.contiguous())  # a view of x is strided for B > 1: the kernels take contiguous rows

    def _mlp(self, x: Tensor) -> Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = project(x, [self.gate_up_proj])[0].chunk(2, dim=-1)  # (..., f) each
        elif hasattr(self, "gate_proj"):
            gate, up = project(x, [self.gate_proj, self.up_proj])  # (..., f) each
        else:
            return project(self.act(self.up_proj(x)), [self.down_proj], self.base_last)[0]
        h = swiglu(gate, up) if self.act is F.silu else self.act(gate) * up
        return project(h, [self.down_proj], self.base_last)[0]
