"""The causal language-model loss: summed next-token cross-entropy and the number of predicted tokens, so that the mean
over a step with gradient accumulation (or over several GPUs) is one division by the total count."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from slimtune.data.tokenize import IGNORE_INDEX


def causal_lm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy and the number of predicted tokens.

    Position t predicts labels[t + 1]; labels of -100 are left out. Computed in fp32 whatever the logits dtype.
    For the mean over a step with gradient accumulation, add the sums and the counts of the micro-batches and
    divide once (so every token weighs the same, as in one big batch).

    Args:
        logits: (B, T, V).
        labels: (B, T) int64, -100 where not trained.
    Returns:
        (loss_sum: fp32 scalar tensor, count: int64 scalar tensor).
    """
    pred = logits[:, :-1].float()  # (B, T-1, V): position t ...
    target = labels[:, 1:]  # (B, T-1): ... predicts token t+1
    loss_sum = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return loss_sum, (target != IGNORE_INDEX).sum()


def mean_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The mean next-token cross-entropy over labels != -100 (0 when nothing is predicted)."""
    s, n = causal_lm_loss(logits, labels)
    return s / n.clamp_min(1)
