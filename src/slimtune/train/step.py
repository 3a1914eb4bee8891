"""One training step: the forward loss of a batch and one optimizer step over micro-batches (gradient accumulation,
loss scaling, clipping). Pure functions of their arguments; the loop (`loop.py`) owns the run."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimtune.data.pack import model_inputs
from slimtune.data.tokenize import IGNORE_INDEX
from slimtune.errors import SlimtuneError
from slimtune.models.fallback import is_transformers_model, transformers_logits
from slimtune.models.host_embed import with_host_rows
from slimtune.precision.policy import Precision
from slimtune.train.loss import causal_lm_loss, chunkable_head, lm_head_loss
from slimtune.train.offload import offload_activations


class TrainingError(SlimtuneError):
    """The run diverged: a loss or gradient turned NaN/inf outside what loss scaling handles."""


def batch_loss(model: nn.Module, batch: dict, prec: Precision, device: torch.device, offload: bool = False,
               chunked: bool = True, autocast_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss (fp32), number of predicted tokens (int64 tensor)) of one batch, without a device sync.

    `offload`: activations saved for backward wait in host memory (`slimtune.train.offload`). `chunked`: the loss
    is computed from the final hidden states in chunks of tokens (`train.loss.lm_head_loss`, no (B, T, V) logits)
    where the model's head allows it; else from the full logits. `autocast_cache`: off while capturing a CUDA graph.
    """
    b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    head = chunkable_head(model) if chunked else None
    with prec.context(device.type, autocast_cache), \
            offload_activations(model) if offload else contextlib.nullcontext():
        if len(getattr(model, "prompt_encoder", ())):  # prompt / p-tuning / prefix: virtual tokens go in first
            from slimtune.peft.prompt import forward_with_prompts

            logits = forward_with_prompts(model, b["input_ids"], b.get("attention_mask")).logits  # (B, T, V)
        elif head is not None:
            return lm_head_loss(model.hidden_states(**model_inputs(b)), head, b["labels"])  # from (B, T, d)
        elif is_transformers_model(model):  # the fallback: transformers' implementation, its output's .logits
            logits = transformers_logits(model, model_inputs(b))  # (B, T, V)
        else:
            logits = model(**model_inputs(b))  # (B, T, V)
    return causal_lm_loss(logits, b["labels"])


def forward_loss(model: nn.Module, batch: dict, prec: Precision, device: torch.device, offload: bool = False,
                 chunked: bool = True) -> tuple[torch.Tensor, int]:
    """`batch_loss` with the token count as a Python int."""
    loss_sum, count = batch_loss(model, batch, prec, device, offload, chunked)
    return loss_sum, int(count)


def predicted_tokens(micro: list[dict]) -> int:
    """Tokens the micro-batches predict (labels after the first position that are not -100), counted on the CPU."""
    return sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)


def train_step(model: nn.Module, micro: list[dict], optimizer, scaler, prec: Precision, device: torch.device,
               max_grad_norm: float, params: list[nn.Parameter], offload: bool = False, chunked: bool = True,
               n_pred: int | None = None, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
               ) -> dict[str, Any]:
    """One optimizer step over the micro-batches `micro` (gradient accumulation).

    Every micro-batch's summed loss is divided by the token count of the whole step, so the accumulated gradient is
    that of the mean over all tokens (as one big batch). With a scaler the loss is multiplied by the scale before
    backward and the gradients are unscaled before clipping; the scaler skips a step whose gradients hold inf/NaN.
    On several processes (`distributed.py`) `micro` is this rank's share, `n_pred` the token count of the global
    step and `reduce` sums the loss over ranks (FSDP2 sums the gradients; the norm of sharded ones is global).
    Returns:
        {'loss', 'grad_norm', 'tokens', 'skipped'}.
    Raises:
        TrainingError: the loss is NaN/inf, or (without a scaler) a gradient is.
    """
    n_pred = predicted_tokens(micro) if n_pred is None else n_pred
    micro = with_host_rows(model, micro)  # rows of a host-resident embedding table, looked up on the CPU
    total = torch.zeros((), device=device)
    for b in micro:
        loss_sum, _ = forward_loss(model, b, prec, device, offload, chunked)
        loss = loss_sum / max(n_pred, 1)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    loss_val = (reduce(total) if reduce is not None else total).item()
    if not math.isfinite(loss_val):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingError(f"loss is {loss_val} under precision={prec.name}")
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a replicated DTensor
    skipped = False
    if scaler is not None:
        before = scaler.get_scale()
        scaler.step(optimizer)  # skipped inside when unscale_ found inf/NaN
        scaler.update()
        skipped = scaler.get_scale() < before
    elif not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingError(f"gradient norm is {norm} under precision={prec.name}")
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(b["input_ids"].numel() for b in micro)
    return {"loss": loss_val, "grad_norm": norm, "tokens": tokens, "skipped": skipped}
