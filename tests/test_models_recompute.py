"""Activation checkpointing of the decoder blocks: the offloaded form (block inputs in host memory, recomputed in a
reentrant backward) gives bitwise the gradients of PyTorch's non-reentrant checkpoint on the CPU, with dropout (its
RNG replayed), with a first block whose input needs no gradient, for LoRA and full fine-tuning, and through the loop;
under plain checkpointing the recompute stops before the down projection's base product (`base_last`)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from slimtune.models.decoder import Decoder, init_weights
from slimtune.models.shapes import get_shape


def model(lora: bool, seed: int = 0) -> Decoder:
    m = init_weights(Decoder(get_shape("tiny-qwen3")), seed).train()
    if lora:
        from slimtune.peft import apply_method, freeze_base

        torch.manual_seed(seed)
        apply_method(m, {"method": "lora", "r": 4, "target_modules": "all-linear", "lora_dropout": 0.2,
                         "init_lora_weights": False})
        freeze_base(m)
    return m


def grads(m: Decoder, mode, seed: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    m.grad_ckpt = mode
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m.config.vocab_size, (2, 20), generator=g)
    torch.manual_seed(11)  # the same dropout masks for every mode
    logits = m(ids).float()
    loss = F.cross_entropy(logits.flatten(0, 1), torch.randint(0, m.config.vocab_size, (40,), generator=g))
    loss.backward()
    out = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    return loss.detach(), out


@pytest.mark.parametrize("lora", [True, False])
def test_offloaded_checkpoint_equals_plain_checkpoint_bitwise(lora):
    m = model(lora)
    loss_ref, ref = grads(m, True)
    loss_off, off = grads(m, "offload")
    loss_none, none = grads(m, False)
    assert set(ref) == set(off) and len(ref) > 0
    if lora:  # every block's adapters get gradients, the first block's too (its input needs none)
        assert any(".layers.0." in n for n in off)
    assert torch.equal(loss_ref, loss_off)
    for n in ref:
        assert torch.equal(ref[n], off[n]), n
        torch.testing.assert_close(none[n], ref[n], rtol=1e-5, atol=1e-6)  # and both agree with no checkpointing
    assert torch.equal(loss_none, loss_ref)


class _DownProducts(TorchDispatchMode):
    """Counts the products (M, f) @ (f, d): the down projections' base matmuls (forward and recompute) and the
    gate / up input gradients (g (M, f) @ W (f, d), backward)."""

    def __init__(self, f: int, d: int) -> None:
        super().__init__()
        self.f, self.d, self.n = f, d, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        i = {torch.ops.aten.mm.default: 0, torch.ops.aten.addmm.default: 1, torch.ops.aten.addmm_.default: 1}.get(func)
        if i is not None and args[i].shape[-1] == self.f and args[i + 1].shape[-1] == self.d:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_recompute_skips_the_down_base_product():
    """Fused LoRA projections (kernels forced on): with base_last the checkpoint's recompute, which stops at the last
    saved tensor, never runs the down projection's base matmul - L products fewer - and the gradients (dropout
    masks replayed) are those of the plain order."""
    from slimtune import kernels

    with kernels.use("on"):
        m = model(True)
        L, f, d = m.config.num_hidden_layers, m.config.intermediate_size, m.config.hidden_size
        with _DownProducts(f, d) as last:
            loss_last, g_last = grads(m, True)
        assert all(layer.mlp.base_last for layer in m.model.layers)
        m._set_tiles = lambda: None  # keep base_last off for the next run
        for layer in m.model.layers:
            layer.mlp.base_last = False
        with _DownProducts(f, d) as first:
            loss_first, g_first = grads(m, True)
    assert first.n - last.n == L > 0
    torch.testing.assert_close(loss_last, loss_first, rtol=1e-6, atol=1e-6)
    assert set(g_last) == set(g_first)
    for n in g_first:
        torch.testing.assert_close(g_last[n], g_first[n], rtol=1e-5, atol=1e-6)
    m2 = model(False)
    m2.grad_ckpt = "offload"  # the reentrant form reruns whole blocks: nothing to gain, the plain order
    assert not any(layer.mlp.base_last for layer in m2.model.layers)


def test_host_buffers_are_reused_across_steps():
    m = model(True)
    grads(m, "offload")
    first = {i: b.data_ptr() for i, b in m._host_pool.buffers.items()}
    grads(m, "offload", seed=4)
    assert len(first) == m.config.num_hidden_layers
    assert {i: b.data_ptr() for i, b in m._host_pool.buffers.items()} == first


def test_eval_and_no_grad_do_not_checkpoint():
    m = model(True)
    m.grad_ckpt = "offload"
    with torch.no_grad():
        y = m(torch.randint(0, 300, (1, 8)))
    assert y.shape == (1, 8, m.config.vocab_size) and not m._host_pool.buffers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: the offload copies on side streams, bf16")
def test_offloaded_checkpoint_on_cuda_within_bf16_tolerance():
    """On the GPU, in bf16: offloaded checkpointing (copies to pinned memory on a side stream, prefetched back) gives
    the loss and gradients of plain checkpointing within bf16 rounding (rtol 1.6e-2, atol 1e-3)."""
    m = model(True).to("cuda", torch.bfloat16)
    for p in m.parameters():
        p.grad = None
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, m.config.vocab_size, (2, 20), generator=g).cuda()

    def run(mode):
        m.grad_ckpt = mode
        torch.manual_seed(11)
        loss = F.cross_entropy(m(ids).float().flatten(0, 1), ids.flatten())
        loss.backward()
        out = {n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None}
        m.zero_grad(set_to_none=True)
        return loss.detach(), out

    (loss_ref, ref), (loss_off, off) = run(True), run("offload")
    assert set(ref) == set(off) and len(ref) > 0
    torch.testing.assert_close(loss_off, loss_ref, rtol=1.6e-2, atol=1e-3)
    for n in ref:
        torch.testing.assert_close(off[n], ref[n], rtol=1.6e-2, atol=1e-3, msg=n)
