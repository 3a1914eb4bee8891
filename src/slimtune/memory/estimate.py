"""Peak GPU memory of one training step (or of generation), predicted from the config without touching a GPU.

Persistent bytes (weights, adapters, gradients, optimizer states) come from the parameter table (quantized layers'
bytes from their codec); activations from the per-op rules of `activations.py`. The step is walked phase by phase
(end of forward, loss, head backward, each block's backward, end of backward, optimizer step) and the peak is the
largest phase; the breakdown returned is that phase's. What `torch.cuda.max_memory_allocated` counts: the CUDA context
(~0.5 GB) is not included. `estimate(EstimateInput(cfg, ...))`, or `estimate(cfg, method, precision, ...)`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from slimtune.errors import ConfigError
from slimtune.memory.activations import (BLOCK_LINEARS, Regime, block_backward_transient, block_saved, head_saved,
                                         loss_bytes, shared_saved, tiled_mlp_saving)
from slimtune.memory.fsdp import shard_over_gpus
from slimtune.memory.params import Param, param_table
from slimtune.models.config import ModelConfig
from slimtune.models.recompute import MLP_TILE
from slimtune.optim.build import OPTIMIZERS, SGD_MOMENTUM
from slimtune.precision.formats import dtype_bytes, short_name
from slimtune.precision.policy import POLICIES, make_policy
from slimtune.quant.codecs import CODECS, get_codec

METHODS = ("full", "lora", "qlora")
OFFLOADS = (None, "activations", "optimizer")
DEFAULT_TARGETS = BLOCK_LINEARS
WORKSPACE = 32 * 2**20  # cuBLAS workspace, allocated through PyTorch's caching allocator on first matmul
ADAM8_BLOCK, ADAM8_MIN = 256, 4096  # torchao / bitsandbytes: 8-bit states in blocks of 256, tensors >= 4096


@dataclass
class EstimateInput:
    """What is predicted. cfg: the model shape. method: full | lora | qlora. precision: a policy name.
    optimizer: adamw | adamw8bit | sgd. batch, seq: positive ints. grad_ckpt: recompute each block in backward
    (True), also with the block inputs in host memory ("offload").
    offload: None | 'activations' | 'optimizer'. lora_*: the adapters (lora / qlora). weight_dtype, grad_dtype,
    optim_state_dtype, adapter_dtype: override the policy's dtypes one by one ('bf16', 'fp32', ...; weight_dtype may
    be a quantized format for the block linears, e.g. 'nf4'). quant_format, double_quant, quant_group: the qlora base
    format. generate, context: a KV cache of `context` positions for `batch` sequences, prompt of `seq` tokens.
    attention: flash | efficient | math. keep_logits: the loop keeps the (B, S, V) logits alive through backward.
    params_override: count this many parameters instead of the config's (the textbook case). device: 'cuda' (what
    is predicted) or 'cpu' (CPU kernels save a few tensors differently; used by the tests). kernels: the fused
    kernels' path (default: on CUDA). chunked_loss, loss_chunk: the loss from the hidden states, `loss_chunk` rows
    of logits at a time, never the (B, S, V) logits. gpus: FSDP2 over this many GPUs (`memory/fsdp.py`): the peak of
    one of them; `batch` is then the rows each GPU runs, and the loss is taken from the full logits (as FSDP2 runs
    take it). mlp_tile: with grad_ckpt, the MLP of a longer sequence runs in pieces of this many tokens (the
    decoder's `mlp_tile`; None: untiled). ckpt_blocks: with grad_ckpt, only the first this many blocks are
    checkpointed (None: all). host_embedding: the (untied) token embedding table stays in host memory."""

    cfg: ModelConfig
    method: str = "lora"
    precision: str = "bf16-mixed"
    optimizer: str = "adamw"
    batch: int = 1
    seq: int = 2048
    grad_ckpt: bool | str = False  # False, True (recompute), "offload" (recompute; block inputs on the host)
    offload: str | None = None
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_dropout: float = 0.0
    weight_dtype: str | None = None
    grad_dtype: str | None = None
    optim_state_dtype: str | None = None
    adapter_dtype: str = "fp32"
    quant_format: str = "nf4"
    double_quant: bool = True
    quant_group: int | None = None
    generate: bool = False
    context: int | None = None
    attention: str = "flash"
    keep_logits: bool = False
    sgd_momentum: float = SGD_MOMENTUM
    params_override: int | None = None
    workspace_bytes: int = WORKSPACE
    device: str = "cuda"
    kernels: bool | None = None  # the fused kernels' path (slimtune.kernels); None: on for device "cuda"
    chunked_loss: bool = True  # the loss from the hidden states in chunks (train.loss.lm_head_loss)
    loss_chunk: int | None = None  # rows per chunk; None: kernels.cross_entropy.default_chunk(vocab)
    gpus: int = 1  # FSDP2 over this many GPUs: the peak of one of them (whose loss is never chunked)
    mlp_tile: int | None = MLP_TILE  # tokens per MLP piece in the recomputed blocks (grad_ckpt only)
    ckpt_blocks: int | None = None  # grad_ckpt: checkpoint the first N blocks only (None: all)
    host_embedding: bool = False  # the token embedding table in pinned host memory (not on the GPU)
    fsdp_reshard: bool = True  # gpus > 1: FSDP2 frees gathered weights after each forward (False: kept to backward)

    def validate(self) -> None:
        """Raises ConfigError on an unknown method / precision / optimizer / offload or a non-positive size."""
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r} for the memory estimate; choose one of "
                              f"{', '.join(METHODS)}")
        for key, allowed in (("precision", tuple(POLICIES)), ("optimizer", OPTIMIZERS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"unknown {key} {getattr(self, key)!r}; choose one of {', '.join(allowed)}")
        if self.optimizer.startswith("galore"):  # its state depends on each matrix's shape, not on the counts here
            raise ConfigError("the memory estimate does not model GaLore's optimizer state (r x dims per matrix, "
                              "see slimtune.optim.galore); use optimizer=adamw for an upper bound")
        if self.offload not in OFFLOADS:
            raise ConfigError(f"unknown offload {self.offload!r}; choose activations or optimizer")
        if self.ckpt_blocks is not None and (isinstance(self.ckpt_blocks, bool) or self.ckpt_blocks < 0):
            raise ConfigError(f"ckpt_blocks must be a number of blocks >= 0, got {self.ckpt_blocks!r}")
        if self.host_embedding and (self.cfg.tie_word_embeddings or self.method == "full"):
            raise ConfigError("host_embedding needs a frozen embedding not tied to the head (not full fine-tuning, "
                              "not tie_word_embeddings)")
        tile = () if self.mlp_tile is None else (("mlp_tile", self.mlp_tile),)
        for name, v in (("batch", self.batch), ("seq", self.seq), ("gpus", self.gpus)) + tile:
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.cfg.final_softcap:  # training never chunks a soft-capped head (train.loss.chunkable_head)
            self.chunked_loss = False
        if self.gpus > 1 and (self.offload or self.generate or self.params_override is not None or
                              self.grad_ckpt == "offload"):
            raise ConfigError("gpus > 1 (FSDP2) is predicted for training without offloading; drop offload / "
                              "grad_ckpt=offload / generate")


@dataclass
class _Bytes:
    """Resolved storage: bytes per element of base weights (wb), compute (cb), adapters (ab), matmul outputs (c);
    the quantized format of the block linears (qfmt) and the names behind them."""

    comp: str
    autocast: bool
    base: str
    qfmt: str | None
    wb: int
    cb: int
    ab: int
    c: int
    state: str
    detail: dict = field(default_factory=dict)


def _resolve(e: EstimateInput) -> _Bytes:
    pol = make_policy(e.precision, full=e.method == "full")
    comp = short_name(pol.compute_dtype) if pol.compute_dtype is not None else "fp32"
    train_dt, frozen_dt = short_name(pol.weight_dtype), short_name(pol.frozen_dtype)
    qfmt = None
    base = e.weight_dtype or (train_dt if e.method == "full" else frozen_dt)
    if base in CODECS:
        qfmt, base = base, (frozen_dt if e.method != "full" else comp)
    if e.method == "qlora":
        qfmt = qfmt or e.quant_format
        if base == "fp32" and e.weight_dtype is None:
            base = comp if comp != "fp32" else "bf16"
    if e.method == "full" and qfmt:
        raise ConfigError("full fine-tuning cannot train quantized weights; use --method qlora or a float weight dtype")
    if e.offload == "optimizer" and e.method == "full" and e.weight_dtype is None:
        base = comp  # the fp32 master lives on the CPU
    wb, cb = dtype_bytes(base, "weight dtype"), dtype_bytes(comp)
    ab = dtype_bytes(e.adapter_dtype, "adapter dtype")
    state = e.optim_state_dtype or ("fp32" if e.method == "full" else e.adapter_dtype)
    return _Bytes(comp, pol.autocast, base, qfmt, wb, cb, ab, cb if pol.autocast else wb, state)


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


def _owners(table: list[Param], method: str, targets: set) -> list[int]:
    """For each trainable tensor (in `_parameters`' order): 0 if it belongs to block 0, -2 for the head / final norm,
    -1 elsewhere (other blocks, embeddings). Used to size the gradients present during backward."""
    owners = []
    for p in table:
        where = 0 if p.layer == 0 else (-2 if p.kind == "head" or p.name == "model.norm.weight" else -1)
        if method == "full":
            owners.append(where)
        elif p.kind == "linear" and p.module in targets:
            owners += [where, where]
    return owners


@dataclass
class _Params:
    """The persistent part: parameter table, trainable tensors [(numel, bytes)], their gradients and states."""

    table: list[Param]
    targets: set
    trainable: list[tuple[int, int]]
    weights: int
    quant_tables: int
    adapters: int
    grads_full: int
    optim: int
    host: int
    max_linear: int


def _parameters(e: EstimateInput, b: _Bytes) -> _Params:
    table = param_table(e.cfg)
    if e.params_override is not None:
        table = [Param("params", (int(e.params_override),), "linear", 0, "q_proj")]
    targets = set(e.lora_targets) if e.method != "full" else set()
    weights = quant_tables = max_linear = 0
    trainable: list[tuple[int, int]] = []  # (numel, bytes per element) of each trainable tensor
    codec = get_codec(b.qfmt) if b.qfmt else None
    for p in table:
        if p.kind == "linear":
            max_linear = max(max_linear, p.numel)
        if codec and p.kind == "linear" and e.params_override is None:
            weights += codec.nbytes(p.shape[0], p.shape[1], e.quant_group, e.double_quant)
            quant_tables += codec.table_bytes(e.double_quant)
        elif not (e.host_embedding and p.name == "model.embed_tokens.weight"):  # a host table: no GPU memory
            weights += p.numel * b.wb
        if e.method == "full":
            trainable.append((p.numel, b.wb))
        elif p.kind == "linear" and p.module in targets:
            out_f, in_f = p.shape if len(p.shape) == 2 else (p.numel, 1)
            trainable += [(e.lora_rank * in_f, b.ab), (out_f * e.lora_rank, b.ab)]  # A (r, in), B (out, r)
    adapters = 0 if e.method == "full" else sum(n * s for n, s in trainable)
    gb = dtype_bytes(e.grad_dtype, "grad dtype") if e.grad_dtype else None
    grads_full = sum(n * (gb or s) for n, s in trainable)
    optim = _optimizer_bytes(trainable, e.optimizer, dtype_bytes(b.state, "optimizer-state dtype"), e.sgd_momentum)
    host = 0
    if e.offload == "optimizer":  # fp32 master + states + pinned gradients on the CPU; nothing of them on the GPU
        host = optim + sum(n * 4 for n, _ in trainable) + grads_full
        optim = 0
    return _Params(table, targets, trainable, weights, quant_tables, adapters, grads_full, optim, host, max_linear)


def _weight_transient(b: _Bytes, P: _Params, kernels: bool, full: bool) -> int:
    """Bytes of one weight's transient in a block's backward: dequantized or cast copies, a cast weight gradient."""
    t = P.max_linear * b.c if full and b.autocast and b.wb != b.c else 0  # dW in `c`, then cast to the fp32 .grad
    if b.qfmt and kernels:  # one Triton pass into the 16-bit weight; gate,up stacked (2 weights)
        t += 4 * P.max_linear
    elif b.qfmt:  # dequantize: int32 indices (2 B/weight) + fp32 values (4 B/weight), then the 16-bit weight
        t += 6 * P.max_linear
    return t


def _phases(e: EstimateInput, b: _Bytes, P: _Params) -> tuple[dict[str, dict[str, int]], dict[str, Any]]:
    """Bytes alive at each phase of the step, by component, and the activation details."""
    cfg, batch, seq, full = e.cfg, e.batch, e.seq, e.method == "full"
    N, L, c = batch * seq, cfg.num_hidden_layers, b.c
    r = Regime(resid=b.wb, compute=c, norm_out=b.wb, autocast=b.autocast, adapter=b.ab,
               trainable=frozenset(BLOCK_LINEARS) if full else frozenset(),
               adapters={} if full else {t: e.lora_rank for t in P.targets if t in BLOCK_LINEARS},
               norms=full, embed=full, head=full, attention=e.attention, lora_dropout=e.lora_dropout,
               dropout_mask=1 if e.device == "cuda" else 0,
               kernels=e.device == "cuda" if e.kernels is None else e.kernels)
    a_first = sum(block_saved(cfg, batch, seq, r, x_grad=full).values())
    per_op = block_saved(cfg, batch, seq, r, x_grad=True)
    a_blk = sum(per_op.values())
    shared = sum(shared_saved(cfg, batch, seq, r).values())
    head = sum(head_saved(cfg, batch, seq, r, e.chunked_loss).values())
    # autocast casts of base weights whose dtype differs from the compute dtype: trained ones are cached until the
    # autocast context exits; every cast weight is kept by its matmul for the input gradient
    blk_w = sum(p.numel for p in P.table if p.kind == "linear" and p.layer == 0)
    cast_blk = blk_w * c if b.autocast and b.wb != c and not b.qfmt else 0
    head_w = cfg.vocab_size * cfg.hidden_size
    cast_head = head_w * c if b.autocast and b.wb != c else 0
    if b.autocast and b.ab != c:  # adapters (leaves that train) are cast once per forward and cached
        cast_head += P.adapters // b.ab * c
    loss = loss_bytes(e, b, full, N)
    logits = loss["kept"]
    tile = e.mlp_tile if e.grad_ckpt else None  # the recomputed block's MLP runs in pieces of `tile` tokens
    cut, cut_first = (tiled_mlp_saving(cfg, batch, seq, tile, r, x_grad) for x_grad in (True, full))
    extra = _weight_transient(b, P, r.kernels, full)
    trans = {t: block_backward_transient(cfg, batch, seq, r, t) + extra for t in {tile, None}}
    gb = dtype_bytes(e.grad_dtype, "grad dtype") if e.grad_dtype else None
    owners = _owners(P.table, e.method, P.targets)
    g_blk = sum(n * (gb or s) for (n, s), o in zip(P.trainable, owners) if o == 0)
    g_head = sum(n * (gb or s) for (n, s), o in zip(P.trainable, owners) if o == -2)
    g_embed = P.grads_full - g_blk * L - g_head if full else 0
    if cfg.tie_word_embeddings and full:  # the shared matrix's .grad appears at lm_head's backward
        g_head += g_embed  # (g_embed stays: the embedding's own contribution is added at the end, a transient)
    # blocks 0..n_ck-1 are checkpointed (their inputs kept, on the host under offload), the later ones keep all
    n_ck = (L if e.ckpt_blocks is None else min(e.ckpt_blocks, L)) if e.grad_ckpt else 0
    x_in = N * cfg.hidden_size * b.wb
    kept = (lambda m: min(m, 2) * x_in) if e.grad_ckpt == "offload" else (lambda m: m * x_in)  # noqa: E731
    if e.offload == "activations" and not e.grad_ckpt:
        held = lambda k: min(k, 2) * a_blk  # noqa: E731  the block in flight to / from host and the next one
    else:  # k blocks wait for their backward: the checkpointed ones' inputs, the others' saved tensors
        held = lambda k: kept(min(k, n_ck)) + (  # noqa: E731
            (a_first if n_ck == 0 else a_blk) + (k - n_ck - 1) * a_blk if k > n_ck else 0)
    # in backward, casts are held for the plain blocks not yet processed; with checkpointing only the recomputed one's
    cast_held = lambda k: (k - n_ck) * cast_blk if k > n_ck else cast_blk  # noqa: E731

    ph: dict[str, dict[str, int]] = {}
    fwd_act = held(L) + shared + head
    ph["forward_end"] = dict(activations=fwd_act, autocast_copies=L * cast_blk + cast_head,
                             logits_loss=loss["forward_end"], gradients=0, temporary=0)
    bwd_cast = (L - n_ck) * cast_blk + cast_head  # autocast's cache is gone; the graph's copies stay
    in_loss = g_head if e.chunked_loss else 0  # the chunked loss forms the head's gradient in its forward
    ph["loss_forward"] = dict(activations=fwd_act, autocast_copies=bwd_cast, logits_loss=loss["loss_forward"],
                              gradients=in_loss, temporary=0)
    ph["loss_backward"] = dict(activations=fwd_act, autocast_copies=bwd_cast, logits_loss=loss["loss_backward"],
                               gradients=in_loss, temporary=0)
    head_tmp = head_w * c if (full and b.autocast and b.wb != c and not e.chunked_loss) else 0
    ph["head_backward"] = dict(activations=fwd_act, autocast_copies=bwd_cast, logits_loss=loss["head_backward"],
                               gradients=g_head, temporary=head_tmp + N * cfg.hidden_size * c)
    # the last block (most activations held), the first (most gradients), the last checkpointed one (the first to
    # recompute) and the first plain one
    for k in sorted({L - 1, 0, n_ck - 1, n_ck} & set(range(L)), reverse=True):
        recompute = (a_first - cut_first if k == 0 else a_blk - cut) if k < n_ck else 0
        ph[f"block{k}_backward"] = dict(
            activations=held(k + 1) + recompute + shared, autocast_copies=cast_held(k + 1), logits_loss=logits,
            gradients=g_head + (L - k) * g_blk, temporary=trans[tile if k < n_ck else None])
    ph["backward_end"] = dict(activations=0, autocast_copies=0, logits_loss=logits, gradients=P.grads_full,
                              temporary=g_embed if cfg.tie_word_embeddings and full else 0)  # dE, added
    # fused AdamW and torchao's 8-bit AdamW: no full-size temporaries
    ph["optimizer_step"] = dict(activations=0, autocast_copies=0, logits_loss=0, gradients=P.grads_full, temporary=0)
    detail = dict(block_saved_bytes=a_blk, first_block_saved_bytes=a_first, block_saved_by_op=per_op,
                  shared_saved_bytes=shared, head_saved_bytes=head, gradients_full_bytes=P.grads_full,
                  autocast_copies_forward_bytes=L * cast_blk + cast_head, tiled_mlp_saving_bytes=cut)
    return ph, detail


def _generate(e: EstimateInput, c: int, persistent: dict, detail: dict) -> dict:
    """Generation: weights + a KV cache (L layers x k and v, (B, nkv, context, hd)) + the prefill's logits
    (B, S, V) and its largest no-grad intermediate (the MLP's gate, up and product, (B, S, f) each)."""
    cfg, batch, seq = e.cfg, e.batch, e.seq
    ctx = e.context or seq
    if not isinstance(ctx, int) or ctx <= 0:
        raise ConfigError(f"context must be a positive integer, got {e.context!r}")
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


def estimate(spec: EstimateInput | ModelConfig, *args: Any, **kw: Any) -> dict:
    """Predict the peak of `torch.cuda.max_memory_allocated` over one steady-state training step (forward, backward,
    optimizer step; optimizer state already allocated), or over generation with `generate=True`.

    Args:
        spec: an `EstimateInput`, or a `ModelConfig` followed by EstimateInput's other fields (positional or named).
    Returns:
        dict with `total_bytes`, one `<component>_bytes` key per component at the peak (weights, trainable,
        gradients, optimizer, activations, autocast_copies, logits_loss, temporary, workspace, kv_cache),
        `static_bytes` (weights + trainable + all gradients + optimizer states: the "before activations" figure),
        `peak_phase`, `dominant`, `host_bytes` (pinned CPU memory used by offloading) and `detail`.
    Raises:
        ConfigError: unknown method / precision / optimizer / dtype, or a non-positive batch or seq.
    """
    e = spec if isinstance(spec, EstimateInput) else EstimateInput(spec, *args, **kw)
    e.validate()
    if e.gpus > 1 and e.chunked_loss:  # FSDP2 runs take the loss from the full logits (train/dist_run.py)
        e = dataclasses.replace(e, chunked_loss=False)
    b = _resolve(e)
    P = _parameters(e, b)
    static = P.weights + P.quant_tables + P.adapters + P.grads_full + P.optim
    detail: dict = {"params": sum(p.numel for p in P.table), "trainable_params": sum(n for n, _ in P.trainable),
                    "weight_format": b.qfmt or b.base, "compute_dtype": b.comp if b.autocast else b.base,
                    "quant_tables_bytes": P.quant_tables}
    persistent = {"weights": P.weights + P.quant_tables, "trainable": P.adapters, "optimizer": P.optim,
                  "workspace": e.workspace_bytes}
    if e.generate:
        return _generate(e, b.c, persistent, detail)
    if e.params_override is not None:  # no architecture to walk: the static figure only
        out = {f"{k}_bytes": v for k, v in persistent.items()}
        out.update(gradients_bytes=P.grads_full, static_bytes=static, host_bytes=P.host, peak_phase="static",
                   detail=detail)
        out["total_bytes"] = sum(v for k, v in out.items() if k.endswith("_bytes") and k not in
                                 ("static_bytes", "host_bytes"))
        out["dominant"] = max((k for k in persistent), key=lambda k: out[f"{k}_bytes"])
        return out
    phases, act_detail = _phases(e, b, P)
    if e.gpus > 1:
        detail.update(shard_over_gpus(e, b, P, persistent, phases, _owners(P.table, e.method, P.targets)))
        static = -(-static // e.gpus)
    totals = {k: sum(v.values()) + sum(persistent.values()) for k, v in phases.items()}
    peak = max(totals, key=totals.get)
    out = {f"{k}_bytes": v for k, v in persistent.items()}
    out.update({f"{k}_bytes": v for k, v in phases[peak].items()})
    out["kv_cache_bytes"] = 0
    out["total_bytes"] = totals[peak]
    comps = {k: v for k, v in out.items() if k.endswith("_bytes") and k != "total_bytes"}
    out["dominant"] = max(comps, key=comps.get).removesuffix("_bytes")
    a_blk = act_detail["block_saved_bytes"]
    L, Nd = e.cfg.num_hidden_layers, e.batch * e.seq * e.cfg.hidden_size * b.wb
    host = P.host + (L * a_blk if e.offload == "activations" else 0) + (L * Nd if e.grad_ckpt == "offload" else 0)
    out.update(static_bytes=static, host_bytes=host, peak_phase=peak)
    detail.update(act_detail, phases=totals)
    out["detail"] = detail
    return out
