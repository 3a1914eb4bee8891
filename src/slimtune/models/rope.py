"""Rotary position embeddings (RoPE): the inverse frequencies of every supported scaling (linear, llama3, dynamic NTK,
YaRN, LongRoPE), partial rotary (Phi-3) and Gemma 3's local base, and `Rotary`, cos / sin for integer positions.
The formulas follow transformers' `ROPE_INIT_FUNCTIONS`, which the tests compare with.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from slimtune.models.config import ModelConfig


def rope_type(rs: dict | None) -> str:
    """The kind of a `rope_scaling` dict: default, linear, llama3, dynamic, yarn or longrope."""
    rs = rs or {}
    return rs.get("rope_type", rs.get("type", "default"))


def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None, local: bool = False, long: bool = False) -> Tensor:
    """Inverse frequencies theta^(-2i/rd), i < rd/2 (rd = cfg.rotary_dim), in fp32 on the CPU, scaled by the config.

    linear (position interpolation, Chen et al. 2023): divided by `factor`. llama3 (Llama 3.1): wavelengths longer
    than original_len / low_freq_factor are divided by `factor`, shorter than original_len / high_freq_factor kept,
    those in between interpolated smoothly. dynamic (NTK-aware, bloc97 / emozilla): for a call whose longest position
    `seq_len` passes max_position_embeddings L, the base becomes theta (f seq_len / L - (f - 1))^(rd / (rd - 2)).
    yarn (Peng et al. 2023): see `_yarn`. longrope (Phi-3): divided per frequency by short_factor, or by long_factor
    (`long`). `local` (Gemma 3's sliding layers): base rope_local_theta, unscaled.
    """
    rd = cfg.rotary_dim
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    rs = {} if local else dict(cfg.rope_scaling or {})
    kind = rope_type(rs)
    if kind == "dynamic" and seq_len is not None and seq_len > cfg.max_position_embeddings:
        f = rs["factor"]
        theta = theta * (f * seq_len / cfg.max_position_embeddings - (f - 1)) ** (rd / (rd - 2))
    base = theta ** (torch.arange(0, rd, 2, dtype=torch.int64, device="cpu").float() / rd)  # (rd/2,)
    if kind == "longrope":
        return 1.0 / (torch.tensor(rs["long_factor" if long else "short_factor"], dtype=torch.float32, device="cpu") * base)
    inv = 1.0 / base
    if kind == "linear":
        inv = inv / rs["factor"]
    elif kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv = torch.where(medium, smoothed, scaled)
    elif kind == "yarn":
        inv = _yarn(inv, rd, theta, rs, cfg.max_position_embeddings)
    return inv


def _yarn(inv: Tensor, rd: int, theta: float, rs: dict, max_pos: int) -> Tensor:
    """YaRN's "NTK-by-parts" frequencies: dimension i keeps its frequency where it turns more than beta_fast times
    over the original length, is interpolated (/ factor) where it turns fewer than beta_slow times, and is blended
    linearly in between (dimension bounds from d(r) = rd ln(L / (2 pi r)) / (2 ln theta), floored / ceiled)."""
    old = rs["original_max_position_embeddings"]
    factor = rs.get("factor") or max_pos / old

    def dim_of(rotations: float) -> float:
        return rd * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = dim_of(rs.get("beta_fast") or 32), dim_of(rs.get("beta_slow") or 1)
    if rs.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, rd - 1)
    ramp = ((torch.arange(rd // 2, dtype=torch.float32, device="cpu") - lo) / ((hi - lo) or 0.001)).clamp(0, 1)  # (rd/2,)
    return inv / factor * ramp + inv * (1 - ramp)


def rope_attention_factor(cfg: ModelConfig, local: bool = False) -> float:
    """The factor cos and sin are multiplied by (so q.k grows by its square); 1 unless YaRN or LongRoPE.

    `attention_factor` when given; else YaRN: 0.1 ln(s) + 1 (or the ratio of two such terms with mscale /
    mscale_all_dim), LongRoPE: sqrt(1 + ln(s) / ln(L0)); s = factor or max_position_embeddings / L0, L0 the original
    length, and 1 when s <= 1 (transformers' _compute_yarn_parameters / _compute_longrope_parameters).
    """
    rs = {} if local else cfg.rope_scaling or {}
    kind = rope_type(rs)
    if kind not in ("yarn", "longrope"):
        return 1.0
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    L0 = rs["original_max_position_embeddings"]
    s = rs.get("factor") or cfg.max_position_embeddings / L0
    if kind == "longrope":
        return 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(L0))

    def mscale(m: float) -> float:
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    if rs.get("mscale") and rs.get("mscale_all_dim"):
        return mscale(rs["mscale"]) / mscale(rs["mscale_all_dim"])
    return mscale(1.0)


def host_read(cfg) -> bool:
    """Whether computing cos / sin reads a value back to the host (dynamic NTK: the longest position picks the
    frequencies), which a CUDA graph cannot capture: such models decode and train without graphs."""
    return rope_type(getattr(cfg, "rope_scaling", None)) == "dynamic"


class Rotary:
    """cos and sin of one RoPE variant for integer positions; the inverse frequencies are kept in fp32 (CPU master,
    a copy per device). LongRoPE (Phi-3) switches from short to long factors once the largest position reaches the
    original length (transformers' dynamic longrope: chosen on the device, so CUDA graphs hold). Dynamic NTK
    recomputes its frequencies from the longest position, a host read (so CUDA graphs skip such models).
    """

    def __init__(self, cfg: ModelConfig, local: bool = False) -> None:
        self.cfg = cfg
        self.kind = "default" if local else rope_type(cfg.rope_scaling)
        self.inv = {"cpu": rope_inv_freq(cfg, local=local)}
        self.long = {"cpu": rope_inv_freq(cfg, long=True)} if self.kind == "longrope" else None
        self.switch = cfg.rope_scaling["original_max_position_embeddings"] if self.long else None
        self.factor = rope_attention_factor(cfg, local)

    @staticmethod
    def _on(table: dict[str, Tensor], dev: torch.device) -> Tensor:
        t = table.get(str(dev))
        if t is None:
            t = table[str(dev)] = table["cpu"].to(dev)
        return t

    def __call__(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin (B, T, rd) for positions (B, T); angles in fp32 as transformers."""
        dev = position_ids.device
        inv = self._on(self.inv, dev)
        if self.long is not None:
            inv = torch.where(position_ids.max() + 1 > self.switch, self._on(self.long, dev), inv)
        elif self.kind == "dynamic":
            seq = int(position_ids.max()) + 1
            if seq > self.cfg.max_position_embeddings:
                inv = rope_inv_freq(self.cfg, seq).to(dev)
        ang = position_ids[..., None].float() * inv  # (B, T, rd/2)
        emb = torch.cat([ang, ang], dim=-1)
        if self.factor != 1.0:
            return (emb.cos() * self.factor).to(dtype), (emb.sin() * self.factor).to(dtype)
        return emb.cos().to(dtype), emb.sin().to(dtype)
