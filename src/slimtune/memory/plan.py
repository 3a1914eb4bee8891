"""The planner: for a GPU budget, the largest batch and sequence each method fits, with which checkpointing and
offloading, the fastest setting that fits, and why the others do not.

Speed model (documented, relative; for ranking settings, not for promising tokens/s): a step costs its FLOPs at
EFFECTIVE_FLOPS (6 N per token for full fine-tuning, 4 N with a frozen base: forward + input gradients; causal
attention 2 L S q_dim per token forward, twice that backward); checkpointing adds one more forward (~1/3 more for full
fine-tuning, ~1/2 with a frozen base) for each checkpointed block (a checkpointing row checkpoints only as many blocks,
the first ones, as its budget needs: `ckpt_blocks`); QLoRA re-dequantizes every weight in forward and backward
(DEQUANT_BYTES of memory traffic per weight at HBM_BW); activation offloading moves every saved tensor over PCIe both
ways (PCIE_BW), overlapped with compute; optimizer offloading moves gradients down and weights up over PCIe and runs
AdamW on the CPU (CPU_ADAM params/s), not overlapped.
"""
from __future__ import annotations

import re

from slimtune.errors import ConfigError
from slimtune.memory.estimate import estimate
from slimtune.models.config import ModelConfig

EFFECTIVE_FLOPS = 400e12  # a large bf16 matmul measures ~800 TFLOP/s on an H100; half of it end to end
HBM_BW, PCIE_BW, CPU_ADAM = 3.0e12, 25e9, 1.0e9
DEQUANT_BYTES = 24  # memory traffic per weight of one dequantization (indices, fp32 values, scales, 16-bit result)
SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
              "tib": 2**40}


def parse_size(text: str) -> int:
    """'24GiB' -> 25769803776, '80GB' -> 80e9, '1.5TiB', '4096MiB'.

    Raises:
        ConfigError: not a number followed by B, KB, MB, GB, TB, KiB, MiB, GiB or TiB.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B)\s*", str(text), flags=re.I)
    if not m or m.group(2).lower() not in SIZE_UNITS:
        raise ConfigError(f"memory size {text!r} is not understood; write a number and a unit, e.g. 24GiB or 80GB")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])


def step_seconds(cfg: ModelConfig, est: dict, method: str, batch: int, seq: int, grad_ckpt: bool,
                 offload: str | None, ckpt_blocks: int | None = None) -> float:
    """Seconds per training step under the speed model of this module's docstring."""
    L = cfg.num_hidden_layers
    recomputed = min(L if ckpt_blocks is None else ckpt_blocks, L) / L  # the share of blocks recomputed
    d = est["detail"]
    n_mat = d["params"] - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 0)
    attn = 2 * cfg.num_hidden_layers * seq * cfg.num_attention_heads * cfg.head_dim  # causal, per token, forward
    fwd = 2 * n_mat + attn
    per_tok = 3 * fwd if method == "full" else 2 * fwd + 2 * attn / 2  # frozen base: no weight gradients
    if grad_ckpt:
        per_tok += fwd * recomputed
    if grad_ckpt == "offload":  # block inputs down to pinned memory and back, overlapped with compute
        t_copy = 2 * cfg.num_hidden_layers * batch * seq * cfg.hidden_size * 2 / PCIE_BW
    t = batch * seq * per_tok / EFFECTIVE_FLOPS
    if method == "qlora":
        t += (2 + (recomputed if grad_ckpt else 0)) * d["params"] * DEQUANT_BYTES / HBM_BW
    if offload == "activations":
        t = max(t, 2 * est["host_bytes"] / PCIE_BW)
    if grad_ckpt == "offload":
        t = max(t, t_copy)
    if offload == "optimizer":
        n = d["trainable_params"]
        t += n * 4 / PCIE_BW + n / CPU_ADAM
    return t


def _fits(cfg, budget, method, batch, seq, ck, off, kw) -> dict | None:
    e = estimate(cfg, method, batch=batch, seq=seq, grad_ckpt=ck, offload=off, **kw)
    return e if e["total_bytes"] <= budget else None


def _max_batch(cfg, budget, method, seq, ck, off, kw, cap: int = 4096) -> int:
    """The largest batch (1..cap) that fits at `seq`, 0 if none (memory grows with the batch: doubling, then bisect)."""
    if not _fits(cfg, budget, method, 1, seq, ck, off, kw):
        return 0
    lo, hi = 1, 2
    while hi <= cap and _fits(cfg, budget, method, hi, seq, ck, off, kw):
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits(cfg, budget, method, mid, seq, ck, off, kw) else (lo, mid)
    return lo


def fewest_ckpt_blocks(cfg: ModelConfig, budget: int, method: str, batch: int, seq: int, kw) -> int | None:
    """The fewest checkpointed blocks (the first ones) with which `batch` x `seq` still fits under plain
    checkpointing (memory falls as more blocks are checkpointed: bisection); None when all of them are needed."""
    L = cfg.num_hidden_layers
    fits = lambda n: _fits(cfg, budget, method, batch, seq, True, None, dict(kw, ckpt_blocks=n))  # noqa: E731
    lo, hi = -1, L  # fits(hi) holds (the row's batch was found with every block checkpointed)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return None if hi == L else hi


