"""The token embedding table in pinned host memory (`host_embedding=true`).

A frozen embedding table is V x d x 2 bytes of GPU memory (Llama-3-8B: 128,256 x 4,096 x 2 = 1.05 GB, a sixth of a
QLoRA run's 2k-token peak) of which a step reads only the B x T rows of its tokens. Here the table stays on the host:
each batch's rows are gathered on the CPU into pinned memory (B x T x d x 2 bytes: 16 MB for 2,048 tokens of an 8B
model) and copied to the device with the batch, as `inputs_embeds`. The rows are the same numbers the device lookup
gives (an index copy; Gemma's sqrt(d) factor is applied as `ScaledEmbedding` does), so the losses are bitwise equal.

Only a frozen table not tied to the head moves (a trained or tied one is used on the device every step). The lookup
before a step (`with_host_rows`) needs no device sync, so CUDA-graphed steps keep it outside the graph; a forward
given token ids on the device (evaluation, generation) copies them to the host first.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from slimtune.errors import ConfigError
from slimtune.models.layers import ScaledEmbedding


class HostEmbedding(nn.Embedding):
    """A frozen nn.Embedding whose table stays in (pinned) host memory whatever `.to()` / `.cuda()` ask."""

    scale: float | None = None  # Gemma: rows are multiplied by this (already rounded to the table's dtype)

    def _apply(self, fn, recurse=True):  # moves and casts of the model leave the table where and what it is
        return self

    def lookup(self, ids: Tensor) -> Tensor:
        """(B, T) token ids on the CPU -> (B, T, d) rows in pinned host memory (plain memory without CUDA)."""
        w = self.weight
        out = torch.empty(*ids.shape, w.shape[1], dtype=w.dtype, pin_memory=torch.cuda.is_available())
        torch.index_select(w, 0, ids.reshape(-1), out=out.view(-1, w.shape[1]))
        return out if self.scale is None else out.mul_(self.scale)

    def forward(self, ids: Tensor) -> Tensor:
        """ids (B, T) anywhere -> (B, T, d) on the ids' device (a device sync when the ids live on the GPU)."""
        return self.lookup(ids.cpu()).to(ids.device, non_blocking=True)


def host_embedding(model: nn.Module) -> HostEmbedding | None:
    """The model's host-resident token embedding, if it has one."""
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    return emb if isinstance(emb, HostEmbedding) else None


def keep_embedding_on_host(model: nn.Module) -> int:
    """Move the decoder's frozen, untied token embedding table to pinned host memory; returns the bytes it freed.

    Raises:
        ConfigError: not slimtune's decoder, a trainable or adapted table, or one tied to the head.
    """
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    if isinstance(emb, HostEmbedding):
        return 0
    if type(emb) not in (nn.Embedding, ScaledEmbedding):
        raise ConfigError("host_embedding needs slimtune's decoder with a plain token embedding (not an adapted or "
                          "transformers-implemented one); fix: host_embedding=false")
    if emb.weight.requires_grad:
        raise ConfigError("host_embedding keeps a frozen table on the host, but this method trains the embedding; "
                          "fix: host_embedding=false")
    head = getattr(model, "lm_head", None)
    if head is not None and getattr(head, "weight", None) is emb.weight:
        raise ConfigError("host_embedding: the embedding is tied to the head (tie_word_embeddings), which uses it on "
                          "the GPU every step; fix: host_embedding=false")
    w = emb.weight.detach()
    freed = w.numel() * w.element_size() if w.is_cuda else 0
    table = w.to("cpu", copy=True)
    host = HostEmbedding(w.shape[0], w.shape[1], _weight=table.pin_memory() if torch.cuda.is_available() else table,
                         _freeze=True)
    if isinstance(emb, ScaledEmbedding):
        host.scale = float(torch.tensor(emb.embedding_dim ** 0.5).to(w.dtype))  # as ScaledEmbedding.forward
    model.model.embed_tokens = host
    return freed


def with_host_rows(model: nn.Module, micro: list[dict]) -> list[dict]:
    """The micro-batches with `inputs_embeds` (B, T, d), looked up on the host, where the model's table lives there;
    unchanged otherwise."""
    emb = host_embedding(model)
    if emb is None:
        return micro
    return [b if "inputs_embeds" in b else {**b, "inputs_embeds": emb.lookup(b["input_ids"].cpu())} for b in micro]
