"""Stochastic rounding of bf16 weights: the rounding is unbiased (its mean is the fp32 value) and only ever gives one
of the two neighbouring bf16 values; in the fp32-state AdamW, updates below half a bf16 step move the weights on
average where round-to-nearest stalls; and a bf16-true run with it resumes exactly."""
from __future__ import annotations

import pytest
import torch

from slimtune.errors import ConfigError
from slimtune.optim.adamw import AdamWFp32State, stochastic_round_bf16


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above |x| (by truncating the fp32 bits), with x's sign."""
    low = (x.view(torch.int32) & -(1 << 16)).view(torch.float32)
    step = torch.ldexp(torch.ones_like(x), torch.frexp(low)[1] - 8)  # one bf16 ulp at low's binade
    return low, low + torch.sign(x) * step


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    torch.manual_seed(0)
    x = (torch.rand(64) * 2 - 1) * torch.logspace(-3, 3, 64)  # both signs, many binades
    n = 20000
    draws = stochastic_round_bf16(x[None].expand(n, -1).contiguous()).float()  # (n, 64)
    low, high = _neighbours(x)
    assert bool(((draws == low) | (draws == high)).all())
    p_high = (high - low).abs()
    frac = ((x - low).abs() / p_high)  # the probability of rounding away from zero
    mean = draws.mean(0)
    sd = p_high * torch.sqrt(frac * (1 - frac) / n)  # the standard deviation of the mean of n draws
    assert bool(((mean - x).abs() <= 5 * sd + 1e-12).all())
    nearest_bias = (x.to(torch.bfloat16).float() - x).abs()
    assert bool((nearest_bias > 10 * sd).sum() > 32)  # round-to-nearest is biased where this is not


@pytest.mark.parametrize("stochastic", [False, True])
def test_small_updates_stall_to_nearest_but_not_stochastically(stochastic):
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.ones(200_000, dtype=torch.bfloat16))
    opt = AdamWFp32State([w], lr=1e-4, weight_decay=0.0, stochastic_rounding=stochastic)
    for _ in range(10):  # a constant gradient: each Adam step moves every weight by lr (1/39 of a bf16 step at 1.0)
        w.grad = torch.ones_like(w)
        opt.step()
    mean = w.float().mean().item()
    if stochastic:
        assert mean == pytest.approx(1 - 10 * 1e-4, abs=5e-5)  # sd of the mean ~ 1e-5
    else:
        assert mean == 1.0  # every update rounded away


def test_stochastic_rounding_needs_bf16_true():
    from slimtune.data import sample_path
    from slimtune.train.config import load_config

    with pytest.raises(ConfigError, match="stochastic_rounding"):
        load_config(None, [f"data={sample_path()}", "stochastic_rounding=true", "precision=fp32"])
    cfg = load_config(None, [f"data={sample_path()}", "stochastic_rounding=true", "precision=bf16-true"])
    assert cfg.stochastic_rounding


def test_bf16_true_run_with_stochastic_rounding_resumes_exactly(tmp_path):
    """method=full under bf16-true: weights in bf16, rounded stochastically; a run stopped at step 3 and resumed
    gives the losses of an uninterrupted run (the rounding draws from the generators checkpoints save)."""
    from slimtune.data import sample_path
    from slimtune.models.tiny import write_builtin
    from slimtune.train import load_config, train
    from slimtune.train.metrics import read_metrics

    write_builtin(tmp_path / "m")
    base = [f"model={tmp_path / 'm'}", f"data={sample_path()}", "data_limit=24", "max_length=48", "method=full",
            "precision=bf16-true", "stochastic_rounding=true", "batch_size=4", "max_steps=6", "lr=1e-3",
            "schedule=constant", "save_every=3", "progress=false", "plot=false", "save_final=false", "seed=2"]
    train(load_config(None, base + [f"out_dir={tmp_path / 'ref'}"]), log=lambda m: None)
    train(load_config(None, base + [f"out_dir={tmp_path / 'run'}", "max_steps=3"]), log=lambda m: None)
    train(load_config(None, base + [f"out_dir={tmp_path / 'run'}", "resume=latest"]), log=lambda m: None)
    ref = [r["loss"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")]
    got = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(ref) == 6 and got == ref
