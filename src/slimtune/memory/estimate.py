"""Peak GPU memory of one training step (or of generation), predicted from the config without touching a GPU.

Persistent bytes (weights, adapters, gradients, optimizer states) come from the parameter table; activations from the
per-op rules of `activations.py`. The step is walked phase by phase (end of forward, loss backward, head backward,
each block's backward, end of backward, optimizer step) and the peak is the largest phase; the breakdown returned is
that phase's. What `torch.cuda.max_memory_allocated` counts: the CUDA context (~0.5 GB) is not included.
"""
from __future__ import annotations

from slimtune.errors import ConfigError
from slimtune.memory.activations import (BLOCK_LINEARS, Regime, block_backward_transient, block_saved, head_saved,
                                         shared_saved)
from slimtune.memory.params import (DTYPE_BYTES, QUANT_FORMATS, dtype_bytes, param_table, quant_linear_bytes,
                                    quant_tables_bytes)
from slimtune.models.config import ModelConfig

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
OFFLOADS = (None, "activations", "optimizer")
# precision policy -> (compute dtype, autocast, dtype of trainable base weights, dtype of frozen base weights,
# optimizer-state dtype); adapters stay fp32 under every policy
PRECISIONS = {
    "fp32": ("fp32", False, "fp32", "fp32", "fp32"),
    "bf16-mixed": ("bf16", True, "fp32", "bf16", "fp32"),
    "fp16-mixed": ("fp16", True, "fp32", "fp16", "fp32"),
    "bf16-true": ("bf16", False, "bf16", "bf16", "fp32"),
}
DEFAULT_TARGETS = BLOCK_LINEARS
WORKSPACE = 32 * 2**20  # cuBLAS workspace, allocated through PyTorch's caching allocator on first matmul
ADAM8_BLOCK, ADAM8_MIN = 256, 4096  # torchao / bitsandbytes: 8-bit states in blocks of 256, tensors >= 4096


