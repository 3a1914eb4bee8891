"""Combining LoRA adapters into a new one: linear (PEFT's), concatenation (exact sum of the updates) or SVD (the best
rank-k approximation of the summed update)."""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from slimtune.errors import ConfigError
from slimtune.peft.base import check_rank
from slimtune.peft.lora import LoraConfig, LoraLinear

COMBINE_MODES = ("linear", "cat", "svd")


def combine(model: nn.Module, configs: dict[str, LoraConfig], names: list[str], weights: list[float], mode: str,
            rank: int | None, new_name: str) -> LoraConfig:
    """Add adapter `new_name` combining LoRA adapters `names` with `weights` (each new factor has scale 1).

    linear: A = sum_i sqrt(|w_i s_i|) A_i, B = sum_i sign(w_i s_i) sqrt(|w_i s_i|) B_i (PEFT's 'linear'; equal ranks;
        not the sum of the updates: cross terms B_i A_j remain).
    cat: A = [w_i s_i A_i] stacked on the rank axis, B = [B_i] side by side: B A = sum_i w_i s_i B_i A_i exactly,
        with rank sum_i r_i.
    svd: the best rank-`rank` approximation of the summed update sum_i w_i s_i B_i A_i (U S Vh -> B = U S, A = Vh).
    Returns:
        the config describing the new adapter (targets: the union of the modules carrying any of `names`).
    Raises:
        ConfigError: unknown mode, DoRA adapters, unequal ranks for linear, rank <= 0, mismatched lengths.
    """
    if mode not in COMBINE_MODES:
        raise ConfigError(f"unknown combination mode {mode!r}; choose one of {', '.join(COMBINE_MODES)}")
    if len(weights) != len(names):
        raise ConfigError(f"combine_adapters: {len(names)} adapters but {len(weights)} weights")
    for n in names:
        if not isinstance(configs.get(n), LoraConfig):
            raise ConfigError(f"combine_adapters: {n!r} is not a LoRA adapter of this model")
        if configs[n].use_dora:
            raise ConfigError(f"combine_adapters: {n!r} is a DoRA adapter; its magnitude vector does not add up")
        if configs[n].lora_bias:
            raise ConfigError(f"combine_adapters: {n!r} has a lora_bias; combinations are of A and B only")
    if mode == "svd":
        rank = rank or max(configs[n].r for n in names)
        check_rank(rank, "combined rank")
    ranks: dict[str, int] = {}
    for path, m in model.named_modules():
        if not isinstance(m, LoraLinear):
            continue
        have = [(n, w) for n, w in zip(names, weights) if n in m.lora_A]
        if not have:
            continue
        ws = [(w * m.scaling[n], m.lora_A[n].weight.detach(), m.lora_B[n].weight.detach()) for n, w in have]
        if mode == "linear":
            if len({A.shape[0] for _, A, _ in ws}) > 1:
                raise ConfigError(f"combine_adapters mode 'linear' needs equal ranks (at {path}); use 'cat' or 'svd'")
            A = sum(math.sqrt(abs(c)) * A for c, A, _ in ws)
            B = sum(math.copysign(math.sqrt(abs(c)), c) * B for c, _, B in ws)
        elif mode == "cat":
            A = torch.cat([c * A for c, A, _ in ws], 0)  # (sum r, in)
            B = torch.cat([B for _, _, B in ws], 1)  # (out, sum r)
        else:
            delta = sum(c * (B @ A) for c, A, B in ws)  # (out, in), the summed update
            U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
            k = min(rank, S.shape[0])
            B, A = (U[:, :k] * S[:k]).to(delta.dtype), Vh[:k].to(delta.dtype)
        m.set_factors(new_name, A, B, 1.0)
        ranks[path] = A.shape[0]
    if not ranks:
        raise ConfigError(f"combine_adapters: none of {names} is applied to any layer")
    r = max(ranks.values())
    pattern = {re.escape(p): v for p, v in ranks.items() if v != r}  # alpha = r everywhere: scale 1
    return LoraConfig(r=r, lora_alpha=r, target_modules=list(ranks), rank_pattern=pattern, alpha_pattern=dict(pattern))
