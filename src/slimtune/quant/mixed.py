"""Mixed-bit budgets: measure each linear layer's sensitivity on calibration data, then give every layer 2, 3, 4 or 8
bits so that the parameter-weighted average of the code bits meets a budget (e.g. 3.5) exactly when that is possible.

Sensitivity of layer l at b bits = calibration loss with only layer l quantized to int-b minus the loss of the
unquantized model (the HAWQ / "one layer at a time" proxy; interactions between layers are ignored). The allocation
minimizes the summed sensitivities subject to sum_l n_l b_l = budget * sum_l n_l: a 0/1 knapsack solved exactly by
dynamic programming over the cost in units of g = gcd(n_l) parameters. Code bits only are counted; the scales and
zero points (fp32 scale + uint8 zero per group: 40 / group bits per weight; int8: one fp32 scale per row) are
reported separately as overhead.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import reduce

import numpy as np
from torch import nn

from slimtune.errors import ConfigError

BIT_CHOICES = (2, 3, 4, 8)
BIT_FORMAT = {2: "int2", 3: "int3", 4: "int4", 8: "int8"}  # int8 per channel, the others group-wise asymmetric
MAX_CELLS = 50_000_000  # DP table size above which the cost unit is coarsened (the allocation may then miss exactness)


def layer_format(bits: int) -> str:
    """The QuantLinear format used for `bits` in a mixed allocation."""
    return BIT_FORMAT[bits]


def measure_sensitivity(model: nn.Module, names: list[str], loss_fn: Callable[[nn.Module], float],
                        group_size: int | None = None,
                        choices: tuple[int, ...] = BIT_CHOICES) -> tuple[float, dict[str, dict[int, float]]]:
    """Calibration-loss increase of quantizing each layer alone at each bit width.

    Args:
        model: the unquantized model (layers are swapped one at a time and put back; nothing is left changed).
        names: the linear layers to measure; loss_fn(model) -> mean calibration loss.
        group_size: group of the int2 / int3 / int4 formats (int8 is per channel).
    Returns:
        (base loss, {layer: {bits: loss increase}}).
    Raises:
        ConfigError: a group size that does not divide a layer's width.
    """
    from slimtune.quant.linear import QuantLinear

    base = loss_fn(model)
    out: dict[str, dict[int, float]] = {}
    for n in names:
        lin = model.get_submodule(n)
        out[n] = {}
        for b in choices:
            fmt = layer_format(b)
            q = QuantLinear.from_linear(lin, fmt, None if fmt == "int8" else group_size, name=f"{n}.weight")
            model.set_submodule(n, q)
            try:
                out[n][b] = loss_fn(model) - base
            finally:
                model.set_submodule(n, lin)
    return base, out


def allocate_bits(sizes: dict[str, int], sens: dict[str, dict[int, float]], budget: float,
                  choices: tuple[int, ...] = BIT_CHOICES) -> tuple[dict[str, int], bool]:
    """Bits per layer minimizing the summed sensitivity with parameter-weighted average bits == `budget`.

    Exact dynamic programming: cost of layer l at b bits = (n_l / g) * b units, g = gcd of the sizes; dp[c] = least
    summed sensitivity of the layers so far at total cost exactly c. The answer is dp[C] with C = budget * N / g when
    that is an integer and reachable; otherwise the reachable cost closest below it (then `exact` is False).
    Args:
        sizes: layer -> number of weights; sens: layer -> {bits: sensitivity}; budget: the average bits.
    Returns:
        ({layer: bits}, exact).
    Raises:
        ConfigError: a budget outside [min(choices), max(choices)].
    """
    lo, hi = min(choices), max(choices)
    if not lo <= budget <= hi:
        raise ConfigError(f"--bits {budget:g} is outside what {', '.join(map(str, choices))}-bit layers can average; "
                          f"choose a value in [{lo}, {hi}]")
    names = list(sizes)
    g = reduce(math.gcd, sizes.values())
    units = [sizes[n] // g for n in names]
    total = sum(units)
    while (total * hi + 1) * len(names) > MAX_CELLS:  # coarsen the unit: rounding may cost exactness (reported)
        g *= 2
        units = [max(1, round(sizes[n] / g)) for n in names]
        total = sum(units)
    cap = budget * total
    C = math.floor(cap + 1e-9)
    integral = abs(cap - round(cap)) < 1e-9
    dp = np.full(C + 1, np.inf)
    dp[0] = 0.0
    pick = np.full((len(names), C + 1), -1, dtype=np.int8)
    for i, n in enumerate(names):
        new = np.full(C + 1, np.inf)
        for j, b in enumerate(choices):
            c = units[i] * b
            if c > C:
                continue
            cand = dp[: C + 1 - c] + sens[n][b]  # (C + 1 - c,): cost c' + c for every reachable c'
            better = cand < new[c:]
            new[c:][better] = cand[better]
            pick[i, c:][better] = j
        dp = new
    reach = np.flatnonzero(np.isfinite(dp))
    if not len(reach):
        raise ConfigError(f"--bits {budget:g}: no allocation of {', '.join(map(str, choices))} bits fits the budget")
    end = int(reach[-1])
    exact = integral and end == C and g == reduce(math.gcd, sizes.values())
    bits: dict[str, int] = {}
    c = end
    for i in range(len(names) - 1, -1, -1):  # backtrack: layer i took choice pick[i, c]
        b = choices[int(pick[i, c])]
        bits[names[i]] = b
        c -= units[i] * b
    return {n: bits[n] for n in names}, exact


def overhead_bits(fmt: str, in_features: int, group_size: int | None) -> float:
    """Bits per weight spent on scales and zero points (not codes) by a QuantLinear of `fmt`: one row's bytes from
    the codec, less its codes (int8 / fp8: 32 / in for the row's fp32 scale; int2-4: 40 / G per group)."""
    from slimtune.quant.codecs import get_codec

    codec = get_codec(fmt)
    return codec.nbytes(1, in_features, group_size) * 8 / in_features - codec.code_bits
