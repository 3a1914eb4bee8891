"""Learning-rate schedules: linear warmup, then cosine, linear or constant to `min_lr`; and the number of steps."""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def total_steps(max_steps: int | None, epochs: float, batches_per_epoch: int, grad_accum: int) -> int:
    """max_steps, or epochs x optimizer steps per epoch (ceil of batches / grad_accum)."""
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(epochs * math.ceil(batches_per_epoch / grad_accum)))


def warmup_count(warmup_steps: int, warmup_ratio: float, total: int) -> int:
    """Warmup steps: `warmup_steps` when set, else ceil(warmup_ratio * total) (transformers' TrainingArguments rule)."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total)


def lr_at(step: int, lr: float, total: int, warmup_steps: int = 0, schedule: str = "cosine",
          min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to lr over warmup_steps (lr (s+1)/warmup),
    then cosine (min + (lr - min)(1 + cos(pi p))/2) or linear (lr - (lr - min) p) decay, p in [0, 1] over the rest."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    p = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps - 1))
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    return lr - (lr - min_lr) * p
