"""The causal language-model loss: summed next-token cross-entropy and the number of predicted tokens, so that the mean
over a step with gradient accumulation (or over several GPUs) is one division by the total count. `causal_lm_loss`
takes logits; `lm_head_loss` takes the final hidden states and the LM head and never builds the (B, T, V) logits
(`slimtune.kernels.cross_entropy`: chunks of tokens, gradients formed in the forward)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.data.tokenize import IGNORE_INDEX
from slimtune.kernels.cross_entropy import linear_cross_entropy


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


def chunkable_head(model: nn.Module) -> nn.Linear | None:
    """The model's LM head when the chunked loss can use it: a plain nn.Linear (frozen or trained, tied or not) of a
    model that exposes `hidden_states`; None for an adapted head (LoRA, modules_to_save), soft-capped logits (Gemma 2:
    the chunks would skip the cap) or another kind of model."""
    head = getattr(model, "lm_head", None)
    capped = getattr(getattr(model, "config", None), "final_softcap", None) is not None
    return head if type(head) is nn.Linear and hasattr(model, "hidden_states") and not capped else None


def lm_head_loss(hidden: Tensor, head: nn.Linear, labels: Tensor, chunk_tokens: int | None = None) -> tuple[Tensor,
                                                                                                              Tensor]:
    """(summed next-token loss (fp32), predicted-token count) of logits = head(hidden), in chunks of tokens.

    The logits are computed in the autocast dtype when autocast is on (as `head(hidden)` would), else in hidden's
    dtype; a trained fp32 head is cast for the product and its gradient flows back through the cast.
    """
    dev = hidden.device.type
    cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    with torch.autocast(dev, enabled=False):
        b = None if head.bias is None else head.bias.to(cd)
        return linear_cross_entropy(hidden.to(cd), head.weight.to(cd), labels, chunk_tokens, b)
