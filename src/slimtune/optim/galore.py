"""GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection"): full-rank
training whose Adam state lives in a rank-r projection of each weight matrix's gradient.

For a matrix W (m, n) of a GaLore group, every `update_interval` steps (at steps 0, T, 2T, ... of that parameter) the
projection P is recomputed from the top r singular vectors of the current gradient G: the side of the smaller dimension
(m < n: P = U[:, :r] (m, r), R = P^T G (r, n); else P = V[:r] (r, n), R = G P^T (m, r)). Adam runs on R; its normalized
step N = m_hat / (sqrt(v_hat) + eps) goes back as scale * P N (or N P) and W <- W (1 - lr wd) - lr * scale * P N.
Other parameters (vectors, and matrices outside the GaLore groups) take plain AdamW. The moments are kept across
projection changes, as the paper's Algorithm 2.

State per GaLore matrix (fp32): two moments of r * max(m, n) and P of r * min(m, n) elements; with `eight_bit` the
moments are 8-bit block-quantized (torchao's dynamic-tree codes, blocks of 256, one fp32 scale each).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.errors import ConfigError
from slimtune.optim.adamw import write_back

BLOCK = 256  # 8-bit state: elements per fp32 scale (torchao / bitsandbytes)
MIN_8BIT = 4096  # smaller moments stay fp32 (as torchao's AdamW8bit)
MOMENTS = ("exp_avg", "exp_avg_sq")


def projection(g: Tensor, r: int) -> Tensor:
    """The rank-r projection of gradient g (m, n) on its smaller side: U[:, :r] (m, r) when m < n, else V[:r] (r, n)."""
    U, _, Vh = torch.linalg.svd(g.float(), full_matrices=False)
    return U[:, :r].contiguous() if g.shape[0] < g.shape[1] else Vh[:r].contiguous()


def project(g: Tensor, P: Tensor) -> Tensor:
    """R = P^T G (r, n) when m < n, else G P^T (m, r): the gradient (m, n) in the projected space."""
    return P.t() @ g if g.shape[0] < g.shape[1] else g @ P.t()


def project_back(n: Tensor, P: Tensor, shape: torch.Size) -> Tensor:
    """P N or N P, (m, n): a projected step back in the space of a weight of `shape` (m, n)."""
    return P @ n if shape[0] < shape[1] else n @ P


class _Moments:
    """The two Adam moments of one parameter, fp32 or 8-bit (codes + scales) in its optimizer state."""

    def __init__(self, st: dict[str, Any], like: Tensor, eight_bit: bool) -> None:
        self.st = st
        self.q = eight_bit and like.numel() >= MIN_8BIT and like.numel() % BLOCK == 0
        if "exp_avg" in st or "exp_avg_codes" in st:
            return
        for k in MOMENTS:
            if self.q:
                st[f"{k}_codes"] = torch.zeros(like.shape, dtype=torch.uint8, device=like.device)
                st[f"{k}_scale"] = torch.zeros(like.numel() // BLOCK, device=like.device)
                self.store(k, torch.zeros_like(like, dtype=torch.float32))
            else:
                st[k] = torch.zeros_like(like, dtype=torch.float32)

    def load(self, k: str) -> Tensor:
        if not self.q:
            return self.st[k]
        from torchao.optim.quant_utils import dequant_with_qmap

        return dequant_with_qmap(self.st[f"{k}_codes"], _qmap(k == "exp_avg", self.st[f"{k}_codes"].device),
                                 self.st[f"{k}_scale"])

    def store(self, k: str, x: Tensor) -> None:
        if not self.q:
            return
        from torchao.optim.quant_utils import quantize_8bit_with_qmap, scale_tensor

        xs, scale = scale_tensor(x, BLOCK)
        self.st[f"{k}_codes"].copy_(quantize_8bit_with_qmap(xs, _qmap(k == "exp_avg", x.device)))
        self.st[f"{k}_scale"].copy_(scale)


_QMAPS: dict[tuple[bool, str], Tensor] = {}


def _qmap(signed: bool, device: torch.device) -> Tensor:
    """torchao's dynamic-tree code table (signed for the first moment, unsigned for the second)."""
    key = (signed, str(device))
    if key not in _QMAPS:
        from torchao.optim.quant_utils import create_dynamic_map

        _QMAPS[key] = torch.tensor(create_dynamic_map(signed=signed), dtype=torch.float32, device=device)
    return _QMAPS[key]


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore projection for the param groups that carry `rank` (see the module docstring); a group
    without `rank` is plain AdamW (fp32 state, torch.optim.AdamW's arithmetic). bf16 weights are updated in fp32
    and written back rounded to nearest, or stochastically with `stochastic_rounding`."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, eight_bit: bool = False, stochastic_rounding: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=None,
                                      update_interval=200, scale=0.25))
        self.eight_bit, self.stochastic_rounding = eight_bit, stochastic_rounding
        for g in self.param_groups:
            if g["rank"] is not None and any(p.ndim != 2 for p in g["params"]):
                raise ConfigError("GaLore projects matrices only; put vectors (norms, biases) in a group without rank")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        st = self.state[p]
        t = st.get("step", 0)
        g = p.grad.float()  # (m, n)
        if group["rank"] is not None:
            if t % group["update_interval"] == 0:
                st["proj"] = projection(g, min(group["rank"], *g.shape))
            g = project(g, st["proj"])  # (r, n) or (m, r)
        mom = _Moments(st, g, self.eight_bit)
        st["step"] = t = t + 1
        m, v = mom.load("exp_avg"), mom.load("exp_avg_sq")
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        mom.store("exp_avg", m)
        mom.store("exp_avg_sq", v)
        step = m / (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps) / (1 - b1 ** t)  # Adam's normalized step
        if group["rank"] is not None:
            step = project_back(step, st["proj"], p.shape).mul_(group["scale"])
        w = p.float()
        w.mul_(1 - lr * wd).add_(step, alpha=-lr)
        write_back(p, w, self.stochastic_rounding)

    def load_state_dict(self, state_dict: dict) -> None:
        """As Optimizer.load_state_dict, but the state stays fp32 / uint8 (the base class would cast it to the
        parameter's dtype, e.g. bf16)."""
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            for k, v in state_dict["state"].get(i, {}).items():
                if isinstance(v, Tensor):
                    self.state[p][k] = v.to(device=p.device).clone()


def state_bytes(optimizer: GaLoreAdamW) -> int:
    """Bytes of every tensor in the optimizer's state (what the formula of the module docstring predicts)."""
    return sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
               if isinstance(v, Tensor))


def galore_groups(model: nn.Module, weight_decay: float, rank: int, update_interval: int,
                  scale: float) -> list[dict[str, Any]]:
    """The trainable parameters in three groups: the matrices of the blocks (`layers.N.`) with GaLore (rank,
    update_interval, scale), the other matrices (embeddings, head) with plain AdamW, the vectors without decay.

    Raises:
        ConfigError: nothing trainable, or a rank / interval below 1.
    """
    if rank < 1 or update_interval < 1:
        raise ConfigError(f"galore_rank and galore_update_interval must be >= 1, got {rank} and {update_interval}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("the method left no trainable parameter; check targets / method options")
    blocks = [p for n, p in named if p.ndim == 2 and ".layers." in f".{n}"]
    other = [p for n, p in named if p.ndim >= 2 and not any(p is q for q in blocks)]
    groups = [{"params": blocks, "weight_decay": weight_decay, "rank": rank, "update_interval": update_interval,
               "scale": scale},
              {"params": other, "weight_decay": weight_decay},
              {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
