"""AdamW whose optimizer state is fp32 whatever the weights' dtype (for bf16-true training)."""
from __future__ import annotations

import math

import torch


class AdamWFp32State(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019, decoupled weight decay) whose state is fp32 whatever the weight dtype.

    For bf16-true: each step reads the bf16 weight and gradient as fp32, updates in fp32 and rounds the weight back:
        p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)
    On fp32 weights this is exactly torch.optim.AdamW's arithmetic.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                st["step"] += 1
                t = st["step"].item()
                w = p.float()
                g = p.grad.float()
                w.mul_(1 - lr * wd)
                st["exp_avg"].lerp_(g, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                w.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1 ** t))
                p.copy_(w)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As Optimizer.load_state_dict, but the moments stay fp32 (the base class would cast them to bf16)."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            if i in saved:
                for k in ("exp_avg", "exp_avg_sq"):
                    self.state[p][k] = saved[i][k].to(device=p.device, dtype=torch.float32).clone()

