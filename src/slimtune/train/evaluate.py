"""Evaluation: the mean next-token loss and perplexity of a model over a dataset's rows (validation during training,
the before / after figures of post-training quantization)."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from slimtune.precision.policy import Precision, make_policy
from slimtune.train.step import forward_loss


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int = 8, prec: Precision | None = None,
             device: torch.device | None = None, max_batches: int | None = None,
             max_rows: int | None = None, chunked: bool = True,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Mean token loss and perplexity exp(loss) over the dataset (its first `max_batches` batches, or `max_rows`
    rows, if given), the model in eval mode meanwhile.

    Args:
        dataset: anything with `__len__` and `collate(indices) -> batch dict` (TokenDataset, ptq.TextRows).
        prec: the precision policy (default fp32); device: default the model's; chunked: as `forward_loss`.
        reduce: sums (loss, count) over processes (runs on several processes, each with its rows of every batch).
    Returns:
        {'val_loss': nats per predicted token, 'val_ppl'}.
    """
    prec = prec or make_policy("fp32")
    device = device or next(model.parameters()).device
    rows = len(dataset) if max_rows is None else min(max_rows, len(dataset))
    if max_batches is not None:
        rows = min(rows, max_batches * batch_size)
    was_training = model.training
    model.eval()
    s, n = 0.0, 0
    for i in range(0, rows, batch_size):
        batch = dataset.collate(range(i, min(i + batch_size, rows)))
        loss_sum, count = forward_loss(model, batch, prec, device, chunked=chunked)
        s, n = s + loss_sum.item(), n + count
    model.train(was_training)
    if reduce is not None:
        s, n = reduce(torch.tensor([s, n], dtype=torch.float64, device=device)).tolist()
    loss = s / max(n, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
