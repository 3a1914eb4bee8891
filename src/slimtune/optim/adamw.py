"""AdamW whose optimizer state is fp32 whatever the weights' dtype (for bf16-true training), and the rounding of an
fp32 update back to bf16 weights: to nearest, or stochastic (unbiased, so that updates below half a bf16 step are not
all lost)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

BF16_DROPPED = 1 << 16  # bf16 is fp32 with the low 16 bits of the mantissa cut off


def stochastic_round_bf16(w: Tensor) -> Tensor:
    """fp32 `w` rounded to bf16 stochastically: up to the next bf16 value with probability (distance from the lower
    one) / (bf16 step), so E[result] = w (Gupta et al. 2015, "Deep Learning with Limited Numerical Precision").

    On the bit pattern: add uniform noise in [0, 2^16) to the int32 view and clear the low 16 bits (the sign bit is
    separate, so magnitudes round alike for both signs); the bf16 cast that follows is then exact. Draws from the
    default generator of w's device, whose state training checkpoints save.
    """
    bits = w.contiguous().view(torch.int32)
    noise = torch.randint(0, BF16_DROPPED, w.shape, dtype=torch.int32, device=w.device)
    return ((bits + noise) & -BF16_DROPPED).view(torch.float32).to(torch.bfloat16)


def write_back(p: Tensor, w: Tensor, stochastic: bool) -> None:
    """Copy the fp32 result `w` into parameter `p`: stochastically rounded where asked and `p` is bf16, else to
    nearest (an exact copy for fp32 `p`)."""
    if stochastic and p.dtype == torch.bfloat16:
        p.copy_(stochastic_round_bf16(w))
    else:
        p.copy_(w)


class AdamWFp32State(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019, decoupled weight decay) whose state is fp32 whatever the weight dtype.

    For bf16-true: each step reads the bf16 weight and gradient as fp32, updates in fp32 and rounds the weight back:
        p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)
    On fp32 weights this is exactly torch.optim.AdamW's arithmetic. `stochastic_rounding`: the new bf16 weight is
    rounded stochastically (`stochastic_round_bf16`) rather than to nearest, where an update smaller than half a bf16
    step would be lost every time.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, stochastic_rounding: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.stochastic_rounding = stochastic_rounding

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
                write_back(p, w, self.stochastic_rounding)
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

