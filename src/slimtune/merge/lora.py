"""LoRA adapters as merge inputs and outputs, in the PEFT format.

As an input, an adapter on the base stands for the model base + scale * B @ A on its target modules (scale =
lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA). As an output, the merged update (merged - base) of every target
module is factored by SVD into a rank-r LoRA with lora_alpha = r (scale 1).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from slimtune.errors import CheckpointError, ConfigError
from slimtune.io.jsonfile import read_json
from slimtune.io.safetensors import TensorLoc, read_tensor, tensor_index, write_safetensors
from slimtune.precision.guard import check_finite
from slimtune.peft.base import FILE_PREFIX as PREFIX
from slimtune.peft.lora import lora_scale


@dataclass
class Lora:
    folder: Path
    config: dict  # adapter_config.json
    targets: dict[str, tuple[Tensor, Tensor, float]]  # base tensor name -> (A [r, in], B [out, r], scale)

    def check(self, base_index: dict[str, TensorLoc], label: str) -> None:
        """Every target must be a 2-D tensor of the base with shape [out, in] = [B rows, A columns]."""
        for name, (a, b, _) in self.targets.items():
            if name not in base_index:
                raise CheckpointError(f"{label}: adapter targets {name}, which the base model does not have "
                                      "(is it an adapter for another model?)")
            if tuple(base_index[name].shape) != (b.shape[0], a.shape[1]):
                raise CheckpointError(f"{label}: adapter update for {name} is {b.shape[0]} x {a.shape[1]}, the base "
                                      f"tensor is {list(base_index[name].shape)}")

    def apply(self, name: str, span: tuple[int, int] | None, base_rows: Tensor) -> Tensor:
        """Rows [r0, r1) of base + scale * B @ A (just the base rows for tensors the adapter does not touch)."""
        if name not in self.targets:
            return base_rows
        a, b, scale = self.targets[name]
        rows = b if span is None else b[span[0]:span[1]]  # (r1 - r0, r)
        return base_rows + scale * (rows @ a)  # (r1 - r0, in)


def load_lora(folder: Path, label: str) -> Lora:
    """Read a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) into memory.

    Raises:
        CheckpointError: not LoRA, DoRA, per-module alpha patterns, fan_in_fan_out, or keys other than lora_A/lora_B.
    """
    if not (folder / "adapter_config.json").exists():
        raise CheckpointError(f"{label}: {folder}/adapter_config.json is missing")
    conf = read_json(folder / "adapter_config.json")
    for bad, why in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out"), ("alpha_pattern", "alpha_pattern")):
        if conf.get(bad):
            raise CheckpointError(f"{label}: {why} adapters are not supported as merge inputs; merge it into its "
                                  "base first and pass the full model")
    if conf.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{label}: adapter type {conf.get('peft_type')} is not LoRA; only LoRA adapters merge")
    wfile = folder / "adapter_model.safetensors"
    if not wfile.exists():
        raise CheckpointError(f"{label}: {wfile} not found (a .bin adapter must be re-saved as safetensors)")
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, loc in tensor_index(wfile).items():
        mod, sep, kind = key.rpartition(".lora_")
        if not sep or not key.startswith(PREFIX) or kind not in ("A.weight", "B.weight"):
            raise CheckpointError(f"{label}: adapter tensor {key} is not a LoRA A/B matrix; only plain LoRA adapters "
                                  "(no modules_to_save, no bias) can be merged")
        t = pairs.setdefault(mod[len(PREFIX):] + ".weight", {})[kind[0]] = read_tensor(loc).float()
        check_finite(key, t, str(wfile))
    alpha = conf.get("lora_alpha", conf.get("r", 8))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CheckpointError(f"{label}: {folder}/adapter_config.json: lora_alpha = {alpha!r} is not a finite number")
    targets = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{label}: adapter has lora_{set('AB') - set(ab)} missing for {name}")
        r = ab["A"].shape[0]  # the actual rank (rank_pattern included)
        scale = lora_scale(alpha, r, bool(conf.get("use_rslora")))
        targets[name] = (ab["A"], ab["B"], scale)
    return Lora(folder, conf, targets)


def factor(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-r factors of a [out, in] update: delta ~ B @ A, B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T (Eckart-Young).

    Exact SVD up to 4096 on the short side, randomized (torch.svd_lowrank, 6 power iterations) above; a rank above
    the matrix's is padded with zero factors so every module has the same r.
    """
    m = min(delta.shape)
    k = min(rank, m)
    if m <= 4096:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    else:
        u, s, v = torch.svd_lowrank(delta, q=min(m, k + 16), niter=6)
        u, s, vh = u[:, :k], s[:k], v[:, :k].T
    root = s.sqrt()
    b = torch.zeros(delta.shape[0], rank)
    a = torch.zeros(rank, delta.shape[1])
    b[:, :k] = u * root
    a[:k] = root[:, None] * vh
    return a, b


def write_adapter(tmp: Path, plan, names: list[str], rank: int, seed: int, merge_tensor, bar, shard_size: int) -> None:
    """Merge each target tensor whole, factor (merged - base) at `rank`, and save a PEFT adapter folder."""
    if rank < 1:
        raise ConfigError(f"--adapter-rank must be at least 1, got {rank}")
    dt = plan.out_dtype or torch.float32
    sd = {}
    for n in names:
        merged = torch.cat(list(merge_tensor(plan, n, seed)), 0)
        delta = merged - read_tensor(plan.base.index[n]).float()
        a, b = factor(delta, rank)
        for t in (a, b):
            check_finite(n, t, fix="the merged update is not finite; nothing was written")
        mod = PREFIX + n[: -len(".weight")]
        sd[mod + ".lora_A.weight"] = a.to(dt).contiguous()
        sd[mod + ".lora_B.weight"] = b.to(dt).contiguous()
        bar.update(1)
    write_safetensors(sd, tmp / "adapter_model.safetensors")
    first = next(x.lora for x in plan.inputs.values() if x.lora is not None)
    conf = dict(first.config)
    conf.update(r=rank, lora_alpha=rank, use_rslora=False, use_dora=False, rank_pattern={}, alpha_pattern={},
                target_modules=sorted({n.split(".")[-2] for n in names}), lora_dropout=0.0,
                base_model_name_or_path=str(plan.base.folder), peft_type="LORA")
    (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2))
