"""Chunked linear + cross-entropy against `causal_lm_loss(hidden @ W^T + b, labels)`: loss, count and the gradients
of hidden, weight and bias (fp32 to 1e-6 on the PyTorch and the Triton path; float64 to 1e-12; bf16 within 1e-2 of
the float64 truth), with ignored labels (prompt masks, a fully masked row, packing), chunks of 1 row to more than
all, a tied weight, a frozen head, no grad; and no tensor of B*T*V values ever created (dispatch-mode count on the
CPU, allocator statistics on the GPU)."""
import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import DEV, needs_cuda, needs_triton, rel
from torch.utils._python_dispatch import TorchDispatchMode

from slimtune.train.loss import causal_lm_loss
from slimtune.kernels.cross_entropy import default_chunk, linear_cross_entropy

B, T, D, V = 2, 9, 16, 37


def _labels(device="cpu"):
    g = torch.Generator().manual_seed(4)
    lab = torch.randint(0, V, (B, T), generator=g)
    lab[0, :4] = -100  # a prompt
    lab[1, 6] = -100  # the first token of a packed example
    return lab.to(device)


def _grads(fn, h, W, b):
    """(loss_sum, count, grads of h, W, b) for the mean loss (loss_sum / count)."""
    h, W, b = (t.detach().requires_grad_() for t in (h, W, b))
    loss, count = fn(h, W, b)
    (loss / count).backward()
    return loss, count, h.grad, W.grad, b.grad


def _reference(lab):
    return lambda h, W, b: causal_lm_loss(F.linear(h, W, b), lab)


def _chunked(lab, chunk, kernels):
    return lambda h, W, b: linear_cross_entropy(h, W, lab, chunk, b, kernels=kernels)


def _inputs(dtype, device="cpu"):
    torch.manual_seed(0)
    return (torch.randn(B, T, D, device=device).to(dtype), torch.randn(V, D, device=device).to(dtype),
            torch.randn(V, device=device).to(dtype))


@pytest.mark.parametrize("chunk", [1, 5, 18, 100])
def test_pytorch_path_equals_causal_lm_loss(chunk):
    lab = _labels()
    got = _grads(_chunked(lab, chunk, "off"), *_inputs(torch.float32))
    want = _grads(_reference(lab), *_inputs(torch.float32))
    assert got[1] == want[1] == (lab[:, 1:] != -100).sum()
    for a, b in zip(got[:1] + got[2:], want[:1] + want[2:]):
        assert rel(a, b) < 1e-6


def test_float64_truth():
    lab = _labels()
    h, W, b = _inputs(torch.float64)

    def truth(h, W, b):  # F.cross_entropy in float64 (causal_lm_loss computes in fp32)
        z = F.linear(h, W, b)[:, :-1].reshape(-1, V)
        return F.cross_entropy(z, lab[:, 1:].reshape(-1), reduction="sum"), (lab[:, 1:] != -100).sum()

    got, want = _grads(_chunked(lab, 4, "off"), h, W, b), _grads(truth, h, W, b)
    for a, c in zip(got[:1] + got[2:], want[:1] + want[2:]):
        assert rel(a, c) < 1e-12


@needs_triton
@pytest.mark.parametrize("chunk", [3, 64])
def test_triton_path_fp32(chunk):
    lab = _labels(DEV)
    got = _grads(_chunked(lab, chunk, True), *_inputs(torch.float32, DEV))
    want = _grads(_reference(lab), *_inputs(torch.float32, DEV))
    assert got[1] == want[1]
    for a, b in zip(got[:1] + got[2:], want[:1] + want[2:]):
        assert rel(a, b) < 1e-6


@needs_triton
def test_triton_path_bf16_against_float64_truth():
    lab = _labels(DEV)
    inputs = _inputs(torch.bfloat16, DEV)
    got = _grads(_chunked(lab, 7, True), *inputs)
    ref = _grads(_reference(lab), *inputs)
    truth = _grads(_reference(lab), *(t.double() for t in inputs))
    for a, r, t in zip(got[:1] + got[2:], ref[:1] + ref[2:], truth[:1] + truth[2:]):
        assert a.dtype == r.dtype
        assert rel(a, t) < 1e-2 and rel(a, t) < 2 * rel(r, t) + 4e-3


def test_tied_frozen_no_grad_and_scaled():
    lab = _labels()
    h, W, _ = _inputs(torch.float32)
    ids = torch.randint(0, V, (B, T))

    def tied_grad(fn):  # the same weight embeds the inputs and scores the outputs; a scaled loss scales gradients
        emb = W.clone().requires_grad_()
        loss, _ = fn(F.embedding(ids, emb) + h, emb, None)
        (3 * loss).backward()
        return emb.grad

    assert rel(tied_grad(_chunked(lab, 4, "off")), tied_grad(_reference(lab))) < 1e-6
    frozen = W.clone()  # frozen head: only the hidden gradient
    hh = h.clone().requires_grad_()
    linear_cross_entropy(hh, frozen, lab, 4)[0].backward()
    assert hh.grad is not None and frozen.grad is None
    with torch.no_grad():
        loss, count = linear_cross_entropy(h, W, lab, 4)
    assert rel(loss, causal_lm_loss(F.linear(h, W), lab)[0]) < 1e-6


def test_backward_twice_raises():
    h = torch.randn(B, T, D, requires_grad=True)
    loss, _ = linear_cross_entropy(h, torch.randn(V, D), _labels(), 4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


class _Largest(TorchDispatchMode):
    """The largest number of values of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kernels", ["off", pytest.param(True, marks=needs_triton)])
def test_no_full_logits_tensor(kernels):
    lab = _labels(DEV)
    h, W, b = (t.requires_grad_() for t in _inputs(torch.float32, DEV))
    with _Largest() as m:
        loss, _ = linear_cross_entropy(h, W, lab, 4, b, kernels=kernels)
        loss.backward()
    assert m.largest <= max(4 * V, V * D, B * T * D) < B * T * V  # a chunk of logits, dW, dh
    with _Largest() as m:  # the check sees the reference's (B, T, V) logits
        causal_lm_loss(F.linear(h, W, b), lab)[0].backward()
    assert m.largest >= B * T * V


def test_default_chunk():
    assert default_chunk(128256) == 1024 and default_chunk(32000) == 4096 and default_chunk(10 ** 9) == 16


@needs_cuda
def test_gpu_memory_stays_below_one_fp32_logits_copy():
    """1 x 4096 tokens, vocabulary 32000, bf16: the peak above the inputs stays under half of one fp32 copy of the
    logits (the reference needs bf16 logits + fp32 copy + fp32 gradient: 2.5 copies)."""
    torch.manual_seed(0)
    Tn, Vn, d = 4096, 32000, 256
    h = torch.randn(1, Tn, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(Vn, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lab = torch.randint(0, Vn, (1, Tn), device="cuda")
    linear_cross_entropy(h, W, lab, 512)[0].backward()  # compile, cuBLAS workspaces
    h.grad = W.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, count = linear_cross_entropy(h, W, lab, 512)
    loss.backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < Tn * Vn * 4 / 2