def _check(cfg: ModelConfig, method: str, precision: str, optimizer: str, batch: int, seq: int,
           offload: str | None) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r} for the memory estimate; choose one of {', '.join(METHODS)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if offload not in OFFLOADS:
        raise ConfigError(f"unknown offload {offload!r}; choose activations or optimizer")
    for name, v in (("batch", batch), ("seq", seq)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")


def _optimizer_bytes(tensors: list[tuple[int, int]], optimizer: str, state_b: int, momentum: float) -> int:
    """Bytes of the optimizer state for trainable tensors [(numel, param bytes)].

    adamw: exp_avg and exp_avg_sq (+ a 4-byte `step` per tensor). adamw8bit: 1 byte per element per state + one fp32
    scale per block of 256 (tensors under 4096 elements, or not a multiple of 256, keep fp32 states). sgd: a momentum
    buffer in the parameter's dtype when momentum > 0.
    """
    total = 0
    for n, pb in tensors:
        if optimizer == "adamw":
            total += 2 * n * state_b + 4
        elif optimizer == "adamw8bit":
            q = n >= ADAM8_MIN and n % ADAM8_BLOCK == 0
            total += 2 * (n + 4 * (n // ADAM8_BLOCK)) if q else 2 * n * 4
            total += 4
        elif momentum > 0:
            total += n * pb
    return total


def estimate(cfg: ModelConfig, method: str = "lora", precision: str = "bf16-mixed", optimizer: str = "adamw",
             batch: int = 1, seq: int = 2048, grad_ckpt: bool = False, offload: str | None = None,
             lora_rank: int = 16, lora_targets: tuple[str, ...] = DEFAULT_TARGETS, lora_dropout: float = 0.0,
             weight_dtype: str | None = None, grad_dtype: str | None = None, optim_state_dtype: str | None = None,
             adapter_dtype: str = "fp32", quant_format: str = "nf4", double_quant: bool = True,
             quant_group: int | None = None,
             generate: bool = False, context: int | None = None, attention: str = "flash",
             keep_logits: bool = False, sgd_momentum: float = 0.9, params_override: int | None = None,
             workspace_bytes: int = WORKSPACE, device: str = "cuda") -> dict:
    """Predict the peak of `torch.cuda.max_memory_allocated` over one steady-state training step (forward, backward,
    optimizer step; optimizer state already allocated), or over generation with `generate=True`.

    Args:
        cfg: the model shape. method: full | lora | qlora. precision: a key of PRECISIONS.
        optimizer: adamw | adamw8bit | sgd. batch, seq: positive ints (sequences of `seq` tokens).
        grad_ckpt: recompute each block in backward. offload: None | 'activations' | 'optimizer'.
        lora_rank, lora_targets, lora_dropout: the adapters (lora / qlora). weight_dtype, grad_dtype,
            optim_state_dtype, adapter_dtype: override the policy's dtypes one by one ('bf16', 'fp32', ...;
            weight_dtype may be a quantized format for the block linears, e.g. 'nf4' or 'int8').
        quant_format, double_quant, quant_group: the qlora base format (block / group size: 64 by default). generate, context: KV cache of `context` positions for
            `batch` sequences, prompt of `seq` tokens. attention: flash | efficient | math (SDPA backend).
        keep_logits: the loop keeps the (B, S, V) logits alive through backward. params_override: count this many
            parameters instead of the config's (one tensor; for the textbook case). device: 'cuda' (what is
            predicted) or 'cpu' (CPU kernels save a few tensors differently: dropout's mask; used by the tests).
    Returns:
        dict with `total_bytes`, one `<component>_bytes` key per component at the peak (weights, trainable,
        gradients, optimizer, activations, autocast_copies, logits_loss, temporary, workspace, kv_cache),
        `static_bytes` (weights + trainable + all gradients + optimizer states: the "before activations" figure),
        `peak_phase`, `dominant`, `host_bytes` (pinned CPU memory used by offloading) and `detail`.
    Raises:
        ConfigError: unknown method / precision / optimizer / dtype, or a non-positive batch or seq.
    """
    _check(cfg, method, precision, optimizer, batch, seq, offload)
    comp_n, autocast, train_dt, frozen_dt, state_dt = PRECISIONS[precision]
    qfmt = None
    base_dt = weight_dtype or (train_dt if method == "full" else frozen_dt)
    if base_dt in QUANT_FORMATS:
        qfmt, base_dt = base_dt, (frozen_dt if method != "full" else comp_n)
    if method == "qlora":
        qfmt = qfmt or quant_format
        if base_dt == "fp32" and weight_dtype is None:
            base_dt = comp_n if comp_n != "fp32" else "bf16"
    if method == "full" and qfmt:
        raise ConfigError("full fine-tuning cannot train quantized weights; use --method qlora or a float weight dtype")
    if offload == "optimizer" and method == "full" and weight_dtype is None:
        base_dt = comp_n if comp_n != "fp32" else "fp32"  # the fp32 master lives on the CPU
    wb, cb = dtype_bytes(base_dt, "weight dtype"), dtype_bytes(comp_n)
    ab = dtype_bytes(adapter_dtype, "adapter dtype")
    c = cb if autocast else wb  # bytes of matmul outputs
    N, L, V = batch * seq, cfg.num_hidden_layers, cfg.vocab_size

    # ---- parameters: weights (frozen or trained), adapters ------------------------------------------------------
    table = param_table(cfg)
    if params_override is not None:
        from slimtune.memory.params import Param
        table = [Param("params", (int(params_override),), "linear", 0, "q_proj")]
    targets = set(lora_targets) if method != "full" else set()
    weights = quant_tables = 0
    trainable: list[tuple[int, int]] = []  # (numel, bytes per element) of each trainable tensor
    max_linear = 0
    for p in table:
        if p.kind == "linear":
            max_linear = max(max_linear, p.numel)
        if qfmt and p.kind == "linear" and params_override is None:
            weights += quant_linear_bytes(p.shape[0], p.shape[1], qfmt, quant_group, double_quant)
            quant_tables += quant_tables_bytes(qfmt, double_quant)
        else:
            weights += p.numel * wb
        if method == "full":
            trainable.append((p.numel, wb))
        elif p.kind == "linear" and p.module in targets:
            out_f, in_f = p.shape if len(p.shape) == 2 else (p.numel, 1)
            trainable += [(lora_rank * in_f, ab), (out_f * lora_rank, ab)]  # A (r, in), B (out, r)
    adapters = 0 if method == "full" else sum(n * b for n, b in trainable)
    gb = dtype_bytes(grad_dtype, "grad dtype") if grad_dtype else None
    grads_full = sum(n * (gb or b) for n, b in trainable)
    sb = dtype_bytes(optim_state_dtype or (state_dt if method == "full" else adapter_dtype), "optimizer-state dtype")
    optim = _optimizer_bytes(trainable, optimizer, sb, sgd_momentum)
    host = 0
    if offload == "optimizer":  # fp32 master + states + pinned gradients on the CPU; nothing of them on the GPU
        host = optim + sum(n * 4 for n, _ in trainable) + grads_full
        optim = 0
    static = weights + quant_tables + adapters + grads_full + optim
    detail: dict = {"params": sum(p.numel for p in table), "trainable_params": sum(n for n, _ in trainable),
                    "weight_format": qfmt or base_dt, "compute_dtype": comp_n if autocast else base_dt,
                    "quant_tables_bytes": quant_tables}
    persistent = {"weights": weights + quant_tables, "trainable": adapters, "optimizer": optim,
                  "workspace": workspace_bytes}

    if generate:
        return _generate(cfg, batch, seq, context, c, persistent, detail)
    if params_override is not None:  # no architecture to walk: the static figure only
        out = {f"{k}_bytes": v for k, v in persistent.items()}
        out.update(gradients_bytes=grads_full, static_bytes=static, host_bytes=host, peak_phase="static",
                   detail=detail)
        out["total_bytes"] = sum(v for k, v in out.items() if k.endswith("_bytes") and k not in
                                 ("static_bytes", "host_bytes"))
        out["dominant"] = max((k for k in persistent), key=lambda k: out[f"{k}_bytes"])
        return out

    # ---- activations ----------------------------------------------------------------------------------------------
    full = method == "full"
    r = Regime(resid=wb, compute=c, norm_out=wb, autocast=autocast, adapter=ab,
               trainable=frozenset(BLOCK_LINEARS) if full else frozenset(),
               adapters={} if full else {t: lora_rank for t in targets if t in BLOCK_LINEARS},
               norms=full, embed=full, head=full, attention=attention, lora_dropout=lora_dropout,
               dropout_mask=1 if device == "cuda" else 0)
    a_first = sum(block_saved(cfg, batch, seq, r, x_grad=full).values())
    per_op = block_saved(cfg, batch, seq, r, x_grad=True)
    a_blk = sum(per_op.values())
    shared = sum(shared_saved(cfg, batch, seq, r).values())
    head = sum(head_saved(cfg, batch, seq, r).values())
    # autocast casts of base weights whose dtype differs from the compute dtype: trained ones are cached until the
    # autocast context exits; every cast weight is kept by its matmul for the input gradient
    blk_w = sum(p.numel for p in table if p.kind == "linear" and p.layer == 0)
    cast_blk = blk_w * c if autocast and wb != c and not qfmt else 0
    head_w = cfg.vocab_size * cfg.hidden_size
    cast_head = head_w * c if autocast and wb != c else 0
    if autocast and ab != c:  # adapters (leaves that train) are cast once per forward and cached
        cast_head += adapters // ab * c
    # the loop's loss (data.causal_lm_loss): logits[:, :-1].float() -> cross_entropy, after the autocast context
    NV, NVp = N * V, batch * (seq - 1) * V
    logits = NV * c if keep_logits else 0
    logp = NVp * 4 + N * 8 + 4  # log_softmax's fp32 output; nll_loss keeps the int64 targets and the weight sum
    upcast = NVp * 4 if c != 4 else 0  # the fp32 copy, alive while log_softmax runs
    trans = block_backward_transient(cfg, batch, seq, r)
    if full and autocast and wb != c:  # dW from the matmul in `c`, then its cast to the fp32 .grad
        trans += max_linear * c
    if qfmt:  # dequantize: int32 indices (2 B/weight) + fp32 values (4 B/weight), then the 16-bit weight
        trans += 6 * max_linear
    g_blk = sum(n * (gb or b) for (n, b), p in zip(trainable, _owners(table, method, targets)) if p == 0)
    g_head = sum(n * (gb or b) for (n, b), p in zip(trainable, _owners(table, method, targets)) if p == -2)
    g_embed = grads_full - g_blk * L - g_head if full else 0
    if cfg.tie_word_embeddings and full:  # the shared matrix's .grad appears at lm_head's backward
        g_head += g_embed  # (g_embed stays: the embedding's own contribution is added at the end, a transient)
    if offload == "activations" and not grad_ckpt:
        held = lambda k: min(k, 2) * a_blk  # noqa: E731  the block in flight to / from host and the next one
    elif grad_ckpt:
        held = lambda k: k * N * cfg.hidden_size * wb  # noqa: E731  block inputs kept by the checkpoints
    else:
        held = lambda k: a_first + (k - 1) * a_blk if k else 0  # noqa: E731
    # in backward, casts are held for the blocks not yet processed; with checkpointing only the recomputed one's
    cast_held = (lambda k: cast_blk) if grad_ckpt else (lambda k: k * cast_blk)  # noqa: E731

    phases: dict[str, dict[str, int]] = {}
    fwd_act = held(L) + shared + head
    phases["forward_end"] = dict(activations=fwd_act, autocast_copies=L * cast_blk + cast_head,
                                 logits_loss=NV * c, gradients=0, temporary=0)
    bwd_cast = (0 if grad_ckpt else L * cast_blk) + cast_head  # autocast's cache is gone; the graph's copies stay
    phases["loss_forward"] = dict(activations=fwd_act, autocast_copies=bwd_cast, logits_loss=NV * c + upcast + logp,
                                  gradients=0, temporary=0)
    phases["loss_backward"] = dict(activations=fwd_act, autocast_copies=bwd_cast,
                                   logits_loss=logits + logp + 2 * NVp * 4, gradients=0, temporary=0)
    head_tmp = head_w * c if (full and autocast and wb != c) else 0
    phases["head_backward"] = dict(activations=fwd_act, autocast_copies=bwd_cast, logits_loss=logits + NV * c,
                                   gradients=g_head, temporary=head_tmp + N * cfg.hidden_size * c)
    for k in (L - 1, 0):  # the last block (most activations held) and the first (most gradients)
        recompute = (a_first if k == 0 else a_blk) if grad_ckpt else 0
        phases[f"block{k}_backward"] = dict(
            activations=held(k + 1) + recompute + shared, autocast_copies=cast_held(k + 1), logits_loss=logits,
            gradients=g_head + (L - k) * g_blk, temporary=trans)
    phases["backward_end"] = dict(activations=0, autocast_copies=0, logits_loss=logits, gradients=grads_full,
                                  temporary=g_embed if cfg.tie_word_embeddings and full else 0)  # dE, added
    opt_tmp = 0  # fused AdamW and torchao's 8-bit AdamW: no full-size temporaries
    phases["optimizer_step"] = dict(activations=0, autocast_copies=0, logits_loss=0, gradients=grads_full,
                                    temporary=opt_tmp)
    totals = {k: sum(v.values()) + sum(persistent.values()) for k, v in phases.items()}
    peak = max(totals, key=totals.get)
    out = {f"{k}_bytes": v for k, v in persistent.items()}
    out.update({f"{k}_bytes": v for k, v in phases[peak].items()})
    out["kv_cache_bytes"] = 0
    out["total_bytes"] = totals[peak]
    comps = {k: v for k, v in out.items() if k.endswith("_bytes") and k != "total_bytes"}
    out["dominant"] = max(comps, key=comps.get).removesuffix("_bytes")
    out.update(static_bytes=static, host_bytes=host + (L * a_blk if offload == "activations" else 0),
               peak_phase=peak)
    detail.update(block_saved_bytes=a_blk, first_block_saved_bytes=a_first, block_saved_by_op=per_op,
                  shared_saved_bytes=shared, head_saved_bytes=head, gradients_full_bytes=grads_full,
                  phases=totals, autocast_copies_forward_bytes=L * cast_blk + cast_head)
    out["detail"] = detail
    return out


def _owners(table, method: str, targets: set) -> list[int]:
    """For each trainable tensor (in `estimate`'s order): 0 if it belongs to block 0, -2 for the head / final norm,
    -1 elsewhere (other blocks, embeddings). Used to size the gradients present during backward."""
    owners = []
    for p in table:
        where = 0 if p.layer == 0 else (-2 if p.kind == "head" or p.name == "model.norm.weight" else -1)
        if method == "full":
            owners.append(where)
        elif p.kind == "linear" and p.module in targets:
            owners += [where, where]
    return owners


def _generate(cfg: ModelConfig, batch: int, seq: int, context: int | None, c: int, persistent: dict,
              detail: dict) -> dict:
    """Generation: weights + a KV cache (L layers x k and v, (B, nkv, context, hd)) + the prefill's logits
    (B, S, V) and its largest no-grad intermediate (the MLP's gate, up and product, (B, S, f) each)."""
    ctx = context or seq
    if not isinstance(ctx, int) or ctx <= 0:
        raise ConfigError(f"context must be a positive integer, got {context!r}")
    N = batch * seq
    kv = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * ctx * cfg.head_dim * c
    out = {f"{k}_bytes": v for k, v in persistent.items() if k != "optimizer"}
    out.update(kv_cache_bytes=kv, logits_loss_bytes=N * cfg.vocab_size * c + batch * cfg.vocab_size * 4,
               temporary_bytes=N * (3 * cfg.intermediate_size + 2 * cfg.hidden_size) * c)
    out["total_bytes"] = sum(out.values())
    comps = {k: v for k, v in out.items() if k != "total_bytes"}
    out.update(dominant=max(comps, key=comps.get).removesuffix("_bytes"), peak_phase="prefill",
               static_bytes=persistent["weights"], host_bytes=0, detail=detail)
    return out


__all__ = ["estimate", "METHODS", "OPTIMIZERS", "PRECISIONS", "DTYPE_BYTES"]
