"""The restarts of a ReLoRA run (Lialin et al. 2023; the method: `peft/relora.py`), hooked into the one loop
(`train.loop.Run`): after every `relora_every` optimizer steps

1. merge: W <- W + s B A in every LoRA-wrapped linear (in fp32, then stored in W's dtype: keep the base in fp32,
   `base_dtype: fp32`, or the merges round to 16 bits);
2. restart LoRA: A Kaiming-uniform again, B = 0 (the adapted model equals the merged one);
3. jagged optimizer reset: in the Adam state of A and B, every entry of magnitude at or below the `relora_prune`
   quantile becomes 0 (the paper's magnitude pruning; the step counts stay);
4. warm restart: for `relora_warmup` steps the schedule's learning rate is scaled by (k + 1) / relora_warmup, k the
   steps since the restart.

A checkpoint holds the merged base weights (`state_tensors`), so a resumed run continues exactly.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from slimtune.peft.layer import model_adapters
from slimtune.peft.lora import LoraLinear

MOMENTS = ("exp_avg", "exp_avg_sq")


class ReLoraRestarts:
    """The restarts of adapter `name` (a ReLoraConfig) of `model`, trained by `optimizer`."""

    def __init__(self, model: nn.Module, optimizer, name: str) -> None:
        cfg = model_adapters(model)[name]
        self.model, self.optimizer, self.name = model, optimizer, name
        self.every, self.prune, self.warmup = cfg.relora_every, cfg.relora_prune, cfg.relora_warmup
        self.layers = [(p, m) for p, m in model.named_modules() if isinstance(m, LoraLinear) and name in m.lora_A]
        self.restarts = 0  # merges done so far (also from a resumed checkpoint's step)

    def lr_factor(self, step: int) -> float:
        """The factor on the schedule's learning rate at optimizer step `step` (0-based): the warm restart."""
        since = step % self.every
        if step < self.every or not self.warmup or since >= self.warmup:
            return 1.0
        return (since + 1) / self.warmup

    def after_step(self, done: int) -> bool:
        """Called with the number of optimizer steps done; restarts (and returns True) every `relora_every` steps."""
        if done % self.every:
            return False
        self.restart()
        return True

    @torch.no_grad()
    def restart(self) -> None:
        """Merge every LoRA update into its base weight, start LoRA afresh, prune its optimizer state."""
        for _, m in self.layers:
            W = m.base_layer.weight
            W.copy_((W.float() + m.delta_weight(self.name).float()).to(W.dtype))  # W + s B A
            A, B = m.lora_A[self.name].weight, m.lora_B[self.name].weight
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # LoRA's init, as at the start
            nn.init.zeros_(B)
            for p in (A, B):
                st = self.optimizer.state.get(p, {})
                for k in MOMENTS:
                    if isinstance(st.get(k), Tensor):
                        magnitude_prune_(st[k], self.prune)
        self.restarts += 1

    def state_tensors(self) -> dict[str, Tensor]:
        """The merged base weights ('<module path>.weight'), once a merge happened (before, they are the base's)."""
        if not self.restarts:
            return {}
        return {f"{p}.base_layer.weight": m.base_layer.weight.detach().to("cpu").contiguous() for p, m in self.layers}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, Tensor], step: int) -> None:
        """Restore the merged base weights of a checkpoint taken after `step` optimizer steps."""
        self.restarts = step // self.every
        for p, m in self.layers:
            key = f"{p}.base_layer.weight"
            if key in tensors:
                m.base_layer.weight.copy_(tensors[key])


@torch.no_grad()
def magnitude_prune_(t: Tensor, ratio: float) -> None:
    """Zero, in place, every entry of `t` whose magnitude is at or below the `ratio` quantile of |t|."""
    if ratio <= 0 or t.numel() == 0:
        return
    mag = t.abs().float().flatten()
    k = min(mag.numel(), max(1, math.ceil(ratio * mag.numel())))
    threshold = mag.kthvalue(k).values  # (torch.quantile refuses tensors of more than 2^24 elements)
    t.mul_((t.abs() > threshold).to(t.dtype))


def make_restarts(model: nn.Module, optimizer) -> ReLoraRestarts | None:
    """The restarts of the model's ReLoRA adapter, None when it carries none."""
    for name, cfg in model_adapters(model).items():
        if cfg.method == "relora":
            return ReLoraRestarts(model, optimizer, name)
    return None
