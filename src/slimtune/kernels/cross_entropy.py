"""Chunked LM head + next-token cross-entropy (issue 12) that never builds the (B, T, V) logits: the summed loss of
`slimtune.train.loss.causal_lm_loss(hidden @ W^T + b, labels)` and its gradients, chunk by chunk.

The loss is a scalar, so its gradients are formed during the forward (Liger Kernel's design): for each chunk of
rows, logits z = h W^T + b (chunk, V) in the compute dtype, then per row lse = logsumexp(z) (fp32), loss =
lse - z[t], and dL/dz = softmax(z) - onehot(t) (zero for ignored rows) written in place over z; then
dL/dh = dz W, dL/dW += dz^T h, dL/db += sum_rows dz. Backward only scales them by the incoming gradient.
Memory: the reference keeps (B, T, V) logits in the compute dtype, an fp32 copy and its fp32 gradient
(10 bytes a logit in bf16: 5.3 GB at 4k tokens of a 128k vocabulary); here one (chunk, V) buffer, plus the
gradients of h (and W) that the backward would produce anyway. The Triton kernel does the per-row softmax in two
passes over the chunk's logits; the PyTorch path (CPU, kernels off) makes one fp32 copy of a chunk.
"""
from __future__ import annotations

import torch
from torch import Tensor

from slimtune.data.tokenize import IGNORE_INDEX
from slimtune.kernels import cast, enabled, interpreting, jit

tl = None  # triton.language, bound when a kernel is first launched (slimtune.kernels.jit)
CHUNK_VALUES = 1 << 27  # default chunk: about this many logits (256 MB in bf16)
BLOCK = 4096  # vocabulary entries per step of the Triton kernel


@jit
def _ce_rows(Z, TARGET, LOSS, stride, ignore, V: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
             EMULATE_RNE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z = Z + row * stride
    t = tl.load(TARGET + row)
    m = float("-inf")  # running max and sum of exp(z - max): one pass (online softmax, Milakov & Gimelshein 2018)
    s = 0.0
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(z + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    valid = t != ignore
    zt = tl.load(z + t, mask=valid, other=0.0).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - zt, 0.0))
    if WRITE_GRAD:  # dL/dz = softmax - onehot, over the logits (read above before being overwritten)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(z + cols, mask=cols < V, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            g = tl.where(valid, tl.where(cols == t, p - 1.0, p), 0.0)
            tl.store(z + cols, cast(g, Z.dtype.element_ty, EMULATE_RNE), mask=cols < V)


def _rows_reference(z: Tensor, target: Tensor, loss: Tensor, write_grad: bool) -> None:
    """PyTorch version of `_ce_rows` on a chunk: loss (n,) fp32 and, if asked, z <- softmax(z) - onehot(t)."""
    x = z.to(loss.dtype)  # (n, V): the one fp32 copy of a chunk (fp64 for fp64 input)
    lse = torch.logsumexp(x, -1)
    valid = target != IGNORE_INDEX
    t = target.clamp(min=0)[:, None]
    loss.copy_(torch.where(valid, lse - x.gather(1, t)[:, 0], 0.0))
    if write_grad:
        x.sub_(lse[:, None]).exp_()
        x.scatter_add_(1, t, torch.full_like(x[:, :1], -1.0))
        z.copy_(x.mul_(valid[:, None]))


def _shifted_targets(labels: Tensor) -> Tensor:
    """(B * T,) targets of the flattened positions: labels[b, t + 1], and IGNORE at each row's last position."""
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], 1).reshape(-1)


def default_chunk(vocab: int) -> int:
    """Rows per chunk: the power of two (16 to 4096) nearest below CHUNK_VALUES / vocab."""
    return max(16, min(4096, 1 << max(0, (CHUNK_VALUES // max(vocab, 1)).bit_length() - 1)))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk: int,
                kernel: bool) -> tuple[Tensor, Tensor]:
        d = hidden.shape[-1]
        h = hidden.reshape(-1, d)  # (N, d), a view for a contiguous hidden
        tgt = _shifted_targets(labels)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad = need_h or need_w or need_b
        N, V = h.shape[0], weight.shape[0]
        losses = torch.empty(N, dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)  # fp32 (fp64 in)
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = torch.zeros(V, dtype=losses.dtype, device=h.device) if need_b else None
        for s in range(0, N, chunk):
            hc = h[s:s + chunk]
            z = hc @ weight.t() if bias is None else torch.addmm(bias.to(hc.dtype), hc, weight.t())  # (n, V)
            if kernel:
                _ce_rows[(hc.shape[0],)](z, tgt[s:s + chunk], losses[s:s + chunk], z.stride(0), IGNORE_INDEX, V=V,
                                         WRITE_GRAD=grad, BLOCK=min(BLOCK, 1 << (V - 1).bit_length()),
                                         EMULATE_RNE=interpreting(), num_warps=8)
            else:
                _rows_reference(z, tgt[s:s + chunk], losses[s:s + chunk], grad)
            if need_h:
                torch.mm(z, weight, out=gh[s:s + chunk])  # (n, d)
            if need_w:
                gw.addmm_(z.t(), hc)  # (V, d), accumulated in the weight's dtype (as Liger)
            if need_b:
                gb += z.sum(0, dtype=gb.dtype)
            del z
        ctx.grads = (gh, gw, None if gb is None else gb.to(bias.dtype))
        ctx.shape = hidden.shape
        count = (tgt != IGNORE_INDEX).sum()
        ctx.mark_non_differentiable(count)
        return losses.sum(), count

    @staticmethod
    def backward(ctx, go: Tensor, _count_grad: Tensor | None):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward ran twice (retain_graph is not supported); its "
                               "gradients are computed once, in forward")
        grads, ctx.grads = ctx.grads, None
        gh, gw, gb = (None if g is None else g.mul_(go) for g in grads)  # dL/dx = go * (forward's dloss/dx)
        return None if gh is None else gh.view(ctx.shape), gw, gb, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int | None = None,
                         bias: Tensor | None = None, kernels: bool | str | None = None) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy of the logits hidden @ weight^T + bias, and the number of predicted tokens,
    exactly as `causal_lm_loss` (position t predicts labels[:, t + 1]; -100 ignored), never holding more than
    `chunk_tokens` rows of logits.

    Args:
        hidden: (B, T, d) final hidden states (bf16 / fp16 / fp32), weight: (V, d) the LM head (trainable or not,
            tied to the embeddings or not), labels: (B, T) int64, bias: (V,) or None.
        chunk_tokens: rows of logits per chunk (default `default_chunk(V)`: 1024 for a 128k vocabulary).
        kernels: False / "off" forces the PyTorch path (the Triton kernel runs on CUDA otherwise).
    Returns:
        (loss_sum: fp32 scalar, count: int64 scalar); gradients flow to hidden, weight and bias as they require.
    Raises:
        ValueError: shapes or dtypes that disagree.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2] or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and labels "
                         f"{tuple(labels.shape)} must be (B, T, d), (V, d) and (B, T)")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype} but the LM head weight is {weight.dtype}")
    chunk = chunk_tokens or default_chunk(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, chunk, enabled(hidden.device, kernels))
