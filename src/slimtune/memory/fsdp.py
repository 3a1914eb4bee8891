"""The per-GPU peak of a step under FSDP2 over N GPUs (`slimtune.train.distributed.wrap_fsdp`), from the one-GPU
phases of `estimate.py`: weights, adapters, optimizer states and accumulated gradients are sharded (1/N each); a block
is gathered whole (in the compute dtype under an autocast policy, packed bytes for a quantized base) while it runs, the
next one's all-gather is in flight beside it (forward and backward prefetch: up to three blocks at once, counting the
all-gather buffer before its copy-out); the root's group (the final norm, and the embeddings and head when tied) stays
gathered from the forward to the end of the backward, the head's own group during the head's forward and backward; a
block's unsharded gradients (compute dtype) and their fp32 reduce-scatter copy live during its backward. Gathered
weights are already in the compute dtype, so autocast makes no copies of them. Activations are those of the rows each
GPU runs (`batch` is per GPU).

With `fsdp_reshard=false` (the estimate input's `fsdp_reshard`) every group stays
gathered from its forward to the end of its backward: at the end of the forward and through the loss and the head's
backward all L blocks, the head and the embeddings are gathered; during block k's backward blocks 0..k (and the
untied embeddings, freed at the end of the backward).
"""
from __future__ import annotations

from typing import Any

from slimtune.quant.codecs import get_codec


def _gathered(p, b, e) -> int:
    """Bytes of parameter `p` once all-gathered: packed bytes if quantized, else its storage or, under autocast
    (FSDP2's param_dtype; a 4-bit base gathers everything uncast: `train.distributed.gather_dtype`), the compute
    dtype."""
    if b.qfmt and p.kind == "linear":
        return get_codec(b.qfmt).nbytes(p.shape[0], p.shape[1], e.quant_group, e.double_quant)
    return p.numel * (b.cb if b.autocast and not b.qfmt else b.wb)


def shard_over_gpus(e, b, P, persistent: dict[str, int], phases: dict[str, dict[str, int]],
                    owners: list[int]) -> dict[str, Any]:
    """Turn the one-GPU figures into one GPU's of `e.gpus` under FSDP2, in place; returns details (bytes of a
    gathered block, of the root's, the head's and the untied embeddings' groups; the reshard setting).

    Args:
        e, b, P: the estimate's input, resolved bytes and parameter figures (`estimate._resolve`, `_parameters`).
        persistent, phases: the one-GPU persistent components and per-phase components.
        owners: for each trainable tensor, 0 (block 0), -2 (head / final norm) or -1 (elsewhere).
    """
    W, L = e.gpus, e.cfg.num_hidden_layers
    keep = not e.fsdp_reshard
    cast = b.autocast and not b.qfmt  # FSDP2 casts what it gathers (param_dtype) only then
    adapter_b = b.cb if cast else b.ab
    blk0 = [(n, s) for (n, s), o in zip(P.trainable, owners) if o == 0]
    block = sum(_gathered(p, b, e) for p in P.table if p.layer == 0)
    if e.method != "full":
        block += sum(n for n, _ in blk0) * adapter_b
    tied = e.cfg.tie_word_embeddings
    root = sum(_gathered(p, b, e) for p in P.table if p.name == "model.norm.weight" or tied and p.kind == "embed")
    head = sum(_gathered(p, b, e) for p in P.table if p.kind == "head")
    embed = sum(_gathered(p, b, e) for p in P.table if p.kind == "embed") if not tied else 0
    grad_b = b.cb if cast else None
    g_unsharded = sum(n * ((grad_b or s) + 4) for n, s in blk0)  # dW in the gathered dtype + the fp32 reduce input
    for k in ("weights", "trainable", "optimizer"):
        persistent[k] = -(-persistent[k] // W)
    for name, comp in phases.items():
        comp["gradients"] = -(-comp["gradients"] // W)
        if cast:
            comp["autocast_copies"] = 0
        held = root if name != "optimizer_step" else 0
        if keep and name == "backward_end":
            held += embed
        elif keep and name.startswith("block"):
            held += (int(name[5:].partition("_")[0]) + 1) * block + embed  # blocks 0..k not yet through backward
        elif keep and name != "optimizer_step":
            held += L * block + head + embed  # forward end, loss, head backward: everything gathered
        elif name == "head_backward":
            held += head + 2 * block  # the last block's all-gather prefetched
        elif name.startswith("block"):
            first = name == "block0_backward"
            held += block if first else 3 * block  # this block, and the previous one's all-gather in flight
            held += embed if first and e.method == "full" else 0  # trainable embeddings: prefetched last
        if name.startswith("block"):
            comp["temporary"] += g_unsharded
        comp["gathered"] = held
    return {"gpus": W, "gathered_block_bytes": block, "gathered_root_bytes": root, "gathered_head_bytes": head,
            "gathered_embed_bytes": embed, "fsdp_reshard": not keep}
