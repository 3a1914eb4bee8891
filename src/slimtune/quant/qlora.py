"""Merging a QLoRA adapter the right way: into the DEQUANTIZED base, not into the original 16-bit weights.

A QLoRA adapter was trained against W_q = dequant(NF4(W)), so the merged weight is W_q + s B A. Adding s B A to the
original W instead (the most reported QLoRA mistake) silently changes every layer by W - W_q, the quantization error
the adapter had learned to live with. `merge_qlora` loads the base quantized exactly as training did, merges from
dequant(W_q) in fp32, saves a 16-bit Hugging Face checkpoint and measures the logit change on a fixed probe batch.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from slimtune.errors import ConfigError

PROBE_SHAPE = (2, 32)  # (batch, tokens) of the fixed random probe batch
QLORA_NOTE = ("merged into the DEQUANTIZED NF4 base (W_q + s*B@A), which is what the adapter was trained against; "
              "merging into the original 16-bit weights instead would add the quantization error W - W_q to every "
              "layer (the most reported QLoRA mistake)")


@dataclass
class QloraMergeReport:
    """What `merge_qlora` did: the output folder, format of the base, merged layers and the logit check.

    max_abs_logit_diff: max |logits(reloaded merged checkpoint) - logits(unmerged QLoRA model)| on the probe batch;
    naive_max_abs_logit_diff: the same for a merge into the original 16-bit weights (only when asked for).
    """

    out: str
    quant: str
    dtype: str
    layers: int
    max_abs_logit_diff: float
    max_abs_logit: float
    naive_max_abs_logit_diff: float | None = None
    note: str = QLORA_NOTE

    def to_dict(self) -> dict:
        return asdict(self)


def detect_quant(adapter_dir: str | Path) -> str | None:
    """The base format an adapter was trained on: adapter_config.json's `slimtune_quant`, else the training run's
    config.yaml (`method: qlora`, `quant: nf4`) beside the adapter folder; None for a plain LoRA adapter."""
    folder = Path(adapter_dir)
    try:
        d = json.loads((folder / "adapter_config.json").read_text())
        if isinstance(d, dict) and d.get("slimtune_quant"):
            return str(d["slimtune_quant"])
    except (OSError, ValueError, RecursionError):  # unreadable: the adapter reader says why, in one line
        pass
    for cfg in (folder / "config.yaml", folder.parent / "config.yaml"):
        if cfg.exists():
            import yaml

            try:
                y = yaml.safe_load(cfg.read_text()) or {}
            except (yaml.YAMLError, ValueError, RecursionError):
                continue
            if isinstance(y, dict) and y.get("method") == "qlora":
                return str(y.get("quant") or "nf4")
    return None


def probe_batch(vocab_size: int, device: str | torch.device = "cpu", seed: int = 0) -> Tensor:
    """A fixed (2, 32) batch of token ids drawn from `seed` (the same on every run and machine)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, PROBE_SHAPE, generator=g).to(device)


@torch.no_grad()
def probe_logits(model: nn.Module, ids: Tensor) -> Tensor:
    """fp32 logits (B, T, V) of the probe batch, with every float parameter computing in fp32."""
    model.float()  # QuantLinear keeps its packed buffers; dequantizes to the input's dtype (fp32 here)
    return model(ids).float()


@torch.no_grad()
def merge_into_dequantized(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every LoRA layer of `model` by an nn.Linear of `dtype` holding dequant(W_q) + s B A (computed in fp32,
    rounded once), or for DoRA (m / ||W_q + s B A||_row) (W_q + s B A). Returns the number of merged layers.

    Raises:
        ConfigError: the model carries adapters of a method other than LoRA / DoRA.
    """
    from slimtune.peft.layer import AdapterLayer, active_adapters, model_adapters
    from slimtune.peft.lora import LoraLinear
    from slimtune.peft.targets import replace_module

    active = active_adapters(model)
    n = 0
    for path, m in [(p, m) for p, m in model.named_modules() if isinstance(m, AdapterLayer)]:
        if not isinstance(m, LoraLinear):
            raise ConfigError(f"merge-adapter --qlora: {path} holds a {type(m).__name__} adapter; only LoRA / DoRA "
                              "adapters merge into a quantized base")
        m.unmerge()
        dense = m._dense_base(torch.float32)  # (out, in): dequant(W_q) in fp32
        m.merge(active)  # LoRA's own merge (DoRA's too), in fp32
        lin = dense.to(dtype).requires_grad_(False)  # rounded once
        replace_module(model, path, lin)
        n += 1
    model_adapters(model).clear()
    model.__dict__["slimtune_active"] = []
    return n


def merge_qlora(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "bf16",
                quant: str | None = None, device: str | torch.device = "cpu", load_dtype: str = "bf16",
                compare_naive: bool = False) -> QloraMergeReport:
    """Merge a QLoRA adapter into its base and save a 16-bit Hugging Face checkpoint (with the tokenizer).

    The base is loaded quantized as for training (`load_model(..., dtype=load_dtype, quantize=quant)`; NF4 with double
    quantization by default), the adapter applied, reference logits taken on a fixed probe batch (fp32 compute), the
    layers merged from the dequantized base plus s B A, the checkpoint saved in `dtype`, reloaded (fp32 compute) and
    compared. Merging into the original 16-bit weights is NOT done: see `QLORA_NOTE`.

    Args:
        model_dir: the base model folder (or 'builtin'); adapter_dir: a PEFT LoRA / DoRA adapter folder.
        out_dir: the merged checkpoint's folder (written atomically).
        dtype: dtype of the saved weights (bf16, fp16, fp32).
        quant: the base format the adapter trained on; default: `detect_quant(adapter_dir)`, else nf4.
        device: where to load, merge and check; load_dtype: the dtype the base was quantized from (training's).
        compare_naive: also merge into the original 16-bit weights and report that logit difference (the mistake),
            which loads the base a second time.
    Returns:
        a `QloraMergeReport`.
    Raises:
        CheckpointError: missing / damaged model or adapter folders; the adapter does not fit the base.
        ConfigError: an unknown format, a non-LoRA adapter.
        PrecisionError: a weight the saved dtype cannot hold.
    """
    from slimtune.models.load import load_model
    from slimtune.models.save import save_model
    from slimtune.models.tokenizer import load_tokenizer
    from slimtune.peft.api import merge_and_unload
    from slimtune.peft.files import load_adapter
    from slimtune.precision.formats import parse_dtype

    quant = quant or detect_quant(adapter_dir) or "nf4"
    out_dtype = parse_dtype(dtype) or torch.bfloat16
    model, cfg = load_model(model_dir, dtype=load_dtype, device=device, quantize=quant)
    load_adapter(model, adapter_dir)
    ids = probe_batch(cfg.vocab_size, device)
    ref = probe_logits(model, ids)  # the unmerged QLoRA model
    layers = merge_into_dequantized(model, out_dtype)
    out = save_model(model, out_dir, dtype=out_dtype, tokenizer=load_tokenizer(model_dir))
    del model
    merged, _ = load_model(out, dtype=torch.float32, device=device)
    diff = (probe_logits(merged, ids) - ref).abs().max().item()
    del merged
    naive = None
    if compare_naive:
        plain, _ = load_model(model_dir, dtype=load_dtype, device=device)
        load_adapter(plain, adapter_dir)
        merge_and_unload(plain.float())
        naive = (probe_logits(plain.to(out_dtype), ids) - ref).abs().max().item()
    return QloraMergeReport(str(out), quant, str(out_dtype)[6:], layers, diff, ref.abs().max().item(), naive)
