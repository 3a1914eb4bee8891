"""Bytes of the tensors autograd saves for backward in slimtune's `Decoder`, counted operation by operation.

Each rule names the op and what PyTorch's derivative formula keeps (autograd saves an input only when the gradient
that needs it is required): `linear` keeps its input (for dW) and its weight (for dx); `pow`/`mul` of RMSNorm keep the
fp32 upcast and the 1/rms; `silu` keeps its input; `a * b` keeps both; flash / memory-efficient SDPA keeps q, k, v,
the output and the fp32 logsumexp; `log_softmax` keeps its output. Tensors shared by several ops count once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from slimtune.models.config import ModelConfig

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                 "gate_up_proj")  # the last two: Phi-3's fused projections


@dataclass
class Regime:
    """Bytes per element of each activation stream, and who trains.

    resid: the residual stream (the embedding's dtype; RoPE's cos/sin share it). compute: matmul / SDPA outputs (the
    autocast dtype, else the weights'). norm_out: RMSNorm outputs = promote(norm weight, resid). autocast: a linear
    whose input dtype differs from `compute` casts it, one copy per linear. adapter: bytes of the LoRA weights.
    trainable: names of block linears whose base weight trains; adapters: block linear -> LoRA rank; norms / embed /
    head: those parameters train. attention: 'flash' | 'efficient' | 'math'. lora_dropout > 0 adds a dropout output
    and mask per adapter.
    """

    resid: int
    compute: int
    norm_out: int
    autocast: bool = False
    adapter: int = 4
    dropout_mask: int = 1  # bytes per element of dropout's saved mask: 1 (CUDA, bool); 0 = the input's dtype (CPU)
    trainable: frozenset = frozenset()
    adapters: dict = field(default_factory=dict)
    norms: bool = False
    embed: bool = False
    head: bool = False
    attention: str = "flash"
    lora_dropout: float = 0.0
    kernels: bool = False  # the CUDA path of slimtune.kernels (block_saved_kernels)

    def saves_input(self, name: str) -> bool:
        return name in self.trainable or name in self.adapters


def _dims(cfg: ModelConfig) -> tuple[int, int, int, int, int]:
    hd = cfg.head_dim
    return cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, hd


def norm_saved(rows: int, dim: int, x_bytes: int, weight_trains: bool, x_grad: bool,
               offset: bool = False) -> dict[str, int]:
    """RMSNorm y = w * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype): pow and mul keep the fp32 x (rows, dim) and
    mul keeps 1/rms (rows, 1) when x needs a gradient; w * xn keeps xn (rows, dim) in x's dtype when w trains.
    Gemma's `offset` form (xn * (1 + w)).to(x.dtype) keeps xn in fp32, and the fp32 (1 + w) (dim,) when x needs one."""
    out = {}
    if x_grad:
        out["norm_x_fp32"] = rows * dim * 4
        out["norm_rsqrt"] = rows * 4
        if offset:
            out["norm_one_plus_w"] = dim * 4
    if weight_trains:
        out["norm_xn"] = rows * dim * (4 if offset else x_bytes)
    return out


def _linear_inputs(names: tuple[str, ...], rows: int, dim: int, in_bytes: int, r: Regime,
                   x_counted: bool = False, x_grad: bool = True) -> int:
    """Inputs kept by the linears `names` that share one input x (q/k/v, or gate/up, or one linear).

    A trained base linear keeps x (or, under autocast with x not in the compute dtype, its own cast copy). A LoRA
    adapter computes A(dropout(x.to(A.dtype))): it shares x when nothing changes it; otherwise it keeps its own tensor
    (the upcast, the dropout output, or autocast's copy of them in the compute dtype), plus dropout's mask (bool on
    CUDA's fused dropout; on the CPU a noise tensor in x's dtype), kept only when x needs a gradient. x_counted: x is
    already kept by another op.
    """
    el = rows * dim
    cast = r.autocast and in_bytes != r.compute
    base = sum(1 for n in names if n in r.trainable)
    shared = base > 0 and not cast
    total = base * el * r.compute if cast else 0
    for n in names:
        if n not in r.adapters:
            continue
        a_in = r.adapter  # x.to(A.weight.dtype): a new tensor unless the dtypes agree
        if r.lora_dropout > 0 and x_grad:
            total += el * (r.dropout_mask or a_in)
        if r.autocast and a_in != r.compute:
            total += el * r.compute
        elif a_in != in_bytes or r.lora_dropout > 0:
            total += el * a_in
        else:
            shared = True
    return total + (el * in_bytes if shared and not x_counted else 0)


