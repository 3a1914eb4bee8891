"""The tiled MLP (`layers.MLP.tile`, set by `Decoder.mlp_tile` under grad_ckpt): inside both block recomputes
(grad_ckpt=True and "offload") it gives the loss and the gradients of the model without tiling or checkpointing, with
LoRA dropout replayed piece by piece, and its backward holds one piece's (B, tile, f) intermediates whatever the
sequence length (measured on the CPU by following every storage of an MLP-sized tensor)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from test_models_recompute import grads as step_grads
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from slimtune.errors import ConfigError
from slimtune.models.decoder import Decoder, init_weights
from slimtune.models.recompute import MLP_TILE
from slimtune.models.shapes import get_shape

TILE = 6  # tokens per piece; the sequences below are 20 tokens: pieces of 6, 6, 6 and 2


def model(lora: bool, dropout: float = 0.0, seed: int = 0, f: int | None = None) -> Decoder:
    cfg = get_shape("tiny-qwen3")
    if f is not None:
        cfg = dataclasses.replace(cfg, intermediate_size=f)
    m = init_weights(Decoder(cfg), seed).train()
    if lora:
        from slimtune.peft import apply_method, freeze_base

        torch.manual_seed(seed)
        apply_method(m, {"method": "lora", "r": 4, "target_modules": "all-linear", "lora_dropout": dropout,
                         "init_lora_weights": False})
        freeze_base(m)
    return m


def grads(m: Decoder, mode, tile: int | None, seed: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and the gradients of one step on fresh random tokens (2 x 20), the same dropout seed every time."""
    m.mlp_tile = tile
    return step_grads(m, mode, seed)


def assert_same(ref: tuple, got: tuple) -> None:
    """The loss bitwise (each token's rows go through the same ops either way); every gradient within 1e-6: a
    weight's gradient sums over tokens, and the tiles add it up piece by piece into .grad (another fp32 summation
    order, differences of ~2e-8 here)."""
    (loss_ref, g_ref), (loss, g) = ref, got
    assert torch.equal(loss, loss_ref)
    assert set(g) == set(g_ref) and len(g) > 0
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("mode", [True, "offload"])
@pytest.mark.parametrize("lora", [True, False])
def test_tiled_mlp_equals_untiled(mode, lora):
    m = model(lora)
    ref = grads(m, False, None)
    got = grads(m, mode, TILE)
    assert all(layer.mlp.tile == TILE for layer in m.model.layers)
    assert_same(ref, got)
    assert not torch.equal(ref[0], grads(m, False, None, seed=4)[0])  # the loss depends on the data drawn


def untiled_pieces(m: Decoder, tile: int) -> None:
    """The reference for dropout: each MLP runs the same pieces in order (so draws the same dropout masks) with
    every intermediate kept, no checkpoint, nothing recomputed."""
    for layer in m.model.layers:
        mlp = layer.mlp
        mlp.forward = lambda x, mlp=mlp: torch.cat([mlp._mlp(p.contiguous()) for p in x.split(tile, -2)], -2)


@pytest.mark.parametrize("mode", [True, "offload"])
def test_tiled_mlp_replays_lora_dropout(mode):
    m = model(True, dropout=0.3)
    got = grads(m, mode, TILE)
    plain = grads(m, False, None)  # the whole sequence's dropout masks differ from the pieces'
    untiled_pieces(m, TILE)
    ref = grads(m, False, None)
    assert_same(ref, got)
    assert not torch.equal(plain[0], ref[0])


def test_train_config_sets_the_tile(tmp_path):
    from slimtune.data import sample_path
    from slimtune.train import load_config
    from slimtune.train.build import build_model

    def build(*keys: str) -> Decoder:
        cfg = load_config(None, [f"data={sample_path()}", "method=lora", "rank=4", "precision=fp32",
                                 f"out_dir={tmp_path}", *keys])
        return build_model(cfg, torch.device("cpu"))[0]

    assert {layer.mlp.tile for layer in build("grad_ckpt=offload").model.layers} == {MLP_TILE}
    assert {layer.mlp.tile for layer in build("grad_ckpt=true", "mlp_tile=16").model.layers} == {16}
    assert {layer.mlp.tile for layer in build("grad_ckpt=true", "mlp_tile=0").model.layers} == {None}
    assert {layer.mlp.tile for layer in build("mlp_tile=16").model.layers} == {None}  # no checkpointing
    with pytest.raises(ConfigError, match="mlp_tile must be >= 0"):
        build("mlp_tile=-1")


