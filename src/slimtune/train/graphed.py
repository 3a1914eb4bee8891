"""A whole optimizer step (forward, backward, clipping, AdamW) captured once as a CUDA graph and replayed.

An eager step of an 8B QLoRA model launches a few thousand small kernels, and the CPU that launches them one by one is
slower than the GPU that runs them: the GPU waits (measured: busy 182 ms of a 429 ms step on an H200). A replayed
graph launches them all at once. PyTorch captures the backward and the optimizer with the forward (its "whole network"
capture); what a graph needs is arranged here:
- static inputs: every batch is copied into the same device buffers; the learning rate is a device tensor (AdamW,
  fused and capturable, reads it), as is the count of predicted tokens the loss is divided by;
- no device-to-host sync inside: loss and gradient norm stay tensors, read after the replay;
- the first step runs eagerly (it compiles the kernels, creates the optimizer state, fills cuBLAS's workspace), the
  graph is captured at the second and replayed from then on;
- a non-finite gradient norm sets the optimizer's `found_inf`, so the fused AdamW leaves the weights as they were,
  and the step then fails as the eager one does.
Steps whose shapes differ from the captured one (the short last batch of an epoch) run eagerly, and so does every
step after a capture that ran out of memory (a graph keeps its own pool: at the edge of the card the eager step may
fit where the capture does not; `failed` says why). `supported` says
when a run can use it: CUDA, no loss scaling, the fused AdamW, no dropout, no activation offload (offloaded
checkpointing is captured: its block inputs go to the same pinned host buffers at every replay).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from slimtune.models.fallback import is_transformers_model
from slimtune.models.host_embed import with_host_rows
from slimtune.models.rope import host_read
from slimtune.precision.policy import Precision
from slimtune.train.step import TrainingError, batch_loss, predicted_tokens, train_step


def supported(model: nn.Module, optimizer, scaler, device: torch.device, offload: bool) -> str | None:
    """None when steps of this run can be captured, else the reason (one phrase) why not."""
    if device.type != "cuda":
        return "not on CUDA"
    if scaler is not None:
        return "fp16 loss scaling"
    if not (isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused")
            and optimizer.defaults.get("capturable")):
        return "not the fused, capturable AdamW"
    if offload:  # (grad_ckpt=offload is captured: its copies to and from pinned buffers run on a forked stream)
        return "offloading moves tensors to the host"
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return "dropout"
    if len(getattr(model, "prompt_encoder", ())):
        return "prompt methods"
    if is_transformers_model(model):
        return "transformers' own implementation (the fallback)"
    if any(getattr(m, "s2_group", None) for m in model.modules()):
        return "S^2-Attn (LongLoRA): not yet checked under capture"
    if host_read(getattr(model, "config", None)):
        return "dynamic NTK RoPE reads the longest position on the host"
    return None


class GraphedStep:
    """`train_step` for one run, replayed as a CUDA graph after the first (eager) step. Call it as train_step."""

    def __init__(self, model: nn.Module, optimizer, prec: Precision, device: torch.device, max_grad_norm: float,
                 params: list[nn.Parameter], chunked: bool = True) -> None:
        self.model, self.opt, self.prec, self.device = model, optimizer, prec, device
        self.max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
        self.params, self.chunked = params, chunked
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed: str | None = None  # why steps stopped being captured (out of memory while capturing)
        self.steps = 0
        self.replays = 0

    @staticmethod
    def _shapes(micro: list[dict]) -> tuple:
        return tuple(tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(b.items())) for b in micro)

    def _capture(self, micro: list[dict]) -> None:
        dev = self.device
        self.shapes = self._shapes(micro)
        self.inputs = [{k: v.to(dev).clone() for k, v in b.items()} for b in micro]
        self.n_pred = torch.ones((), device=dev)
        self.lr = torch.tensor(float(self.opt.param_groups[0]["lr"]), device=dev)
        for g in self.opt.param_groups:
            g["lr"] = self.lr  # a device tensor: the graph reads the current value
        self.opt.found_inf = torch.zeros((), device=dev)  # fused AdamW skips the update when it is 1
        self.opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(dev)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            total = torch.zeros((), device=dev)
            for b in self.inputs:
                loss_sum, _ = batch_loss(self.model, b, self.prec, dev, chunked=self.chunked, autocast_cache=False)
                loss = loss_sum / self.n_pred
                loss.backward()
                total = total + loss.detach()
            self.loss = total
            self.norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
            self.opt.found_inf.copy_((~torch.isfinite(self.norm)).float())
            self.opt.step()

    def _eager(self, micro: list[dict], lr: float) -> dict[str, Any]:
        """The ordinary step (the first one, and any of another shape); the graph's gradient buffers are let go
        first (the replay writes its own memory whatever Python holds)."""
        for g in self.opt.param_groups:
            g["lr"] = lr if self.graph is None else self.lr.fill_(lr)
        if self.graph is not None:
            self.opt.found_inf.zero_()
        self.opt.zero_grad(set_to_none=True)
        return train_step(self.model, micro, self.opt, None, self.prec, self.device, self.max_norm, self.params,
                          chunked=self.chunked)

    def __call__(self, micro: list[dict], lr: float) -> dict[str, Any]:
        """One optimizer step at learning rate `lr`; returns {'loss', 'grad_norm', 'tokens', 'skipped'}.

        Raises:
            TrainingError: the loss or the gradient norm is NaN/inf (the weights are left as they were).
        """
        self.steps += 1
        micro = with_host_rows(self.model, micro)  # host-table rows: looked up here, copied in with the batch
        if self.steps == 1 or self.failed or (self.graph is not None and self._shapes(micro) != self.shapes):
            return self._eager(micro, lr)
        if self.graph is None:
            try:
                self._capture(micro)
            except torch.OutOfMemoryError as e:  # the graph's pool did not fit: eager steps from here on
                self.graph, self.failed = None, f"out of memory while capturing the step ({str(e).splitlines()[0]})"
                self.opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
                return self._eager(micro, lr)
        for dst, src in zip(self.inputs, micro):
            for k, v in src.items():
                dst[k].copy_(v, non_blocking=True)
        self.n_pred.fill_(max(predicted_tokens(micro), 1))
        self.lr.fill_(lr)
        self.graph.replay()
        self.replays += 1
        loss, norm = self.loss.item(), self.norm.item()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise TrainingError(f"loss is {loss}, gradient norm {norm} under precision={self.prec.name}")
        tokens = sum(b["input_ids"].numel() for b in micro)
        return {"loss": loss, "grad_norm": norm, "tokens": tokens, "skipped": False}