def longest_seq(cfg: ModelConfig, budget: int, method: str, ck, off, kw, cap: int = 1 << 20) -> int:
    """The longest sequence (a multiple of 256, up to the model's context and `cap`) that fits at batch 1, 0 if none:
    doubling, then bisection (memory grows with the sequence)."""
    top = min(cap, cfg.max_position_embeddings)
    if not _fits(cfg, budget, method, 1, min(256, top), ck, off, kw):
        return 0
    lo, hi = min(256, top), min(512, top)
    while hi <= top and _fits(cfg, budget, method, 1, hi, ck, off, kw):
        if hi == top:
            return top
        lo, hi = hi, min(hi * 2, top)
    while hi - lo > 256:
        mid = (lo + hi) // 2 // 256 * 256
        lo, hi = (mid, hi) if _fits(cfg, budget, method, 1, mid, ck, off, kw) else (lo, mid)
    return lo


def plan(cfg: ModelConfig, gpu_memory_bytes: int, seq: int | None = None,
         methods: tuple[str, ...] = ("full", "lora", "qlora"), precision: str = "bf16-mixed",
         optimizer: str = "adamw", **kw) -> list[dict]:
    """One row per (method, checkpointing - off, on, offload -, offload): whether it fits in `gpu_memory_bytes`, the
    largest batch at `seq` (default: the longest power-of-two sequence that fits with batch 1, capped at 8192 and
    the model's context), the longest power-of-two sequence at batch 1 up to 8192 (`max_seq_at_batch1`) and the
    longest sequence at all (`longest_seq`, to 256 tokens), the predicted peak and tokens/s; the fastest fitting row
    has `fastest: True` (an offloading row only where nothing faster fits); rows that do not fit carry `reason`.

    Raises:
        ConfigError: the budget is smaller than the weights of every method, or a bad seq.
    """
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq <= 0):
        raise ConfigError(f"seq must be a positive integer, got {seq!r}")
    kw = dict(precision=precision, optimizer=optimizer, **kw)
    smallest = min((estimate(cfg, m, batch=1, seq=1, **kw)["weights_bytes"], m) for m in methods)
    if smallest[0] > gpu_memory_bytes:
        raise ConfigError(f"a budget of {gpu_memory_bytes / 2**30:.1f} GiB is smaller than the weights alone "
                          f"({smallest[0] / 2**30:.1f} GiB with {smallest[1]}); use a larger GPU or a smaller model")
    seqs = [s for s in (256, 512, 1024, 2048, 4096, 8192) if s <= cfg.max_position_embeddings] or [256]
    rows = []
    for method in methods:
        for ck in (False, True, "offload"):
            for off in (None, "activations", "optimizer"):
                if off == "optimizer" and method != "full" or off == "activations" and ck or \
                        off and kw.get("gpus", 1) > 1:  # FSDP2 runs here offload nothing
                    continue
                row = {"method": method, "grad_ckpt": ck, "offload": off, "fits": False, "fastest": False}
                max_seq = max((s for s in seqs if _fits(cfg, gpu_memory_bytes, method, 1, s, ck, off, kw)),
                              default=0)
                row["longest_seq"] = longest_seq(cfg, gpu_memory_bytes, method, ck, off, kw)
                s = seq or max_seq or seqs[0]
                b = _max_batch(cfg, gpu_memory_bytes, method, s, ck, off, kw)
                row.update(seq=s, max_batch=b, max_seq_at_batch1=max_seq)
                n_ck = fewest_ckpt_blocks(cfg, gpu_memory_bytes, method, b, s, kw) if b and ck is True else None
                e = estimate(cfg, method, batch=max(b, 1), seq=s, grad_ckpt=ck, offload=off, ckpt_blocks=n_ck, **kw)
                row.update(peak_bytes=e["total_bytes"], dominant=e["dominant"], ckpt_blocks=n_ck)
                if b:
                    row["fits"] = True
                    t = step_seconds(cfg, e, method, b, s, ck, off, n_ck)
                    row["tokens_per_s"] = kw.get("gpus", 1) * b * s / t
                else:
                    row["reason"] = _why(e, gpu_memory_bytes, s)
                rows.append(row)
    fitting = [r for r in rows if r["fits"]]
    if fitting:
        max(fitting, key=lambda r: r["tokens_per_s"])["fastest"] = True
    return rows


def _why(e: dict, budget: int, seq: int) -> str:
    gib = lambda x: f"{x / 2**30:.1f} GiB"  # noqa: E731
    if e["weights_bytes"] > budget:
        return f"weights alone take {gib(e['weights_bytes'])} > {gib(budget)}"
    if e["static_bytes"] > budget:
        return f"weights + gradients + optimizer states take {gib(e['static_bytes'])} > {gib(budget)}"
    return (f"batch 1 x seq {seq} peaks at {gib(e['total_bytes'])} > {gib(budget)} (largest: {e['dominant']} "
            f"{gib(e[e['dominant'] + '_bytes'])})")