def test_decoder_sets_the_tile_only_under_checkpointing():
    m = model(True)
    assert m.mlp_tile == MLP_TILE and all(layer.mlp.tile is None for layer in m.model.layers)
    m.grad_ckpt = "offload"
    assert all(layer.mlp.tile == MLP_TILE for layer in m.model.layers)
    m.mlp_tile = None
    assert all(layer.mlp.tile is None for layer in m.model.layers)
    m.mlp_tile = 16
    m.grad_ckpt = False
    assert all(layer.mlp.tile is None for layer in m.model.layers)
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ConfigError, match="mlp_tile"):
            m.mlp_tile = bad


def test_short_sequences_and_eval_run_untiled():
    m = model(True, dropout=0.2)
    (l1, g1), (l2, g2) = grads(m, True, None), grads(m, True, 20)  # T == tile: the untiled path, bitwise
    assert torch.equal(l1, l2) and set(g1) == set(g2) and all(torch.equal(g1[n], g2[n]) for n in g1)
    m.grad_ckpt, m.mlp_tile = True, TILE
    ids = torch.randint(0, m.config.vocab_size, (1, 20))
    calls = []
    m.model.layers[0].mlp._tiled = lambda x, t: calls.append(t)
    m.eval()
    with torch.no_grad():
        m(ids)
    assert calls == []


class MLPBytes(TorchDispatchMode):
    """Peak bytes of live storages behind tensors whose last dim is f or 2f (gate, up, their product, their
    gradients, dropout's noise), leaving out those of `skip` rows (the (d, f) down_proj weight, its copies and
    gradient; the adapters' (r, f)); a storage counts while any tensor holds it."""

    def __init__(self, f: int, skip: tuple[int, ...]) -> None:
        super().__init__()
        self.f, self.skip, self.live, self.peak = f, skip, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] in (self.f, 2 * self.f) \
                    and t.shape[:-1].numel() not in self.skip:
                st = t.untyped_storage()
                self.live[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def mlp_peak(lora: bool, mode, T: int, tile: int | None) -> int:
    f = 1024  # the MLP dominates: its (B, T, f) tensors are 8x the (B, T, d) ones
    m = model(lora, dropout=0.1, f=f)
    m.grad_ckpt, m.mlp_tile = mode, tile
    ids = torch.randint(0, m.config.vocab_size, (2, T))
    with MLPBytes(f, skip=(4, m.config.hidden_size)) as probe:  # 2 x T rows: never 4 or 128
        m(ids).float().logsumexp(-1).mean().backward()
    return probe.peak


@pytest.mark.parametrize("mode", [True, "offload"])
@pytest.mark.parametrize("lora", [True, False])
def test_tiled_backward_holds_one_piece(lora, mode):
    one_piece = mlp_peak(lora, mode, 32, None)  # a 32-token sequence, untiled
    tiled_256, tiled_512 = mlp_peak(lora, mode, 256, 32), mlp_peak(lora, mode, 512, 32)
    untiled_256 = mlp_peak(lora, mode, 256, None)
    assert tiled_256 == tiled_512  # independent of the sequence length
    assert tiled_256 == one_piece  # one piece's working set
    assert untiled_256 == 8 * one_piece  # the whole sequence's (B, T, f) tensors


def test_estimator_counts_one_piece_of_the_mlp():
    from slimtune.memory.estimate import estimate

    cfg = get_shape("llama3-8b")
    f, c, rank = cfg.intermediate_size, 2, 16  # bf16 activations

    def peak(seq: int, **kw) -> dict:
        return estimate(cfg, "qlora", batch=1, seq=seq, lora_rank=rank, **kw)

    for seq in (4096, MLP_TILE):  # not longer than one piece: as before
        assert peak(seq, grad_ckpt="offload") == peak(seq, grad_ckpt="offload", mlp_tile=None)
    seq = 16 * MLP_TILE
    tiled, untiled = peak(seq, grad_ckpt="offload"), peak(seq, grad_ckpt="offload", mlp_tile=None)
    # the kernels' path keeps per token gate|up (2f) and down's input (f): 15 of 16 pieces' go (down's x A^T, rank
    # per token, is left counted in full)
    cut = (seq - MLP_TILE) * 3 * f * c
    assert tiled["detail"]["tiled_mlp_saving_bytes"] == cut
    # and the MLP's (N, f) gradients in backward give way to attention's, smaller
    assert cut < untiled["total_bytes"] - tiled["total_bytes"] < cut + 2 * seq * f * c
    assert peak(seq, grad_ckpt=False) == peak(seq, grad_ckpt=False, mlp_tile=None)  # no recompute, no pieces
