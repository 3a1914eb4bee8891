"""Sparsification of task vectors beyond TIES and DARE: Model Breadcrumbs and DELLA, and mergekit's L1 rescale.

Semantics follow mergekit 0.1.5 (sparsify.py): breadcrumbs drops the `gamma` largest |delta| as outliers and the
smallest, keeping int(density * n); DELLA drops each entry with a probability that falls linearly with its magnitude
rank within its row; `rescale` multiplies the survivors by ||delta||_1 / ||kept||_1. Thresholds are exact (radix
select, `methods.topk_thresholds`), so entries tied at a threshold are all kept or all dropped (mergekit's sort
breaks such ties arbitrarily); DELLA's draws come from slimtune's seeded per-block stream (`methods.dare_uniform`).
"""
from __future__ import annotations

from torch import Tensor

from slimtune.merge import methods as M

L1_EPS = 1e-7  # below this an L1 norm is treated as zero and nothing is rescaled (mergekit's eps)


def outlier_counts(density: float, gamma: float, numel: int) -> tuple[int, int] | None:
    """(dropped from the top, kept after them) in descending |delta| order; None keeps everything (density >= 1).

    Model Breadcrumbs (Davari & Belilovsky 2023): of n entries keep int(density n), after removing int(gamma n)
    outliers from the top; the top removal shrinks when density + gamma > 1 (mergekit: n_bot = max(0, n - keep - top)).
    """
    if density >= 1:
        return None
    keep, top = int(density * numel), int(gamma * numel)
    bottom = max(0, numel - keep - top)
    return numel - bottom - keep, keep


def outlier_ranks(density: float, gamma: float, numel: int) -> list[int]:
    """The descending ranks whose values bound the kept band: [k_hi] (only when something is dropped from the top)
    and k_lo = dropped + kept; empty when nothing is kept."""
    top, keep = outlier_counts(density, gamma, numel)
    if keep == 0:
        return []
    return ([top] if top > 0 else []) + [top + keep]


def band_mask(absd: Tensor, hi: float | None, lo: float | None) -> Tensor:
    """Entries kept by breadcrumbs: lo <= |delta| < hi (hi None: no outliers dropped; lo None: nothing kept)."""
    if lo is None:
        return absd < 0
    keep = absd >= lo
    return keep & (absd < hi) if hi is not None else keep


def breadcrumbs_trim(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs on a whole tensor (no rescale): keep the band of |delta| below the top gamma outliers."""
    counts = outlier_counts(density, gamma, delta.numel())
    if counts is None:
        return delta
    ranks = outlier_ranks(density, gamma, delta.numel())
    thr = M.topk_thresholds(lambda: [[delta.abs()] * len(ranks)], ranks) if ranks else []
    hi, lo = (thr[0], thr[1]) if len(thr) == 2 else (None, thr[0] if thr else None)
    return delta * band_mask(delta.abs(), hi, lo)


def check_della(density: float, epsilon: float) -> str | None:
    """Why (density, epsilon) cannot be used by DELLA, or None: keep probabilities density +- epsilon must lie in
    (0, 1) (mergekit raises the same)."""
    if density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        return f"density {density} +- epsilon {epsilon} must stay inside (0, 1)"
    return None


def della_probs(absd: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MAGPRUNE keep probabilities (Deep et al. 2024) for rows of |delta| (R, C), ranked within each row.

    Rank r in 1..C by magnitude (smallest 1) gives p = density - epsilon + 2 epsilon (r - 1) / (C - 1): the row's
    probabilities average exactly `density`, larger entries are kept more often. A 1-D tensor is one row.
    """
    rows = absd.reshape(1, -1) if absd.dim() < 2 else absd
    c = rows.shape[-1]
    ranks = rows.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True).float()  # 0..C-1
    norm = ranks / (c - 1) if c > 1 else ranks
    return ((density - epsilon) + norm * (2 * epsilon)).reshape(absd.shape)


def l1_factor(before: float, after: float) -> float:
    """mergekit's `rescale`: ||delta||_1 / ||kept||_1, or 1 when either norm is below L1_EPS."""
    return 1.0 if before < L1_EPS or after < L1_EPS else before / after


def della(delta: Tensor, density: float, epsilon: float, u: Tensor, rescale: bool) -> Tensor:
    """DELLA's drop on a whole tensor with uniform draws `u` (same shape): keep where u < p, then L1-rescale."""
    if density >= 1:
        return delta
    kept = delta * (u < della_probs(delta.abs(), density, epsilon))
    if not rescale:
        return kept
    return kept * l1_factor(float(delta.abs().double().sum()), float(kept.abs().double().sum()))