def block_saved(cfg: ModelConfig, batch: int, seq: int, r: Regime, x_grad: bool = True) -> dict[str, int]:
    """Saved-for-backward bytes of one decoder block, by op (keys sum to the block's total).

    x_grad: whether the block input needs a gradient (False for the first block when the embedding is frozen).
    """
    if r.kernels and not r.trainable and r.lora_dropout == 0 and kernels_modelled(cfg):
        return block_saved_kernels(cfg, batch, seq, r, x_grad)
    d, f, qd, kvd, hd = _dims(cfg)
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    N, c = batch * seq, r.compute
    s: dict[str, int] = {}

    def add(key: str, v: int) -> None:
        if v:
            s[key] = s.get(key, 0) + v

    # attention half: x -> input_layernorm -> q/k/v -> (qk_norm) -> RoPE -> SDPA -> o_proj
    off = cfg.norm_offset
    for k, v in norm_saved(N, d, r.resid, r.norms, x_grad, off).items():
        add("attn_" + k, v)
    h_grad = x_grad or r.norms
    qkv = ("qkv_proj",) if cfg.fused_proj else ("q_proj", "k_proj", "v_proj")
    add("qkv_input", _linear_inputs(qkv, N, d, r.norm_out, r, x_grad=h_grad))
    for n in qkv + ("o_proj",):
        if n in r.adapters:  # lora_B keeps A's output (N, rank)
            add("lora_hidden", N * r.adapters[n] * (c if r.autocast else r.adapter))
    qkv_grad = h_grad or any(r.saves_input(n) for n in qkv)
    if cfg.qk_norm and qkv_grad:  # per-head RMSNorm over hd of q (N*nh rows) and k (N*nkv rows), input in `c`
        for k, v in {**norm_saved(N * nh, hd, c, r.norms, True, off)}.items():
            add("qk_" + k, v)
        for k, v in norm_saved(N * nkv, hd, c, r.norms, True, off).items():
            add("qk_" + k, v)
    # RoPE: q*cos and rotate_half(q)*sin keep only cos/sin (shared by all layers, counted in shared_saved)
    if cfg.attn_softcap:  # Gemma 2: models.attention.softcapped_attention, always the math path
        grads = [h_grad or any(r.saves_input(n) for n in (p, "qkv_proj")) for p in ("q_proj", "k_proj", "v_proj")]
        for k, v in softcap_saved(batch, nh, seq, N * qd, c, *grads).items():
            add(k, v)
    elif qkv_grad:
        if cfg.sliding_window and seq > cfg.sliding_window and not cfg.layer_types:  # SDPA keeps its mask as a bias
            add("sdpa_mask", batch * seq * seq * c)
        if r.attention == "math":  # q @ k^T (k expanded to nh heads), softmax keeps (B, nh, T, T), @ v keeps both
            add("sdpa_qkv", N * (qd + qd + qd) * c)
            add("sdpa_probs", batch * nh * seq * seq * c)
        else:
            # fused qkv_proj (Phi-3): v is a view of the whole (N, q + 2 kv) output, which stays alive with it
            add("sdpa_qkv", N * (qd + 2 * kvd + (qd + kvd if cfg.fused_proj else 0)) * c)
            lse_t = seq if r.attention == "flash" else -(-seq // 32) * 32
            add("sdpa_logsumexp", batch * nh * lse_t * 4)
        add("sdpa_out", N * qd * c)  # also o_proj's input (same storage)
    add("o_input", _linear_inputs(("o_proj",), N, qd, c, r, x_counted=qkv_grad and not cfg.attn_softcap))
    # MLP half: x1 -> post_attention_layernorm -> gate/up -> act -> * -> down
    x1_grad = qkv_grad or any(r.saves_input(n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"))
    for k, v in norm_saved(N, d, r.resid, r.norms, x1_grad, off).items():
        add("mlp_" + k, v)
    if cfg.mlp_gated:
        gate_up = ("gate_up_proj",) if cfg.fused_proj else ("gate_proj", "up_proj")
        add("gate_up_input", _linear_inputs(gate_up, N, d, r.norm_out, r))
        add("act_input", N * f * c)  # silu keeps gate's output
        add("act_out_and_up", 2 * N * f * c)  # act(g) * u keeps both factors
    else:
        add("gate_up_input", _linear_inputs(("up_proj",), N, d, r.norm_out, r))
        add("act_input", N * f * c)
    for n in ("gate_proj", "up_proj", "gate_up_proj", "down_proj"):
        if n in r.adapters:
            add("lora_hidden", N * r.adapters[n] * (c if r.autocast else r.adapter))
    add("down_input", _linear_inputs(("down_proj",), N, f, c, r))
    if cfg.sandwich_norm:  # Gemma: the attention's and the MLP's outputs (in `c`) are normed too
        for k, v in norm_saved(N, d, c, r.norms, True, off).items():
            add("post_" + k, 2 * v)
    return s


def softcap_saved(batch: int, nh: int, seq: int, q_el: int, c: int, q_grad: bool, k_grad: bool,
                  v_grad: bool) -> dict[str, int]:
    """Saved by one layer's soft-capped math attention (`models.attention.softcapped_attention`), q_el = N * nh * hd:
    q @ k^T keeps q when k needs a gradient and the head-expanded k when q does; then, when the scores need one,
    tanh's output, the mask (bool) and the fp32 probabilities; p @ v keeps the expanded v when p needs a gradient
    and p (the fp32 probabilities, or their cast to `c`) when v does."""
    probs, scores = batch * nh * seq * seq, q_grad or k_grad
    out = {"sdpa_q": q_el * c if k_grad else 0, "sdpa_k_expanded": q_el * c if q_grad else 0}
    if scores:
        out.update(softcap_tanh=probs * c, softcap_mask=seq * seq, sdpa_v_expanded=q_el * c)
    if scores or (v_grad and c == 4):
        out["sdpa_probs"] = probs * 4
    if v_grad and c != 4:
        out["sdpa_probs_cast"] = probs * c
    return out


def shared_saved(cfg: ModelConfig, batch: int, seq: int, r: Regime) -> dict[str, int]:
    """Saved once per forward: token ids (int64, by the embedding) and RoPE's cos and sin (B, T, hd) in resid dtype."""
    out = {"token_ids": batch * seq * 8} if r.embed else {}
    if not cfg.learned_positions:
        out["rope_cos_sin"] = 2 * batch * seq * cfg.head_dim * r.resid
    return out


def head_saved(cfg: ModelConfig, batch: int, seq: int, r: Regime, chunked: bool = False) -> dict[str, int]:
    """The final norm and lm_head: fp32 x and 1/rms (+ xn if the norm trains), lm_head's input if the head trains.
    With the kernels: x and 1/rms. With the chunked loss the head is not an autograd op (its gradients are formed in
    the loss's forward: `estimate` counts them there)."""
    N, d = batch * seq, cfg.hidden_size
    if r.kernels and not cfg.norm_offset:
        s = {"final_norm_x": N * d * r.resid, "final_norm_rstd": N * 4}
    else:
        s = {"final_" + k: v for k, v in norm_saved(N, d, r.resid, r.norms, True, cfg.norm_offset).items()}
    if r.head and not chunked:
        cast = r.autocast and r.norm_out != r.compute
        s["head_input"] = N * d * (r.compute if cast else r.norm_out)
    if cfg.final_softcap:  # tanh keeps its output, the logits' size
        s["final_softcap"] = N * cfg.vocab_size * r.compute
    return s


def block_backward_transient(cfg: ModelConfig, batch: int, seq: int, r: Regime, tile: int | None = None) -> int:
    """The largest set of activation gradients alive at once inside one block's backward (beyond its saved tensors).

    MLP: dL/dm (N, f) exists while dL/d(act) and dL/du (N, f) are formed, and m is already freed: + 2 N f; with the
    tiled MLP (`tile` tokens per piece, seq > tile) those are one piece's, batch * tile rows.
    Attention (flash backward): dq, dk, dv plus an fp32 dq accumulator (N, q) and, with grouped heads, dk/dv expanded
    to all heads (N, q) each before the reduction, less what the MLP half's backward has freed by then (returned
    relative to the block's saved tensors, so a negative attention term never counts). Both also hold dL/dx (N, d).
    """
    d, f, qd, kvd, _ = _dims(cfg)
    N, c = batch * seq, r.compute
    rows = batch * min(seq, tile or seq)  # the MLP's rows at once
    mlp = 2 * rows * f * c if cfg.mlp_gated else rows * f * c
    attn = N * (qd + 2 * kvd) * c + N * qd * 4
    if cfg.num_key_value_heads != cfg.num_attention_heads:
        attn += 2 * N * qd * c
    if r.attention == "math" or cfg.attn_softcap:  # soft-capped attention always runs the math path
        attn += 2 * batch * cfg.num_attention_heads * seq * seq * c
    # attention's backward runs after the MLP half's, whose nodes have freed what they saved: at least the MLP's (N, d)
    # input and the second norm's input and 1/rms (the (N, f) ones too, which only the untiled MLP still holds, and
    # there the MLP's moment is the larger one anyway)
    freed = N * d * (r.resid + r.norm_out) + N * 4
    return max(mlp, attn - freed) + N * d * c


def tiled_mlp_saving(cfg: ModelConfig, batch: int, seq: int, tile: int | None, r: Regime,
                     x_grad: bool = True) -> int:
    """Bytes fewer that a recomputed block holds in its backward when its MLP runs in pieces of `tile` tokens
    (`models.layers.MLP.tile`; 0 when seq <= tile or tile is None): the MLP's (N, f)-sized saved tensors (gate, up,
    their product, down's input) are then one piece's (batch * tile rows) at a time. They are
    the part of `block_saved` that grows with f (the block with f = 0 keeps the rest: attention, the norms, the MLP's
    (N, d) input, which the pieces' checkpoints keep as views); the pieces' outputs are (N, d), as the MLP's."""
    if not tile or seq <= tile:
        return 0
    no_f = dataclasses.replace(cfg, intermediate_size=0)

    def f_part(s: int) -> int:
        return sum(block_saved(cfg, batch, s, r, x_grad).values()) - sum(block_saved(no_f, batch, s, r,
                                                                                     x_grad).values())
    return f_part(seq) - f_part(tile)


def kernels_modelled(cfg: ModelConfig) -> bool:
    """Whether `block_saved_kernels` describes these blocks (plain RMSNorm, separate projections, SwiGLU: Llama,
    Mistral, Qwen); Gemma's and Phi-3's keep the generic rules there (counted for the PyTorch path)."""
    return not (cfg.norm_offset or cfg.sandwich_norm or cfg.attn_softcap or cfg.fused_proj) and cfg.hidden_act == "silu"


def block_saved_kernels(cfg: ModelConfig, batch: int, seq: int, r: Regime, x_grad: bool = True) -> dict[str, int]:
    """`block_saved` on the path of `slimtune.kernels` (a frozen base, no dropout): the RMSNorm kernels keep their input
    and 1/rms; q,k,v, o, gate,up and down are each one LoRA Function keeping its input, x A^T (N, R) and the cast
    factors; RoPE keeps only cos / sin (shared); v is a view of the q,k,v output, so attention keeps that whole output
    besides the rotated q and k; SwiGLU keeps the gate|up output; o's input is a copy of the attention output."""
    d, f, qd, kvd, hd = _dims(cfg)
    N, c = batch * seq, r.compute
    s: dict[str, int] = {}

    def add(key: str, v: int) -> None:
        if v:
            s[key] = s.get(key, 0) + v

    def lora(names: tuple[str, ...], d_in: int, outs: tuple[int, ...], x_bytes: int, x_grad: bool) -> bool:
        """One fused projection group: returns whether its Function was recorded (its output needs a gradient)."""
        ranks = [(r.adapters[n], o) for n, o in zip(names, outs) if n in r.adapters]
        if not (x_grad or ranks):
            return False
        add("proj_inputs", N * d_in * x_bytes)
        add("lora_xa", N * sum(k for k, _ in ranks) * c)
        add("lora_factors_cast", sum(k * (d_in + o) for k, o in ranks) * c)
        return True

    if x_grad or r.norms:
        add("norm_x", N * d * r.resid)
        add("norm_rstd", N * 4)
    qkv = lora(("q_proj", "k_proj", "v_proj"), d, (qd, kvd, kvd), r.norm_out, x_grad or r.norms)
    if qkv:
        if cfg.qk_norm:  # the per-head norm kernels keep views of the q,k,v output (counted below) and 1/rms
            add("qk_norm_rstd", N * (cfg.num_attention_heads + cfg.num_key_value_heads) * 4)
        add("sdpa_qkv", N * (qd + kvd) * c + N * (qd + 2 * kvd) * c)  # rotated q, k + the projection output (v)
        lse_t = seq if r.attention == "flash" else -(-seq // 32) * 32
        add("sdpa_logsumexp", batch * cfg.num_attention_heads * lse_t * 4)
        add("sdpa_out", N * qd * c)
    o = lora(("o_proj",), qd, (d,), c, qkv)
    if qkv or o or r.norms:
        add("norm_x", N * d * r.resid)
        add("norm_rstd", N * 4)
    names = ("gate_proj", "up_proj") if cfg.mlp_gated else ("up_proj",)
    gu = lora(names, d, (f,) * len(names), r.norm_out, qkv or o or r.norms)
    if gu:
        add("act_gate_up", len(names) * N * f * c)
    lora(("down_proj",), f, (d,), c, gu)
    return s


def loss_bytes(e: Any, b: Any, full: bool, N: int) -> dict[str, int]:
    """Bytes the loss holds at each phase of the step (the `logits_loss` component; "kept": what stays afterwards).

    Full logits (train.loss.causal_lm_loss): the (N, V) logits in the compute dtype, then logits[:, :-1].float(),
    log_softmax's fp32 output and, in backward, two fp32 (N, V) gradients. Chunked (train.loss.lm_head_loss): one
    (chunk, V) block of logits in the compute dtype, overwritten by its gradient in place (the Triton kernel), the
    per-token losses, dL/dh (N, d) formed in the forward, and for a trained head dL/dW (V, d) plus the cast of an
    fp32 head to the compute dtype. `e`: the `estimate.EstimateInput`, `b`: its resolved byte sizes; N tokens.
    """
    from slimtune.kernels.cross_entropy import default_chunk

    c, V, d = b.c, e.cfg.vocab_size, e.cfg.hidden_size
    kept = N * V * c if e.keep_logits else 0
    if e.chunked_loss:
        chunk = min(N, e.loss_chunk or default_chunk(V))
        head = V * d * c * (2 if b.wb != c else 1) if full else 0  # dL/dW (+ the cast copy of an fp32 head)
        gh = N * d * c
        return {"kept": 0, "forward_end": 0, "loss_forward": chunk * V * c + N * 4 + gh + head,
                "loss_backward": gh + head, "head_backward": gh}
    NVp = e.batch * (e.seq - 1) * V
    logp = NVp * 4 + N * 8 + 4  # log_softmax's fp32 output; nll_loss keeps the int64 targets and the weight sum
    upcast = NVp * 4 if c != 4 else 0  # the fp32 copy, alive while log_softmax runs
    return {"kept": kept, "forward_end": N * V * c, "loss_forward": N * V * c + upcast + logp,
            "loss_backward": kept + logp + 2 * NVp * 4, "head_backward": kept + N * V * c}
