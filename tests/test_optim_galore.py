"""GaLore: the projection math (top singular vectors, both orientations), the optimizer state's bytes against the
formula r x dims (fp32 and 8-bit), the projection recomputed exactly every update_interval steps, a group without rank
equal to torch's AdamW, and on a tiny model pre-trained from a random init a loss that tracks full AdamW."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimtune.models.config import ModelConfig
from slimtune.models.decoder import Decoder, init_weights
from slimtune.optim.build import decay_groups
from slimtune.optim.galore import BLOCK, MIN_8BIT, GaLoreAdamW, galore_groups, project, project_back, projection, \
    state_bytes


def tiny(seed: int = 0, d: int = 64) -> Decoder:
    cfg = ModelConfig(vocab_size=256, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return init_weights(Decoder(cfg), seed)


@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (16, 16)])
def test_projection_is_the_top_singular_subspace(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape, dtype=torch.float64)
    r = 5
    P = projection(g, r)
    m, n = shape
    assert P.shape == ((m, r) if m < n else (r, n))
    ortho = P.t() @ P if m < n else P @ P.t()
    torch.testing.assert_close(ortho, torch.eye(r, dtype=torch.float32), atol=1e-5, rtol=0)
    U, S, Vh = torch.linalg.svd(g, full_matrices=False)
    best = (U[:, :r] * S[:r]) @ Vh[:r]  # the best rank-r approximation (Eckart-Young)
    R = project(g.float(), P)
    assert R.shape == ((r, n) if m < n else (m, r))
    torch.testing.assert_close(project_back(R, P, g.shape).double(), best, atol=1e-4, rtol=1e-4)


def _expected_bytes(model: Decoder, rank: int, eight_bit: bool) -> int:
    def moment(k: int) -> int:  # one moment of k elements
        return k + 4 * (k // BLOCK) if eight_bit and k >= MIN_8BIT and k % BLOCK == 0 else 4 * k

    total = 0
    for name, p in model.named_parameters():
        if p.ndim == 2 and ".layers." in f".{name}":
            m, n = p.shape
            r = min(rank, m, n)
            total += 2 * moment(r * max(m, n)) + 4 * r * min(m, n)  # two moments in the projected space, and P
        else:
            total += 2 * moment(p.numel())  # plain AdamW
    return total


@pytest.mark.parametrize("eight_bit", [False, True])
def test_state_bytes_equal_the_formula(eight_bit):
    torch.manual_seed(1)
    model = tiny(d=128)
    rank = 16
    opt = GaLoreAdamW(galore_groups(model, 0.01, rank, 10, 0.25), lr=1e-3, eight_bit=eight_bit)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert state_bytes(opt) == _expected_bytes(model, rank, eight_bit)
    adamw = sum(2 * 4 * p.numel() for p in model.parameters())
    assert state_bytes(opt) < adamw  # (the block matrices dominate: 128 x 256 at rank 16)


def test_projection_recomputed_every_interval():
    torch.manual_seed(2)
    w = torch.nn.Parameter(torch.randn(8, 20))
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "update_interval": 3, "scale": 0.5}], lr=1e-2)
    projs = []
    for _ in range(8):
        w.grad = torch.randn_like(w)
        opt.step()
        projs.append(opt.state[w]["proj"].clone())
    changed = [i for i in range(1, 8) if not torch.equal(projs[i], projs[i - 1])]
    assert changed == [3, 6] and opt.state[w]["step"] == 8
    # the step itself: W <- W - lr * scale * P N, N Adam's normalized step of R = P^T G
    st = opt.state[w]
    before, g = w.detach().clone(), torch.randn_like(w)
    w.grad = g
    R = st["proj"].t() @ g
    m, v = st["exp_avg"] * 0.9 + 0.1 * R, st["exp_avg_sq"] * 0.999 + 0.001 * R * R
    N = (m / (1 - 0.9 ** 9)) / ((v / (1 - 0.999 ** 9)).sqrt() + 1e-8)
    opt.step()
    torch.testing.assert_close(w.detach(), before - 1e-2 * 0.5 * st["proj"] @ N, rtol=1e-5, atol=1e-6)


def test_group_without_rank_is_adamw():
    torch.manual_seed(3)
    a, b = tiny(4), tiny(4)
    ours = GaLoreAdamW(decay_groups(a, 0.1), lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(decay_groups(b, 0.1), lr=1e-2, weight_decay=0.1)
    x = torch.randint(0, 256, (2, 16))
    for _ in range(3):
        for model, opt in ((a, ours), (b, ref)):
            F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_galore_loss_tracks_adamw_from_a_random_init():
    """Pre-training a tiny model from scratch on English text (the bundled sample's bytes): 20 steps at the same
    learning rate. Tolerance: GaLore's mean loss over the last 6 steps within 5% of AdamW's (rank 16 of 32 dims)."""
    import json

    from slimtune.data import sample_path

    text = " ".join(r["instruction"] + " " + r["output"] for r in json.loads(sample_path().read_text())[:200])
    data = torch.tensor(list(text.encode()), dtype=torch.long)

    def run(galore: bool) -> list[float]:
        torch.manual_seed(0)
        model = tiny(0, d=32)
        groups = galore_groups(model, 0.0, 16, 8, 1.0) if galore else decay_groups(model, 0.0)
        opt = GaLoreAdamW(groups, lr=3e-3)
        g = torch.Generator().manual_seed(1)
        out = []
        for _ in range(20):
            idx = torch.randint(0, len(data) - 33, (4,), generator=g)
            x = torch.stack([data[i:i + 33] for i in idx])
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out

    full, low = run(False), run(True)
    assert full[-1] < full[0] - 1.5 and low[-1] < low[0] - 1.5
    mean_full, mean_low = sum(full[-6:]) / 6, sum(low[-6:]) / 6
    assert abs(mean_low - mean_full) / mean_full < 0.05, (full, low)
